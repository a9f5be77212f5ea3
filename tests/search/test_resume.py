"""Resuming a sweep: the data are rebuilt identically, or refused; a broken dir is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrtune.search.cli import EXIT_BAD_INPUT, main
from cxrtune.search.config import SweepConfig, load_sweep_config
from cxrtune.search.sweep import (
    UNRECORDED_TRIALS_DIR,
    prepare_data,
    prepare_resumed_data,
    set_aside_unrecorded_trials,
    write_experiment_files,
)
from cxrtune.trainables.data import DataError


@pytest.fixture
def started_sweep(tmp_path: Path) -> tuple[SweepConfig, Path]:
    """The files a sweep writes into its experiment dir before any trial runs."""
    config = load_sweep_config(
        None, ["image_size=32", "synthetic.n=240", "synthetic.size=32", f"storage_path={tmp_path}"]
    )
    directory = tmp_path / "started"
    write_experiment_files(directory, config, prepare_data(config))
    return config, directory


def test_resumed_trials_get_the_same_train_and_val_arrays(
    started_sweep: tuple[SweepConfig, Path],
) -> None:
    config, directory = started_sweep
    original = prepare_data(config).trial_data()
    resumed = prepare_resumed_data(config, directory).trial_data()
    for name in ("train_images", "train_labels", "val_images", "val_labels"):
        assert np.array_equal(getattr(resumed, name), getattr(original, name)), name
    assert resumed.class_names == original.class_names
    assert resumed.positive_index == original.positive_index


def test_an_image_whose_content_changed_is_refused(started_sweep: tuple[SweepConfig, Path]) -> None:
    config, directory = started_sweep
    splits = pd.read_csv(directory / "splits.csv", keep_default_na=False)
    splits.loc[3, "content_hash"] = "0" * 64
    splits.to_csv(directory / "splits.csv", index=False)
    with pytest.raises(DataError, match=r"1 image.* changed since the sweep started"):
        prepare_resumed_data(config, directory)


def test_an_image_that_is_gone_is_refused(started_sweep: tuple[SweepConfig, Path]) -> None:
    config, directory = started_sweep
    splits = pd.read_csv(directory / "splits.csv", keep_default_na=False)
    splits.loc[0, "path"] = "COVID/not-there.png"
    splits.to_csv(directory / "splits.csv", index=False)
    with pytest.raises(DataError, match="no longer has"):
        prepare_resumed_data(config, directory)


def test_resuming_a_dir_without_ray_state_exits_2_naming_the_file(
    started_sweep: tuple[SweepConfig, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, directory = started_sweep
    assert main(["resume", str(directory)]) == EXIT_BAD_INPUT
    assert "tuner.pkl is missing" in capsys.readouterr().err
    assert main(["resume", str(directory / "elsewhere")]) == EXIT_BAD_INPUT
    assert "experiment dir not found" in capsys.readouterr().err


def test_resuming_a_dir_whose_journal_holds_no_study_exits_2(
    started_sweep: tuple[SweepConfig, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, directory = started_sweep
    for name in ("tuner.pkl", "optuna_study.journal", "experiment_state-2026-01-05_10-00-00.json"):
        (directory / name).write_text("")
    assert main(["resume", str(directory)]) == EXIT_BAD_INPUT
    assert "holds no study 'cxrtune'" in capsys.readouterr().err


def test_trials_the_snapshot_lacks_are_set_aside_with_their_staged_result_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the killed driver's cluster, Ray's staging folder still holds such trials' results.

    The resumed driver reuses that folder and uploads it, so the results are moved
    beside the checkpoints, not left to come back as a trial of their own.
    """
    experiment, staging = tmp_path / "experiment", tmp_path / "staging"
    for folder, files in {
        experiment / "aaaa0001_baseline_cnn": ["checkpoint_000000/checkpoint.pt", "result.json"],
        experiment / "bbbb0002_baseline_cnn": ["checkpoint_000000/checkpoint.pt"],
        staging / "aaaa0001_baseline_cnn": ["result.json"],
        staging / "bbbb0002_baseline_cnn": ["result.json", "params.json"],
        staging / "cccc0003_vgg16": ["result.json"],  # started; no checkpoint yet
    }.items():
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(f"{folder.parent.name}:{name}")
    (experiment / "sweep.yaml").write_text("kept")

    set_aside_unrecorded_trials(experiment, {"aaaa0001_baseline_cnn"}, staging)

    aside = experiment / UNRECORDED_TRIALS_DIR
    assert sorted(path.name for path in aside.iterdir()) == [
        "bbbb0002_baseline_cnn",
        "cccc0003_vgg16",
    ]
    assert sorted(
        str(path.relative_to(aside / "bbbb0002_baseline_cnn"))
        for path in (aside / "bbbb0002_baseline_cnn").rglob("*")
        if path.is_file()
    ) == ["checkpoint_000000/checkpoint.pt", "params.json", "result.json"]
    assert sorted(path.name for path in staging.iterdir()) == ["aaaa0001_baseline_cnn"]
    assert (experiment / "aaaa0001_baseline_cnn" / "result.json").is_file()
    assert (experiment / "sweep.yaml").read_text() == "kept"
    assert capsys.readouterr().out.count("was not in Ray's last snapshot") == 2


def test_the_restored_results_are_dropped_where_this_ray_keeps_them() -> None:
    """Guards ``forget_restored_results`` against a Ray that moved them: it would do nothing."""
    from ray import tune

    from cxrtune.search.sweep import forget_restored_results

    tuner = tune.Tuner(lambda config: None)
    local_tuner = tuner._local_tuner
    assert hasattr(local_tuner, "_experiment_analysis")  # Ray's own, set in its __init__
    local_tuner._experiment_analysis = object()  # what Tuner.restore puts there
    forget_restored_results(tuner)
    assert local_tuner._experiment_analysis is None
