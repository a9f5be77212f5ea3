"""Test evaluation reads the images the sweep split, or refuses (issue item 5)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrtune.analysis.evaluation import EvaluationSet
from cxrtune.analysis.experiment import DatasetInfo, read_experiment
from cxrtune.analysis.leaderboard import TEST_COLUMNS, build_leaderboard
from cxrtune.search.cli import EXIT_BAD_INPUT, EXIT_OK, main
from cxrtune.search.config import load_sweep_config
from cxrtune.search.sweep import prepare_data, write_experiment_files
from cxrtune.trainables.checkpoints import save_checkpoint
from cxrtune.trainables.config import TrialConfig
from cxrtune.trainables.data import DataError, read_cache, write_cache
from cxrtune.trainables.models import create_model

SIZE = 32


def write_trained_trial(experiment: Path, info: DatasetInfo) -> None:
    """One trial folder with one reported epoch and its checkpoint."""
    trial = experiment / "t1_baseline_cnn"
    checkpoint = trial / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    config = TrialConfig(family="baseline_cnn", lr=1e-3, batch_size=8, imbalance="none")
    (trial / "params.json").write_text(json.dumps(config.to_dict()))
    torch.manual_seed(0)
    model = create_model(config, len(info.class_names), SIZE)
    save_checkpoint(
        checkpoint,
        model=model,
        optimizer=torch.optim.Adam(model.parameters()),
        config=config,
        epoch=1,
        generator=torch.Generator(),
        class_names=tuple(info.class_names),
        image_size=SIZE,
        metrics={},
    )
    row = {
        "trial_id": "t1",
        "epoch": 1,
        "val_covid_recall": 0.5,
        "val_macro_auc": 0.7,
        "checkpoint_dir_name": checkpoint.name,
    }
    (trial / "result.json").write_text(json.dumps(row) + "\n")


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    """An experiment dir of the synthetic set, written as a sweep writes it, with one trial."""
    config = load_sweep_config(
        None,
        [f"image_size={SIZE}", "synthetic.n=240", f"synthetic.size={SIZE}", "synthetic.seed=3"],
    )
    directory = tmp_path / "exp"
    write_experiment_files(directory, config, prepare_data(config))
    write_trained_trial(directory, DatasetInfo.read(directory / "dataset.json"))
    return directory


def first_test_image(experiment: Path) -> str:
    splits = pd.read_csv(experiment / "splits.csv", keep_default_na=False)
    return str(splits.loc[splits["split"] == "test", "path"].iloc[0])


def test_an_image_changed_after_the_sweep_stops_the_leaderboard_naming_it(
    experiment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = read_experiment(experiment).dataset
    Path(info.cache_path).unlink()  # so the images are decoded again from the folder
    changed = first_test_image(experiment)
    image = Path(info.root) / changed
    pixels = np.asarray(Image.open(image).convert("L"))
    Image.fromarray(255 - pixels).save(image)

    assert main(["leaderboard", str(experiment)]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "1 image(s)" in error and "changed since the sweep started" in error
    assert changed in error and "Traceback" not in error
    assert not (experiment / "leaderboard.csv").exists()
    assert not (experiment / "t1_baseline_cnn" / "evaluation.json").exists()

    assert main(["report", str(experiment), "--out", str(experiment.parent / "report")]) == 2
    assert changed in capsys.readouterr().err


def test_a_cache_whose_labels_differ_from_the_split_is_refused(experiment: Path) -> None:
    info = read_experiment(experiment).dataset
    cached = read_cache(Path(info.cache_path))
    changed = first_test_image(experiment)
    index = cached.paths.index(changed)
    labels = cached.labels.copy()
    labels[index] = (labels[index] + 1) % len(cached.class_names)
    write_cache(dataclasses.replace(cached, labels=labels), Path(info.cache_path))
    with pytest.raises(DataError, match=rf"changed since the sweep started.*{changed}"):
        EvaluationSet.load(info, experiment / "splits.csv")


def test_a_class_added_after_the_sweep_is_refused(experiment: Path) -> None:
    info = read_experiment(experiment).dataset
    Path(info.cache_path).unlink()
    extra = Path(info.root) / "Tuberculosis"
    extra.mkdir()
    for index in range(3):
        Image.fromarray(np.full((SIZE, SIZE), 40 * index, dtype=np.uint8)).save(
            extra / f"{index}.png"
        )
    with pytest.raises(DataError, match=r"classes of .* are now .*Tuberculosis"):
        EvaluationSet.load(info, experiment / "splits.csv")


def test_unchanged_images_decoded_again_give_the_cached_evaluation(experiment: Path) -> None:
    from_cache = build_leaderboard(read_experiment(experiment)).ranked
    (experiment / "t1_baseline_cnn" / "evaluation.json").unlink()
    Path(read_experiment(experiment).dataset.cache_path).unlink()
    decoded_again = build_leaderboard(read_experiment(experiment)).ranked
    assert not decoded_again[list(TEST_COLUMNS)].isna().all(axis=None)
    pd.testing.assert_frame_equal(from_cache, decoded_again)
    assert main(["leaderboard", str(experiment)]) == EXIT_OK
    assert not math.isnan(pd.read_csv(experiment / "leaderboard.csv")["test_macro_auc"].iloc[0])
