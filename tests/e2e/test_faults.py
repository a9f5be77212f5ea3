"""Sweeps that survive a killed driver and a lost worker node, proved by killing them.

Both run tiny sweeps (synthetic data at 32 px, two small families) on Ray bound
to 127.0.0.1. Processes are found and killed through /proc, and only those this
test started: the sweep's own session, or a node of the test's own cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cxrtune.analysis.experiment import OPTUNA_JOURNAL, OPTUNA_STUDY_NAME, read_experiment
from cxrtune.analysis.leaderboard import build_leaderboard
from cxrtune.search.config import load_sweep_config
from cxrtune.search.tuner import RAY_TRIAL_ID_ATTR, journal_storage
from cxrtune.trainables.checkpoints import read_checkpoint

pytestmark = pytest.mark.slow
NUM_SAMPLES = 4
MAX_EPOCHS = 3


def tiny_sweep(storage: Path, **extra: Any) -> list[str]:
    """Overrides for a sweep of NUM_SAMPLES trials that ASHA never stops early."""
    settings = {
        "storage_path": str(storage),
        "image_size": 32,
        "synthetic.n": 600,
        "synthetic.size": 32,
        "space": "quick",
        "families": "[baseline_cnn, regularized_cnn]",
        "num_samples": NUM_SAMPLES,
        "max_epochs": MAX_EPOCHS,
        "grace_period": MAX_EPOCHS,
        "resources.baseline_cnn.cpus": 1,
        "resources.regularized_cnn.cpus": 1,
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


def result_rows(trial_dir: Path) -> list[dict[str, Any]]:
    """The rows of a trial's result.json, leaving out a last line cut short."""
    rows = []
    path = trial_dir / "result.json"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def rows_by_trial(experiment: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        folder.name: result_rows(folder)
        for folder in sorted(experiment.iterdir())
        if (folder / "params.json").is_file()
    }


def snapshot_progress(experiment: Path) -> dict[str, tuple[str, int]]:
    """Per trial folder in Ray's newest snapshot: its status and its checkpoint's epochs.

    That is what ``cxrtune resume`` restores. Ray registers a checkpoint a moment after
    the epoch's result, and ends a trial a moment after its last one, so a snapshot can
    hold a result whose checkpoint or end it does not hold yet.
    """
    from ray import tune

    try:
        snapshot = tune.ExperimentAnalysis(str(experiment))
    except (ValueError, OSError):
        return {}  # no snapshot yet, or one being written
    return {
        # Ray numbers a trial's checkpoints from 0: checkpoint_000001 holds epoch 2.
        Path(trial.path).name: (
            trial.status,
            int(trial.checkpoint.path.rpartition("_")[2]) + 1 if trial.checkpoint else 0,
        )
        for trial in snapshot.trials
        if trial.path
    }


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def proc_stat(pid: int) -> tuple[int, int]:
    """``(parent pid, session id)`` of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[3])


def live_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def session_members(session: int) -> list[int]:
    members = []
    for pid in live_pids():
        try:
            if proc_stat(pid)[1] == session:
                members.append(pid)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # exited meanwhile
    return members


def kill_session(leader: subprocess.Popen[str]) -> None:
    """SIGKILL the session leader, then whatever of its session (its local Ray) survives."""
    leader.kill()
    leader.wait()
    deadline = time.monotonic() + 30
    while members := session_members(leader.pid):
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            pytest.fail(f"processes {members} of the killed sweep's session survive SIGKILL")
        time.sleep(0.2)


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrtune.search.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def optuna_trials(journal: Path) -> list[Any]:
    import optuna

    study = optuna.load_study(study_name=OPTUNA_STUDY_NAME, storage=journal_storage(journal))
    return study.get_trials(deepcopy=False)


def assert_resumed_from_a_checkpoint(rows: list[dict[str, Any]]) -> None:
    """The trial's epochs run 1..MAX_EPOCHS once, and a later epoch began a restored run."""
    epochs = [row["epoch"] for row in rows]
    assert epochs == list(range(1, MAX_EPOCHS + 1)), epochs
    restored = [row["epoch"] for row in rows if row["iterations_since_restore"] == 1]
    assert len(restored) == 2 and restored[0] == 1 and restored[1] > 1, restored


