"""The cluster-scale benchmark's measures, on inline data, and its simulated cluster."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.cluster_scale import (
    DriverSamples,
    bytes_per_trial,
    most_at_once,
    packing,
    slopes,
)


def test_intervals_that_touch_do_not_overlap() -> None:
    assert most_at_once([(0, 1), (1, 2), (2, 3)]) == 1
    assert most_at_once([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3


def epoch(node: str, gpus: str, start: float, end: float) -> dict[str, object]:
    return {"node_id": node, "gpu_ids": gpus, "epoch_started": start, "epoch_ended": end}


def test_packing_counts_epochs_at_once_per_gpu_id_of_each_node() -> None:
    rows = [
        *(epoch("a", "0", 0, 1) for _ in range(4)),
        *(epoch("a", "1", 0.5, 1.5) for _ in range(3)),
        *(epoch("b", "0", 0, 1) for _ in range(2)),  # GPU 0 of another node
    ]
    measured = packing(rows)
    assert (measured.per_gpu, measured.per_node, measured.one_gpu_share) == (4, 7, 1.0)
    assert packing([*rows, epoch("a", "0,1", 5, 6)]).one_gpu_share == pytest.approx(9 / 10)


def test_slopes_are_per_further_finished_trial() -> None:
    # A reading each second; a trial finishes each second; each costs 0.05 s and 1 KiB.
    samples = DriverSamples([(t, 2.0 + 0.05 * t, 1000 + 1024 * t) for t in range(1, 101)])
    finished = [float(t) for t in range(1, 101)]
    cpu, rss = slopes(samples, finished, 10, 90)
    assert cpu == pytest.approx(0.05) and rss == pytest.approx(1024)


def test_bytes_per_trial_is_read_where_enough_trials_have_finished() -> None:
    sizes = [(1.0, 500), (5.0, 4000), (9.0, 9000)]
    finished = [float(t) for t in range(10)]
    assert bytes_per_trial(sizes, finished, at_least=4) == pytest.approx(4000 / 6)


@pytest.mark.slow
def test_the_simulated_cluster_listens_on_loopback_only_and_wants_its_token() -> None:
    """Its worker nodes start through private names of Ray (``_ray_start``): checked here."""
    from benchmarks._cluster import NodeSpec, loopback_cluster, session_members

    with loopback_cluster(NodeSpec(cpus=0), [NodeSpec(cpus=1, gpus=4)]) as cluster:
        pids = {pid for node in cluster.nodes for pid in session_members(node.pid)}
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        ours = [line for line in listening.splitlines() if any(f"pid={p}," in line for p in pids)]
        assert ours
        for line in ours:
            local = line.split()[3]
            assert local.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), line
        probe = "import ray; ray.init(address={!r}); print(ray.cluster_resources()['GPU'])"
        environment = {**cluster.environment, "RAY_AUTH_TOKEN": "0" * 64}
        wrong = subprocess.run(
            [sys.executable, "-c", probe.format(cluster.address)],
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        right = subprocess.run(
            [sys.executable, "-c", probe.format(cluster.address)],
            env=cluster.environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert wrong.returncode != 0
    assert right.returncode == 0 and right.stdout.split()[-1] == "4.0"
