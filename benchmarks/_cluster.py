"""A Ray cluster of several nodes on 127.0.0.1, started with ``ray start`` as on real servers.

Each node is one ``ray start --block`` process in a session of its own, so that
stopping the cluster ends exactly its processes (raylets, GCS, workers) and never
another Ray instance of the machine, as ``ray stop`` would. Token authentication
is on, as in ``cluster-onprem.yaml``, with a token made for this cluster alone and
handed over in the environment, never written to ``~/.ray``.

Nodes may declare GPUs they do not have (``--num-gpus``): Ray assigns GPU ids from
the declared count, which is what packing depends on.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cxrtune.search.ray_environment import LOOPBACK_RAY_ENVIRONMENT

# Seconds to wait for a node to register, and for a stopped node to go.
NODE_START_TIMEOUT_S = 120.0
NODE_STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def session_members(session: int) -> list[int]:
    """Processes of ``session`` that are still alive, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the command name, which sits in parentheses and may hold spaces.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended while being read
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@dataclass(frozen=True)
class NodeSpec:
    """What one node declares: CPUs, GPUs (real or not) and custom resources."""

    cpus: int
    gpus: int = 0
    resources: Mapping[str, float] = field(default_factory=dict)

    def arguments(self) -> list[str]:
        arguments = [f"--num-cpus={self.cpus}", f"--num-gpus={self.gpus}"]
        if self.resources:
            import json

            arguments.append(f"--resources={json.dumps(dict(self.resources))}")
        return arguments


@dataclass
class LoopbackCluster:
    """A running cluster: its address, the environment a driver needs, its node processes."""

    address: str
    environment: dict[str, str]  # token auth and loopback, for drivers and ``ray`` commands
    temp_dir: Path
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_node(self, spec: NodeSpec, *, head: bool = False) -> None:
        # A worker node starts through ``_ray_start``: Ray's ``ray start`` with its refusal of
        # a second node on a loopback-only machine lifted.
        ray_start = [str(Path(sys.executable).with_name("ray"))]
        if not head:
            ray_start = [sys.executable, "-m", "benchmarks._ray_start"]
        command = [
            *ray_start,
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            # Ports a second node on the same machine would otherwise also ask for.
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            *spec.arguments(),
        ]
        if head:
            port = self.address.rpartition(":")[2]
            command += [
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp_dir}",
            ]
        else:
            command.append(f"--address={self.address}")
        log = (self.temp_dir / f"node-{len(self.nodes)}.log").open("wb")
        self.nodes.append(
            subprocess.Popen(
                command,
                env=self.environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def wait_for_nodes(self, count: int) -> None:
        """Wait until ``count`` nodes are alive; a node process that exits is an error."""
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while True:
            for index, node in enumerate(self.nodes):
                if node.poll() is not None:
                    log = (self.temp_dir / f"node-{index}.log").read_text(errors="replace")
                    raise RuntimeError(f"Ray node {index} exited at start:\n{log[-3000:]}")
            alive = self._alive_nodes()
            if alive >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{alive} of {count} Ray nodes came up")
            time.sleep(1.0)

    def _alive_nodes(self) -> int:
        # In a child process: this process must not become a Ray driver of the cluster.
        script = "import ray; print(sum(n['Alive'] for n in ray.nodes()))"
        probe = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={self.address!r}); " + script],
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = probe.stdout.split()
        return int(lines[-1]) if probe.returncode == 0 and lines else 0

    def stop(self) -> None:
        """End every process of every node, workers included; the head last."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + NODE_STOP_TIMEOUT_S
        for node in self.nodes:
            while time.monotonic() < deadline and session_members(node.pid):
                time.sleep(0.2)
            for pid in session_members(node.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            node.wait()


def cluster_environment(token: str) -> dict[str, str]:
    """This process's environment plus token auth and the loopback switch."""
    return {
        **os.environ,
        **LOOPBACK_RAY_ENVIRONMENT,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }


@contextmanager
def loopback_cluster(
    head: NodeSpec, workers: list[NodeSpec], environment: Mapping[str, str] | None = None
) -> Iterator[LoopbackCluster]:
    """Start a head and worker nodes on 127.0.0.1 with token auth; stop them all on exit.

    ``environment``: variables the nodes, and so their workers, get besides.
    """
    with tempfile.TemporaryDirectory(prefix="cxrtune-cluster-") as temp:
        cluster = LoopbackCluster(
            address=f"127.0.0.1:{free_port()}",
            environment={**cluster_environment(secrets.token_hex(32)), **(environment or {})},
            temp_dir=Path(temp),
        )
        try:
            cluster.start_node(head, head=True)
            cluster.wait_for_nodes(1)
            # One at a time: nodes registering at once can miss Ray's start-up deadline
            # on a busy machine of two cores.
            for count, spec in enumerate(workers, start=2):
                cluster.start_node(spec)
                cluster.wait_for_nodes(count)
            yield cluster
        finally:
            cluster.stop()
