"""Data-parallel trials on CPU: two workers over gloo, as two GPUs would run them over NCCL."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cxrtune.analysis.experiment import ExperimentDir
from cxrtune.search.config import load_sweep_config
from cxrtune.search.progress import SweepProgress
from cxrtune.trainables.checkpoints import read_checkpoint
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.engine import shard_for_rank, train_one_epoch
from cxrtune.trainables.fit import TrialData
from cxrtune.trainables.models import create_model
from tests.trainables.test_trainable import TRIAL_METRIC_KEYS

SIZE = 16
PER_WORKER_BATCH = 4


def stripes(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(count) % 2
    images = torch.randint(0, 256, (count, 1, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    images[labels == 0, :, ::4] = 255
    return images, labels


def fresh_model() -> torch.nn.Module:
    # baseline_cnn: no batch norm and no dropout, so one step on a split batch is
    # exactly one step on the whole batch, up to the order of float additions.
    torch.manual_seed(0)
    config = TrialConfig(family="baseline_cnn", lr=0.1, batch_size=8, imbalance="none")
    return create_model(config, num_classes=2, image_size=SIZE)


def one_data_parallel_step(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    images, labels = stripes(16)
    model = fresh_model()
    replicated = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    shard = shard_for_rank(order, rank, world_size)[:PER_WORKER_BATCH]
    train_one_epoch(replicated, optimizer, images, labels, shard, batch_size=PER_WORKER_BATCH)
    torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_one_data_parallel_step_is_one_step_on_the_workers_batches_put_together(
    tmp_path: Path,
) -> None:
    mp.spawn(one_data_parallel_step, args=(2, free_port(), str(tmp_path)), nprocs=2)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    images, labels = stripes(16)
    model = fresh_model()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    together = order[: 2 * PER_WORKER_BATCH]  # the workers' first batches, interleaved
    train_one_epoch(model, optimizer, images, labels, together, batch_size=2 * PER_WORKER_BATCH)

    for name, single in model.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between workers"
        assert torch.allclose(rank0[name], single, atol=1e-6), f"{name} differs from one step"
        assert not torch.equal(rank0[name], initial[name]), f"{name} did not train"


def tiny_data() -> TrialData:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [12, 24, 24])
    images = rng.integers(0, 256, (60, 1, SIZE, SIZE), dtype=np.uint8)
    images[labels == 0, :, 4:8, 4:8] = 255
    return TrialData(
        train_images=images[:45],
        train_labels=labels[:45],
        val_images=images[45:],
        val_labels=np.array([0, 1, 2] * 5),
        class_names=("COVID", "Normal", "Pneumonia"),
        positive_index=0,
    )


@pytest.fixture
def local_ray() -> Iterator[None]:
    import ray

    # The trial's driver plus two one-CPU workers; Ray counts CPUs, it does not
    # need that many cores.
    ray.init(
        address="local",  # a new instance, never one already running here
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
    )
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_two_worker_trial_reports_like_any_trial_with_a_checkpoint_per_epoch(
    local_ray: None, tmp_path: Path
) -> None:
    from cxrtune.search.tuner import build_tuner

    config = load_sweep_config(
        None,
        [
            "families=[baseline_cnn]",
            "space=quick",
            "num_samples=1",
            "max_epochs=2",
            "grace_period=2",
            "resources.baseline_cnn={cpus: 1, gpus: 0, workers: 2}",
        ],
    )
    (tmp_path / "sweep").mkdir()
    tuner = build_tuner(
        config,
        tiny_data(),
        experiment=ExperimentDir.under(str(tmp_path), "sweep"),
        vgg16_weights="none",
        progress=SweepProgress(num_samples=1, max_epochs=2),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    (result,) = list(results)
    assert result.path is not None
    trial_dir = Path(result.path)
    reported = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    assert [row["epoch"] for row in reported] == [1, 2]
    assert all(set(row) >= TRIAL_METRIC_KEYS for row in reported)
    assert all(np.isfinite(row["train_loss"]) for row in reported)
    checkpoints = sorted(trial_dir.glob("checkpoint_*"))
    assert [read_checkpoint(path)["epoch"] for path in checkpoints] == [1, 2]
    assert [row["checkpoint_dir_name"] for row in reported] == [path.name for path in checkpoints]
    # Ray Train's own copies are gone once Tune holds every checkpoint.
    assert not (trial_dir / "data_parallel").exists()
    assert_workers_released()


def assert_workers_released() -> None:
    """Every placement group the trials and their Ray Train runs made is gone."""
    import time

    import ray

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = [
            group
            for group in ray.util.placement_group_table().values()
            if group["state"] != "REMOVED"
        ]
        if not live:
            return
        time.sleep(0.5)
    raise AssertionError(f"placement groups left behind: {live}")


@pytest.mark.slow
def test_a_two_worker_trial_that_tune_stops_early_shuts_its_workers_down(
    local_ray: None, tmp_path: Path
) -> None:
    from ray import tune

    from cxrtune.search.tuner import FamilyResourcesFn
    from cxrtune.trainables.config import FamilyResources
    from cxrtune.trainables.trainable import train_trial

    config = {"family": "baseline_cnn", "lr": 1e-3, "batch_size": 8, "imbalance": "none"}
    trainable = tune.with_parameters(
        train_trial,
        data=tiny_data(),
        data_parallel={"baseline_cnn": FamilyResources(workers=2, cpus=1.0, gpus=0.0)},
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, FamilyResourcesFn((("baseline_cnn", 1.0, 0.0, 2),))),
        param_space={**config, "max_epochs": 3},
        # Stopped after its first epoch, as ASHA stops a trial at a rung.
        run_config=tune.RunConfig(
            storage_path=str(tmp_path), stop={"training_iteration": 1}, verbose=0
        ),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    (result,) = list(results)
    assert result.metrics is not None and result.metrics["epoch"] == 1
    assert result.checkpoint is not None
    assert read_checkpoint(Path(result.checkpoint.path))["epoch"] == 1
    assert_workers_released()


class KillAWorkerAfterTheFirstEpoch:
    """Kills one Ray Train worker of this Ray instance once, as losing its node would."""

    def __init__(self) -> None:
        self.killed_pid: int | None = None

    def __call__(self, result: dict[str, object]) -> None:
        import signal

        import ray._private.state

        if self.killed_pid is not None or result["epoch"] != 1:
            return
        workers = [
            actor["Pid"]
            for actor in ray._private.state.actors().values()
            if actor["ActorClassName"] == "RayTrainWorker" and actor["State"] == "ALIVE"
        ]
        assert workers, "no live Ray Train worker to kill"
        self.killed_pid = int(workers[0])
        os.kill(self.killed_pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_two_worker_trial_that_loses_a_worker_resumes_from_its_last_checkpoint(
    local_ray: None, tmp_path: Path
) -> None:
    from ray import tune

    from cxrtune.search.tuner import FamilyResourcesFn
    from cxrtune.trainables.config import FamilyResources
    from cxrtune.trainables.trainable import train_trial

    kill = KillAWorkerAfterTheFirstEpoch()

    class OnResult(tune.Callback):
        def on_trial_result(
            self, iteration: int, trials: list, trial: object, result: dict, **info: object
        ) -> None:  # type: ignore[override]
            kill(result)

    trainable = tune.with_parameters(
        train_trial,
        data=tiny_data(),
        data_parallel={"baseline_cnn": FamilyResources(workers=2, cpus=1.0, gpus=0.0)},
    )
    config = {"family": "baseline_cnn", "lr": 1e-3, "batch_size": 8, "imbalance": "none"}
    tuner = tune.Tuner(
        tune.with_resources(trainable, FamilyResourcesFn((("baseline_cnn", 1.0, 0.0, 2),))),
        param_space={**config, "max_epochs": 3},
        run_config=tune.RunConfig(
            storage_path=str(tmp_path),
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[OnResult()],
            verbose=0,
        ),
    )
    results = tuner.fit()
    assert kill.killed_pid is not None
    assert not results.errors, results.errors
    (result,) = list(results)
    assert result.path is not None
    trial_dir = Path(result.path)
    rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    # Epoch 2 of the first attempt died with the worker; the retry went on from
    # epoch 1's checkpoint instead of starting again. (Whether the first attempt's
    # row stays in result.json is Tune's affair.) Tune restores its iteration
    # count from the checkpoint, so a retry that started over would report epoch
    # 1 at iteration 2.
    assert [row["epoch"] for row in rows][-2:] == [2, 3]
    assert all(row["epoch"] == row["training_iteration"] for row in rows)
    assert read_checkpoint(Path(result.checkpoint.path))["epoch"] == 3  # type: ignore[union-attr]
    assert_workers_released()
