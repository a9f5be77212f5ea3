"""One real tiny sweep, read back by the tools people use: Optuna, TensorBoard, MLflow."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages.journal import JournalFileBackend

from cxrtune.analysis.experiment import (
    OPTUNA_JOURNAL,
    OPTUNA_STUDY_NAME,
    read_experiment,
)
from cxrtune.analysis.leaderboard import build_leaderboard, write_leaderboard
from cxrtune.analysis.mlflow_export import MODEL_ARTIFACT, log_top_models
from cxrtune.search.config import load_sweep_config
from cxrtune.search.searcher import BEST_EPOCH_ATTR, best_epoch
from cxrtune.search.sweep import run_sweep, start_ray
from cxrtune.search.tuner import RAY_TRIAL_ID_ATTR

pytestmark = pytest.mark.slow
NUM_SAMPLES = 3
OBJECTIVES = ["val_covid_recall_at_spec", "val_macro_auc"]
PER_EPOCH = ["val_macro_auc", "val_covid_recall", "train_loss"]


@dataclass(frozen=True)
class Sweep:
    directory: Path
    mlflow_uri: str
    last_results: dict[str, dict]  # trial id -> its last line of result.json
    epochs: dict[str, int]  # trial id -> epochs reported
    top_runs: dict[str, str]  # trial id -> MLflow run id, of the trials whose model was logged


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    start_ray(address=None)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, local_ray: None) -> Iterator[Sweep]:
    """A three-trial sweep logged to a local MLflow file store, its leaderboard written."""
    root = tmp_path_factory.mktemp("tools")
    mlflow_uri = f"file://{root / 'mlruns'}"
    with pytest.MonkeyPatch.context() as environment:
        # Module-scoped, so the per-test cache fixture has not run yet.
        environment.setenv("CXRTUNE_CACHE_DIR", str(root / "cache"))
        # MLflow 3 refuses file stores unless asked; a test has no tracking server.
        environment.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        config = load_sweep_config(
            None,
            [
                f"storage_path={root / 'results'}",
                f"mlflow_uri={mlflow_uri}",
                "image_size=32",
                f"num_samples={NUM_SAMPLES}",
                "max_epochs=2",
                "grace_period=1",
                "families=[baseline_cnn, regularized_cnn]",
                "synthetic.n=200",
                "synthetic.size=32",
                "space=quick",
            ],
        )
        outcome = run_sweep(config, name="tools")
        assert outcome.errored == 0
        write_leaderboard(
            build_leaderboard(read_experiment(outcome.experiment_dir)), outcome.experiment_dir
        )
        top_runs = log_top_models(outcome.experiment_dir, mlflow_uri, top=2)
        experiment = read_experiment(outcome.experiment_dir)
        yield Sweep(
            directory=outcome.experiment_dir,
            mlflow_uri=mlflow_uri,
            last_results={
                trial.trial_id: trial.results.iloc[-1].to_dict() for trial in experiment.trials
            },
            epochs={trial.trial_id: len(trial.results) for trial in experiment.trials},
            top_runs=top_runs,
        )


def test_the_sweep_ran_every_trial_for_one_or_two_epochs(sweep: Sweep) -> None:
    assert len(sweep.last_results) == NUM_SAMPLES
    assert set(sweep.epochs.values()) <= {1, 2}


def test_the_optuna_journal_holds_every_trial_with_its_best_epoch_values(sweep: Sweep) -> None:
    """Issue item 2: Optuna is told each trial's values at its best-validation epoch."""
    storage = optuna.storages.JournalStorage(
        JournalFileBackend(str(sweep.directory / OPTUNA_JOURNAL))
    )
    study = optuna.load_study(study_name=OPTUNA_STUDY_NAME, storage=storage)
    assert study.metric_names == OBJECTIVES
    trials = {trial.user_attrs[RAY_TRIAL_ID_ATTR]: trial for trial in study.trials}
    assert set(trials) == set(sweep.last_results)
    results = {
        record.trial_id: record.results for record in read_experiment(sweep.directory).trials
    }
    for trial_id, trial in trials.items():
        assert trial.state == optuna.trial.TrialState.COMPLETE
        epochs = results[trial_id].to_dict("records")
        best = best_epoch(epochs, "val_macro_auc")
        assert trial.values == [best[metric] for metric in OBJECTIVES]
        assert trial.user_attrs[BEST_EPOCH_ATTR] == best["epoch"]
        last = sweep.last_results[trial_id]
        assert trial.params["family"] == last["config"]["family"]