def test_a_killed_sweep_driver_is_finished_by_resume(tmp_path: Path) -> None:
    storage = tmp_path / "results"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "cxrtune.search.cli", "sweep", "--name", "killed"]
        # Two trials start at once, so that one runs while another has finished: with
        # one at a time, a trial of three short epochs may end before the next starts.
        + [
            item
            for override in tiny_sweep(storage, max_concurrent_trials=2)
            for item in ("--set", override)
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own session: its local Ray can be found and killed
        # Ray copies the trials' result files to the experiment dir when it snapshots the
        # experiment, every 10 s or more by default: longer than this sweep lasts. Every
        # 0.1 s, a snapshot soon holds the checkpoint of the epoch whose result it shows.
        env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.1"},
    )
    experiment = storage / "killed"

    def one_finished_and_one_checkpointed() -> bool:
        if sweep.poll() is not None:
            output = sweep.stdout.read() if sweep.stdout else ""
            pytest.fail(f"the sweep ended before it was killed:\n{output[-3000:]}")

        def row_counts() -> dict[str, int]:
            if not experiment.is_dir():
                return {}
            return {name: len(rows) for name, rows in rows_by_trial(experiment).items()}

        counted = row_counts()
        interrupted = [name for name, count in counted.items() if 0 < count < MAX_EPOCHS]
        if MAX_EPOCHS not in counted.values() or not interrupted:
            return False
        # Killed while Ray's snapshot lags the result files, a trial would rightly run
        # an epoch again: every trial must be ended in it, or hold a checkpoint of its
        # last epoch. The rows are read again after it: a snapshot written in between
        # shows as a change.
        snapshot = snapshot_progress(experiment)
        if row_counts() != counted:
            return False
        for name, count in counted.items():
            status, checkpointed = snapshot.get(name, ("", 0))
            if count == MAX_EPOCHS and status != "TERMINATED":
                return False
            if 0 < count < MAX_EPOCHS and checkpointed != count:
                return False
        return True

    try:
        wait_for(one_finished_and_one_checkpointed, 300, "a finished and a checkpointed trial")
    finally:
        kill_session(sweep)
    before = rows_by_trial(experiment)
    finished = {name for name, rows in before.items() if len(rows) == MAX_EPOCHS}
    interrupted = {name for name, rows in before.items() if 0 < len(rows) < MAX_EPOCHS}
    assert finished and interrupted

    moved = storage / "killed-moved"
    shutil.move(experiment, moved)
    refused = run_cli("resume", str(moved))
    assert refused.returncode == 2 and "move the folder back" in refused.stderr
    shutil.move(moved, experiment)
    resumed = run_cli("resume", str(experiment))
    (tmp_path / "resume.log").write_text(resumed.stdout + resumed.stderr)

    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Leaderboard written" in resumed.stdout
    after = rows_by_trial(experiment)
    assert len(after) == NUM_SAMPLES
    for name in finished:
        assert after[name] == before[name]  # not run again
    for name in interrupted:
        assert_resumed_from_a_checkpoint(after[name])
    trial_ids = [rows[0]["trial_id"] for rows in after.values()]
    assert len(set(trial_ids)) == NUM_SAMPLES
    assert all(
        {row["trial_id"] for row in rows} == {rows[0]["trial_id"]} for rows in after.values()
    )

    trials = optuna_trials(experiment / OPTUNA_JOURNAL)
    assert len(trials) == NUM_SAMPLES
    assert sorted(trial.user_attrs[RAY_TRIAL_ID_ATTR] for trial in trials) == sorted(trial_ids)
    assert all(trial.state.name == "COMPLETE" for trial in trials)
    assert len({tuple(sorted(trial.params.items())) for trial in trials}) == NUM_SAMPLES
    leaderboard = pd.read_csv(experiment / "leaderboard.csv", dtype={"trial_id": str})
    assert sorted(leaderboard["trial_id"]) == sorted(trial_ids)


def raylet_pid(node: Any) -> int:
    return int(node.all_processes["raylet"][0].process.pid)


def trials_running_under(raylet: int) -> list[tuple[int, str]]:
    """``(pid, trial folder name)`` of the Tune trial actors descending from ``raylet``."""
    trials = []
    for pid in live_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"ImplicitFunc" not in cmdline:
                continue
            ancestor = pid
            while ancestor > 1 and ancestor != raylet:
                ancestor = proc_stat(ancestor)[0]
            if ancestor == raylet:
                trials.append((pid, Path(os.readlink(f"/proc/{pid}/cwd")).name))
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
    return trials


