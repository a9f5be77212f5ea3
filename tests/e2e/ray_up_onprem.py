"""The Python steps of ray_up_onprem.sh: render the cluster file, and check what came out.

render SOURCE TARGET REPO KEY   prints "GCS_PORT DASHBOARD_PORT SSH_CONTROL_DIR"
listeners PID                   fails if PID's namespace listens off loopback
leaderboard EXPERIMENT_DIR N    fails unless the leaderboard lists N trials
"""

from __future__ import annotations

import csv
import getpass
import hashlib
import ipaddress
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

# The ports `ray start --head` takes when not told otherwise; moved to free ones here so
# the test never meets another Ray instance on this machine.
HEAD_PORT_FLAGS = ("--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def render(source: Path, target: Path, repo: Path, key: Path) -> str:
    """Point cluster-onprem.yaml at a head on 127.0.0.1 reached as root with ``key``."""
    config = yaml.safe_load(source.read_text())
    config["cluster_name"] = f"cxrtune-e2e-{uuid.uuid4().hex[:8]}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    if config["file_mounts"].get("~/cxrtune") != ".":
        raise SystemExit("cluster-onprem.yaml no longer syncs the repo (.) to ~/cxrtune")
    config["file_mounts"]["~/cxrtune"] = str(repo)

    gcs_port, *other_ports = free_ports(1 + len(HEAD_PORT_FLAGS))
    starts = [command for command in config["head_start_ray_commands"] if "ray start" in command]
    if len(starts) != 1 or starts[0].count("--port=6379") != 1:
        raise SystemExit(f"expected one `ray start --head ... --port=6379`, found {starts}")
    extra_flags = "".join(
        f" {flag}={port}" for flag, port in zip(HEAD_PORT_FLAGS, other_ports, strict=True)
    )
    config["head_start_ray_commands"] = [
        command.replace("--port=6379", f"--port={gcs_port}") + extra_flags
        if command == starts[0]
        else command
        for command in config["head_start_ray_commands"]
    ]
    target.write_text(yaml.safe_dump(config, sort_keys=False))

    # Where Ray's cluster launcher keeps its SSH connection sockets (command_runner.py).
    user_hash, cluster_hash = (
        hashlib.sha256(name.encode()).hexdigest()[:10]
        for name in (getpass.getuser(), config["cluster_name"])
    )
    return f"{gcs_port} {other_ports[0]} /tmp/ray_ssh_{user_hash}/{cluster_hash}"


def listeners_off_loopback(namespace_member: int) -> list[str]:
    """Listening TCP sockets of processes in ``namespace_member``'s PID namespace, off loopback."""
    namespace = os.readlink(f"/proc/{namespace_member}/ns/pid")
    listing = subprocess.run(
        ["ss", "-H", "-l", "-t", "-n", "-p"], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in listing.splitlines():
        fields = line.split()
        local_address = fields[3]
        for pid in re.findall(r"pid=(\d+)", line):
            try:
                in_namespace = os.readlink(f"/proc/{pid}/ns/pid") == namespace
            except FileNotFoundError:
                continue
            if in_namespace and not is_loopback(local_address.rsplit(":", 1)[0].strip("[]")):
                found.append(line)
    return found


def is_loopback(host: str) -> bool:
    """127.0.0.1, ::1 or ::ffff:127.0.0.1; a wildcard (``*``, ``0.0.0.0``) is not."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def count_leaderboard_trials(experiment_dir: Path) -> int:
    with (experiment_dir / "leaderboard.csv").open() as rows:
        return len(list(csv.DictReader(rows)))


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "render":
        source, target, repo, key = map(Path, args)
        print(render(source, target, repo, key))
    elif command == "listeners":
        off_loopback = listeners_off_loopback(int(args[0]))
        if off_loopback:
            print("the node listens off loopback:", *off_loopback, sep="\n", file=sys.stderr)
            return 1
        print("every port of the node listens on 127.0.0.1 only")
    elif command == "leaderboard":
        experiment_dir, expected = Path(args[0]), int(args[1])
        trials = count_leaderboard_trials(experiment_dir)
        if trials != expected or not (experiment_dir / "leaderboard.md").is_file():
            print(f"leaderboard: {trials} trials, {expected} expected", file=sys.stderr)
            return 1
        print(f"leaderboard.csv lists {trials} trials")
    else:
        raise SystemExit(f"unknown step {command!r}: render, listeners or leaderboard")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