def test_the_searcher_state_ray_checkpoints_unpickles_onto_the_journal(sweep: Sweep) -> None:
    (state_file,) = sweep.directory.glob("searcher-state-*.pkl")
    state = pickle.loads(state_file.read_bytes())
    study = state["study"]
    assert study._storage._backend._file_path == str(sweep.directory / OPTUNA_JOURNAL)
    assert len(study.trials) == NUM_SAMPLES


def test_tensorboard_reads_one_value_per_epoch_of_each_metric(sweep: Sweep) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for trial_id, epochs in sweep.epochs.items():
        (trial_dir,) = sweep.directory.glob(f"{trial_id}_*")
        assert list(trial_dir.glob("events.out.tfevents.*"))
        events = EventAccumulator(str(trial_dir))
        events.Reload()
        for metric in PER_EPOCH:
            scalars = events.Scalars(f"ray/tune/{metric}")
            assert [scalar.step for scalar in scalars] == list(range(1, epochs + 1))
        last = events.Scalars("ray/tune/val_macro_auc")[-1].value
        assert last == pytest.approx(sweep.last_results[trial_id]["val_macro_auc"], abs=1e-6)


def test_mlflow_has_one_run_per_trial_with_params_and_per_epoch_metrics(sweep: Sweep) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sweep.mlflow_uri)
    experiment = client.get_experiment_by_name(sweep.directory.name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_trial = {run.data.tags["trial_name"].rsplit("_", 1)[-1]: run for run in runs}
    assert len(runs) == NUM_SAMPLES
    assert set(by_trial) == set(sweep.last_results)
    for trial_id, run in by_trial.items():
        assert run.info.status == "FINISHED"
        last = sweep.last_results[trial_id]
        assert run.data.params["family"] == last["config"]["family"]
        assert float(run.data.params["lr"]) == pytest.approx(last["config"]["lr"])
        for metric in PER_EPOCH:
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(point.step for point in history) == list(
                range(1, sweep.epochs[trial_id] + 1)
            )


def test_the_top_trials_have_their_chosen_checkpoint_as_the_model_artifact(sweep: Sweep) -> None:
    from mlflow.tracking import MlflowClient

    leaderboard = pd.read_csv(sweep.directory / "leaderboard.csv", dtype={"trial_id": str})
    top = leaderboard.sort_values("rank")["trial_id"].head(2).tolist()
    assert list(sweep.top_runs) == top
    client = MlflowClient(tracking_uri=sweep.mlflow_uri)
    for rank, trial_id in enumerate(top, start=1):
        run_id = sweep.top_runs[trial_id]
        artifacts = [item.path for item in client.list_artifacts(run_id, MODEL_ARTIFACT)]
        assert sorted(artifacts) == [
            f"{MODEL_ARTIFACT}/checkpoint.pt",
            f"{MODEL_ARTIFACT}/checkpoint.sha256",
        ]
        tags = client.get_run(run_id).data.tags
        assert tags["leaderboard_rank"] == str(rank)
        assert tags["trial_name"].endswith(trial_id)
    others = set(sweep.last_results) - set(top)
    experiment = client.get_experiment_by_name(sweep.directory.name)
    assert experiment is not None
    for run in client.search_runs([experiment.experiment_id]):
        if run.data.tags["trial_name"].endswith(tuple(others)):
            assert client.list_artifacts(run.info.run_id) == []