def newest_checkpoint_epoch(trial_dir: Path) -> int:
    epochs = []
    for checkpoint in trial_dir.glob("checkpoint_*/checkpoint.pt"):
        try:
            epochs.append(read_checkpoint(checkpoint)["epoch"])
        except ValueError:
            continue  # being written
    return max(epochs, default=0)


@pytest.fixture
def three_node_cluster() -> Iterator[Any]:
    """A head with no CPUs and two one-CPU worker nodes, all on 127.0.0.1."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a Ray instance left by another test must not take the sweep
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_trials_on_a_lost_worker_node_resume_from_their_checkpoints(
    tmp_path: Path, three_node_cluster: Any
) -> None:
    from cxrtune.search.sweep import run_sweep

    config = load_sweep_config(None, tiny_sweep(tmp_path, max_failures=2))
    experiment = tmp_path / "lost-node"
    workers = [node for node in three_node_cluster.worker_nodes]
    killed: dict[str, Any] = {}

    def kill_a_worker_running_a_checkpointed_trial() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for node in workers:
                for pid, name in trials_running_under(raylet_pid(node)):
                    if not 0 < newest_checkpoint_epoch(experiment / name) < MAX_EPOCHS:
                        continue
                    # Frozen, the trial cannot report its last epoch between the check
                    # and the node's death: a checkpoint is persisted before its result
                    # reaches Tune, so one short of MAX_EPOCHS means the trial is unfinished.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                    epoch = newest_checkpoint_epoch(experiment / name)
                    if 0 < epoch < MAX_EPOCHS:
                        three_node_cluster.remove_node(node, allow_graceful=False)
                        killed.update(trial=name, epoch=epoch)
                        return
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_a_worker_running_a_checkpointed_trial, daemon=True)
    watcher.start()
    outcome = run_sweep(config, name="lost-node", address=three_node_cluster.address)
    watcher.join(timeout=5)

    assert killed, "no trial with a checkpoint was seen running on a worker node"
    assert outcome.errored == 0
    rows = rows_by_trial(experiment)
    assert len(rows) == NUM_SAMPLES
    assert_resumed_from_a_checkpoint(rows[killed["trial"]])
    assert all(len(trial_rows) == MAX_EPOCHS for trial_rows in rows.values())
    leaderboard = build_leaderboard(read_experiment(experiment))
    assert len(leaderboard.ranked) == NUM_SAMPLES and leaderboard.failed.empty


def test_a_vgg16_trial_on_a_worker_node_trains_from_weights_only_the_driver_had(
    tmp_path: Path, three_node_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 1: the weights file is gone before any trial starts; trials run on workers only."""
    import torch
    import torchvision

    from cxrtune.search import sweep

    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None).state_dict()
    weights = tmp_path / "driver-only" / "vgg16.pt"
    weights.parent.mkdir()
    torch.save(reference, weights)
    prepare_data = sweep.prepare_data

    def delete_weights_then_prepare_data(config: Any) -> Any:
        shutil.rmtree(weights.parent)  # after the driver read the weights, before any trial
        return prepare_data(config)

    monkeypatch.setattr(sweep, "prepare_data", delete_weights_then_prepare_data)
    overrides = tiny_sweep(
        tmp_path,
        families="[vgg16]",
        weights=str(weights),
        num_samples=1,
        max_epochs=1,
        grace_period=1,
        max_failures=0,
        **{"synthetic.n": 200, "resources.vgg16.cpus": 1},
    )
    config = load_sweep_config(None, overrides)
    outcome = sweep.run_sweep(config, name="driver-weights", address=three_node_cluster.address)

    assert not weights.exists()
    assert outcome.trials == 1 and outcome.errored == 0
    [trial_dir] = [path for path in (tmp_path / "driver-weights").iterdir() if path.is_dir()]
    state = read_checkpoint(trial_dir / "checkpoint_000000")
    # The quick space fine-tunes at most the last two blocks: the first conv is frozen.
    expected = reference["features.0.weight"].sum(dim=1, keepdim=True)
    assert torch.equal(state["model"]["frozen.0.weight"], expected)
    leaderboard = build_leaderboard(read_experiment(tmp_path / "driver-weights"))
    assert leaderboard.ranked["pretrained"].tolist() == [True]
