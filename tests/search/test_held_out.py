"""Held-out test evaluation as parallel Ray tasks gives what evaluation in process gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cxrtune.analysis.evaluation import evaluate_in_process
from cxrtune.analysis.experiment import read_experiment
from cxrtune.analysis.leaderboard import build_leaderboard
from cxrtune.search.held_out import EVALUATION_GPUS, ray_evaluator, task_resources
from tests.analysis.test_leaderboard import make_experiment


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    from cxrtune.search.sweep import start_ray

    start_ray(address=None)  # a private instance on 127.0.0.1
    yield
    ray.shutdown()


def test_a_task_takes_a_gpu_share_only_where_the_cluster_has_gpus() -> None:
    assert task_resources({"CPU": 8.0}) == {"num_cpus": 1}
    assert task_resources({"CPU": 8.0, "GPU": 2.0}) == {"num_cpus": 1, "num_gpus": EVALUATION_GPUS}


def test_ray_tasks_give_the_predictions_of_evaluation_in_process(
    local_ray: None, tmp_path: Path
) -> None:
    directory = make_experiment(tmp_path)
    experiment = read_experiment(directory)
    checkpoints = {
        "t1": directory / "t1_baseline_cnn" / "checkpoint_000001",
        "t2": directory / "t2_regularized_cnn" / "checkpoint_000001",
        "t3": directory / "t3_baseline_cnn" / "checkpoint_000000",
    }
    (checkpoints["t3"] / "checkpoint.pt").unlink()
    on_ray = ray_evaluator(directory, directory)(experiment, checkpoints)
    in_process = evaluate_in_process(experiment, checkpoints)
    assert set(on_ray.predictions) == set(in_process.predictions) == {"t1", "t2"}
    for trial_id, splits in in_process.predictions.items():
        for split, expected in splits.items():
            found = on_ray.predictions[trial_id][split]
            np.testing.assert_array_equal(found.labels, expected.labels)
            np.testing.assert_allclose(found.probabilities, expected.probabilities, atol=1e-6)
    assert on_ray.unreadable == in_process.unreadable
    assert "checkpoint.pt is missing" in on_ray.unreadable["t3"]

    # Through the leaderboard, the unreadable checkpoint sends its trial to the failed ones.
    leaderboard = build_leaderboard(experiment, evaluate=ray_evaluator(directory, directory))
    assert leaderboard.ranked["trial_id"].tolist() == ["t1", "t2"]
    assert leaderboard.ranked["test_evaluated"].all()
    assert leaderboard.failed["trial_id"].tolist() == ["t4", "t3"]
