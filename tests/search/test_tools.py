"""The Optuna journal, the MLflow check and the top models' MLflow export, without Ray running."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from cxrtune.analysis.experiment import (
    DATASET_FILE,
    LEADERBOARD_CSV,
    OPTUNA_JOURNAL,
    OPTUNA_STUDY_NAME,
    PARAMS_FILE,
    RESULTS_FILE,
    SPLITS_FILE,
    SWEEP_FILE,
    ExperimentError,
)
from cxrtune.analysis.mlflow_export import (
    MODEL_ARTIFACT,
    MLflowError,
    log_top_models,
)
from cxrtune.search.config import SweepConfigError, load_sweep_config
from cxrtune.search.sweep import run_sweep
from cxrtune.search.tuner import (
    RAY_TRIAL_ID_ATTR,
    StudySearcher,
    build_searcher,
    journal_storage,
    mlflow_callback,
)

OBJECTIVES = ["val_covid_recall_at_spec", "val_macro_auc"]


def open_study(journal: Path) -> optuna.Study:
    return optuna.load_study(study_name=OPTUNA_STUDY_NAME, storage=journal_storage(journal))


def finish(searcher: StudySearcher, trial_id: str, recall: float, auc: float) -> None:
    searcher.suggest(trial_id)
    searcher.on_trial_complete(
        trial_id, result={"val_covid_recall_at_spec": recall, "val_macro_auc": auc, "epoch": 1}
    )


def test_the_study_lives_in_the_journal_with_its_objectives_named(tmp_path: Path) -> None:
    journal = tmp_path / OPTUNA_JOURNAL
    build_searcher(load_sweep_config(None, ["families=[baseline_cnn, vgg16]"]), "none", journal)
    study = open_study(journal)
    assert study.metric_names == OBJECTIVES
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2
    # The first trials are queued, one per family, before any is asked for.
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.WAITING] * 2
    queued = [trial.system_attrs["fixed_params"] for trial in study.trials]
    assert queued == [{"family": "baseline_cnn"}, {"family": "vgg16"}]


def test_a_finished_trial_is_in_the_journal_with_its_ray_id_and_values(tmp_path: Path) -> None:
    journal = tmp_path / OPTUNA_JOURNAL
    searcher = build_searcher(load_sweep_config(None, ["space=quick"]), "none", journal)
    finish(searcher, "abc12345", 0.5, 0.75)
    (trial,) = [trial for trial in open_study(journal).trials if trial.state.is_finished()]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs[RAY_TRIAL_ID_ATTR] == "abc12345"
    assert trial.values == [0.5, 0.75]
    assert trial.params["family"] == "baseline_cnn"


def test_a_single_objective_study_names_its_one_metric(tmp_path: Path) -> None:
    journal = tmp_path / OPTUNA_JOURNAL
    config = load_sweep_config(None, ["objectives=[val_loss]", "space=quick"])
    searcher = build_searcher(config, "none", journal)
    searcher.suggest("abc12345")
    searcher.on_trial_complete("abc12345", result={"val_loss": 0.25})
    study = open_study(journal)
    assert study.metric_names == ["val_loss"]
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.best_trial.value == 0.25


def test_a_searcher_restored_from_its_checkpoint_keeps_writing_the_same_journal(
    tmp_path: Path,
) -> None:
    # What Ray does: the searcher is pickled into tuner.pkl when the Tuner is built, its
    # state into searcher-state-*.pkl as trials run; a resumed sweep unpickles the first
    # and restores the second into it.
    journal = tmp_path / OPTUNA_JOURNAL
    config = load_sweep_config(None, ["space=quick", "families=[baseline_cnn]"])
    searcher = build_searcher(config, "none", journal)
    built = pickle.dumps(searcher)
    finish(searcher, "first000", 0.25, 0.5)
    searcher.save(str(tmp_path / "searcher-state.pkl"))

    resumed = pickle.loads(built)
    resumed.restore(str(tmp_path / "searcher-state.pkl"))
    finish(resumed, "second00", 0.75, 0.875)

    trials = open_study(journal).trials
    assert [trial.user_attrs[RAY_TRIAL_ID_ATTR] for trial in trials] == ["first000", "second00"]
    assert [trial.values for trial in trials] == [[0.25, 0.5], [0.75, 0.875]]


def test_a_searcher_without_a_journal_keeps_the_study_in_memory(tmp_path: Path) -> None:
    searcher = build_searcher(load_sweep_config(None, ["space=quick"]), "none")
    finish(searcher, "abc12345", 0.5, 0.75)
    assert list(tmp_path.iterdir()) == []


def test_the_mlflow_callback_logs_to_the_sweeps_experiment_without_uploading_trial_dirs() -> None:
    callback = mlflow_callback("sqlite:///mlflow.db", "quickstart-1")
    assert callback.tracking_uri == "sqlite:///mlflow.db"
    assert callback.experiment_name == "quickstart-1"
    assert not callback.should_save_artifact


def test_the_mlflow_callback_pickled_into_the_experiment_dir_holds_no_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Item 6: keys in mlflow_uri go to MLflow's environment variables, not into tuner.pkl."""
    import ray.cloudpickle  # what Ray writes tuner.pkl with

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    callback = mlflow_callback("https://me:s3cr%40t@mlflow.example:5000/", "quickstart-1")
    assert callback.tracking_uri == "https://mlflow.example:5000/"
    assert b"s3cr" not in ray.cloudpickle.dumps(callback)
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "me"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr@t"


