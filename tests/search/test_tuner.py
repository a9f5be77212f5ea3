from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cxrtune.search.config import load_sweep_config
from cxrtune.search.tuner import (
    DATA_PARALLEL_DRIVER,
    FamilyResourcesFn,
    UnendedTrialsASHA,
    data_parallel_resources,
)
from cxrtune.trainables.config import FamilyResources


def test_each_family_gets_its_own_bundle_and_a_data_parallel_one_only_its_driver() -> None:
    config = load_sweep_config(
        None,
        [
            "resources.baseline_cnn={cpus: 2, gpus: 0.25}",
            "resources.vgg16={cpus: 4, gpus: 1, workers: 2}",
        ],
    )
    resources = FamilyResourcesFn(
        tuple((family, r.cpus, r.gpus, r.workers) for family, r in config.resources.items())
    )
    assert resources({"family": "baseline_cnn"}).bundles == [{"CPU": 2.0, "GPU": 0.25}]
    assert resources({"family": "vgg16"}).bundles == [DATA_PARALLEL_DRIVER]
    assert data_parallel_resources(config) == {
        "vgg16": FamilyResources(workers=2, cpus=4.0, gpus=1.0)
    }
    with pytest.raises(ValueError, match="resnet"):
        resources({"family": "resnet"})


def test_trials_of_a_family_share_one_resource_request() -> None:
    """The driver keeps every trial's request: one object per family, not one per trial.

    Tune unpickles the trainable, and with it this function, afresh for each trial.
    """
    import pickle

    resources = FamilyResourcesFn((("baseline_cnn", 1.0, 0.25, 1), ("vgg16", 4.0, 1.0, 2)))
    for family in ("baseline_cnn", "vgg16"):
        first = resources({"family": family})
        again = pickle.loads(pickle.dumps(resources))({"family": family})
        assert again is first
    assert resources({"family": "baseline_cnn"}) is not resources({"family": "vgg16"})


@pytest.fixture
def ray_with_one_gpu() -> Iterator[None]:
    """A local Ray that declares one GPU (none is needed to place trials on it)."""
    import ray

    ray.init(
        address="local",  # a new instance, never one already running here
        num_cpus=4,
        num_gpus=1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def report_placement(config: dict[str, Any]) -> None:
    """Report the GPU share and ids Ray gave this trial, once all four trials are running."""
    import time

    import ray
    from ray import tune

    # A barrier: each trial leaves a file and waits for the other three. Trials
    # that could not share the GPU would never all be running, and time out.
    rendezvous = Path(config["rendezvous"])
    (rendezvous / str(config["index"])).touch()
    deadline = time.monotonic() + 300
    while len(list(rendezvous.iterdir())) < 4:
        if time.monotonic() > deadline:
            raise TimeoutError("the four trials never ran at the same time")
        time.sleep(0.2)
    tune.report(
        {
            "gpu_share": ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0),
            "gpu_ids": ",".join(str(gpu) for gpu in ray.get_gpu_ids()),
        }
    )


@pytest.mark.slow
def test_four_quarter_gpu_trials_share_one_gpu_at_the_same_time(
    ray_with_one_gpu: None, tmp_path: Path
) -> None:
    from ray import tune

    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    resources = FamilyResourcesFn((("baseline_cnn", 1.0, 0.25, 1),))
    tuner = tune.Tuner(
        tune.with_resources(report_placement, resources),
        param_space={
            "family": "baseline_cnn",
            "rendezvous": str(rendezvous),
            "index": tune.grid_search([0, 1, 2, 3]),
        },
        run_config=tune.RunConfig(storage_path=str(tmp_path / "results"), verbose=0),
    )
    results = tuner.fit()
    assert not results.errors
    table = results.get_dataframe()
    assert len(table) == 4
    assert set(table["gpu_share"]) == {0.25}
    assert set(table["gpu_ids"]) == {"0"}


def test_the_scheduler_starts_the_trial_tunes_own_scheduler_would() -> None:
    """Same choice as Tune's full scan, through new, ended, paused and retried trials."""
    import random

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler

    class Controller:
        def __init__(self) -> None:
            self.trials: list[Trial] = []

        def get_trials(self) -> list[Trial]:
            return self.trials

    controller, scheduler = Controller(), UnendedTrialsASHA(metric="val_macro_auc", mode="max")
    tunes_own = FIFOScheduler()
    rng = random.Random(0)
    statuses = [Trial.PENDING, Trial.RUNNING, Trial.PAUSED, Trial.TERMINATED, Trial.ERROR]
    for step in range(400):
        if step % 3 == 0:
            trial = Trial("replay", stub=True, trial_id=f"t{step:04d}")
            controller.trials.append(trial)
            scheduler.on_trial_add(controller, trial)
        unended = [trial for trial in controller.trials if not trial.is_finished()]
        if unended:
            trial = rng.choice(unended)
            trial.set_status(rng.choice(statuses))
            if trial.status == Trial.PENDING and rng.random() < 0.3:
                # A trial retried after a failure goes to the end of Tune's list.
                controller.trials.remove(trial)
                controller.trials.append(trial)
                scheduler.on_trial_add(controller, trial)
        assert scheduler.choose_trial_to_run(controller) is tunes_own.choose_trial_to_run(
            controller
        )
    assert len(scheduler.unended) < len(controller.trials) / 2