def test_a_sweep_with_mlflow_uri_stops_before_any_data_work_when_mlflow_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("mlflow", "mlflow.exceptions", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)
    config = load_sweep_config(
        None, [f"storage_path={tmp_path}", "mlflow_uri=http://127.0.0.1:5000"]
    )
    with pytest.raises(SweepConfigError, match=r"mlflow_uri: .*cxrtune\[mlflow\]"):
        run_sweep(config, name="no-mlflow")
    assert list(tmp_path.iterdir()) == []


def test_the_mlflow_uri_key_defaults_to_none_and_takes_a_string() -> None:
    assert load_sweep_config(None).mlflow_uri is None
    assert load_sweep_config(None, ["mlflow_uri=sqlite:///m.db"]).mlflow_uri == "sqlite:///m.db"
    with pytest.raises(SweepConfigError, match="mlflow_uri"):
        load_sweep_config(None, ["mlflow_uri=3"])


def write_trial(experiment: Path, trial_id: str, aucs: list[float]) -> None:
    """A trial folder reporting one epoch per val macro AUC, with a checkpoint each."""
    directory = experiment / f"{trial_id}_baseline_cnn"
    directory.mkdir(parents=True)
    (directory / PARAMS_FILE).write_text(json.dumps({"family": "baseline_cnn"}))
    lines = []
    for index, auc in enumerate(aucs):
        name = f"checkpoint_{index:06d}"
        (directory / name).mkdir()
        (directory / name / "checkpoint.pt").write_bytes(b"weights")
        result = {
            "trial_id": trial_id,
            "epoch": index + 1,
            "val_covid_recall": 0.5,
            "val_macro_auc": auc,
            "checkpoint_dir_name": name,
        }
        lines.append(json.dumps(result))
    (directory / RESULTS_FILE).write_text("\n".join(lines) + "\n")


@pytest.fixture
def experiment_with_leaderboard(tmp_path: Path) -> Path:
    """An experiment dir "exp" of three trials ranked 1e100000, aaa00000, bbb00000.

    Trial 1e100000 did best at its first epoch of two.
    """
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / SWEEP_FILE).write_text(yaml.safe_dump({"scheduler_metric": "val_macro_auc"}))
    dataset = {
        "root": "x",
        "synthetic": True,
        "layout": "imagefolder",
        "cache_path": "x",
        "image_size": 32,
        "class_names": ["COVID", "Normal"],
        "positive_class": "COVID",
        "split_counts": {},
    }
    (experiment / DATASET_FILE).write_text(json.dumps(dataset))
    (experiment / SPLITS_FILE).write_text("path,label,group,split,sha256\n")
    ranking = ["1e100000", "aaa00000", "bbb00000"]  # the first reads as a float in a CSV
    write_trial(experiment, "1e100000", [0.9, 0.6])
    write_trial(experiment, "aaa00000", [0.8])
    write_trial(experiment, "bbb00000", [0.7])
    leaderboard = pd.DataFrame({"rank": [1, 2, 3], "trial_id": ranking})
    leaderboard.to_csv(experiment / LEADERBOARD_CSV, index=False)
    return experiment


def make_runs(uri: str, experiment: str, trial_ids: list[str]) -> dict[str, str]:
    """MLflow runs as Ray's MLflowLoggerCallback names them; trial id -> run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment)
    runs = {}
    for trial_id in trial_ids:
        name = f"train_trial_{trial_id}"
        run = client.create_run(experiment_id, run_name=name, tags={"trial_name": name})
        runs[trial_id] = run.info.run_id
    return runs


@pytest.fixture
def file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file://{tmp_path / 'mlruns'}"


def test_the_top_trials_get_their_chosen_checkpoint_as_a_model_artifact_and_their_rank(
    experiment_with_leaderboard: Path, file_store: str
) -> None:
    from mlflow.tracking import MlflowClient

    runs = make_runs(file_store, "exp", ["bbb00000", "aaa00000", "1e100000"])
    logged = log_top_models(experiment_with_leaderboard, file_store, top=2)
    assert logged == {"1e100000": runs["1e100000"], "aaa00000": runs["aaa00000"]}
    client = MlflowClient(tracking_uri=file_store)
    for rank, trial_id in enumerate(["1e100000", "aaa00000"], start=1):
        (artifact,) = client.list_artifacts(runs[trial_id], MODEL_ARTIFACT)
        assert artifact.path == f"{MODEL_ARTIFACT}/checkpoint.pt"
        tags = client.get_run(runs[trial_id]).data.tags
        assert tags["leaderboard_rank"] == str(rank)
        assert tags["checkpoint"] == "checkpoint_000000"  # the best epoch's, not the last
    assert client.list_artifacts(runs["bbb00000"]) == []


def test_a_ranked_trial_without_an_mlflow_run_is_an_error_naming_it(
    experiment_with_leaderboard: Path, file_store: str
) -> None:
    make_runs(file_store, "exp", ["1e100000"])
    with pytest.raises(MLflowError, match="aaa00000"):
        log_top_models(experiment_with_leaderboard, file_store, top=3)


def test_an_experiment_without_a_leaderboard_is_an_error(
    experiment_with_leaderboard: Path, file_store: str
) -> None:
    (experiment_with_leaderboard / LEADERBOARD_CSV).unlink()
    with pytest.raises(ExperimentError, match="leaderboard"):
        log_top_models(experiment_with_leaderboard, file_store)
