"""Issue item 12: leaderboard, report, export and predict unpickle nothing an experiment dir holds.

Only ``cxrtune resume`` unpickles (Ray's ``tuner.pkl``), as the README says. Every
pickle Ray keeps in the dir is replaced by one that creates a marker file when
unpickled; checkpoint and weights files that are such pickles are refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrtune.search.cli import EXIT_BAD_INPUT, EXIT_OK, main
from tests.analysis.test_leaderboard import SIZE, make_experiment
from tests.conftest import write_png
from tests.untrusted import LeavesMarker, marker_pickle, plant_pickles


def test_the_planted_pickle_creates_its_marker_when_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    pickle.loads(marker_pickle(marker))
    assert marker.exists()


def test_the_analysis_commands_unpickle_none_of_rays_pickles_item_12(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = make_experiment(tmp_path)
    marker = tmp_path / "unpickled"
    plant_pickles(experiment, marker)
    model = tmp_path / "model"
    image = write_png(tmp_path / "x.png", np.full((SIZE, SIZE), 90, dtype=np.uint8))

    assert main(["leaderboard", str(experiment)]) == EXIT_OK
    assert main(["report", str(experiment), "--out", str(tmp_path / "report")]) == EXIT_OK
    assert main(["export", str(experiment), "--ensemble", "2", "--out", str(model)]) == EXIT_OK
    assert main(["predict", str(model), str(image)]) == EXIT_OK
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


def test_checkpoint_and_weights_files_that_are_pickle_traps_are_refused_item_12(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = make_experiment(tmp_path)
    marker = tmp_path / "unpickled"
    # t2's chosen checkpoint, its checksum matching: only how it is loaded can stop it.
    checkpoint = experiment / "t2_regularized_cnn" / "checkpoint_000001"
    torch.save(LeavesMarker(marker), checkpoint / "checkpoint.pt")
    digest = hashlib.sha256((checkpoint / "checkpoint.pt").read_bytes()).hexdigest()
    (checkpoint / "checkpoint.sha256").write_text(f"{digest}  checkpoint.pt\n")

    assert main(["leaderboard", str(experiment), "--format", "csv"]) == EXIT_OK
    assert "t2" not in capsys.readouterr().out.split("\n", 1)[1]
    assert main(["export", str(experiment), "--trial", "t2", "--out", str(tmp_path / "t2")]) == 2
    error = capsys.readouterr().err
    assert "checkpoint_000001/checkpoint.pt cannot be read" in error and "could run code" in error

    model = tmp_path / "model"
    assert main(["export", str(experiment), "--rank", "1", "--out", str(model)]) == EXIT_OK
    description = json.loads((model / "model.json").read_text())
    weights = model / description["members"][0]["weights"]
    torch.save(LeavesMarker(marker), weights)
    description["members"][0]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (model / "model.json").write_text(json.dumps(description))
    image = write_png(tmp_path / "x.png", np.full((SIZE, SIZE), 90, dtype=np.uint8))
    assert main(["predict", str(model), str(image)]) == EXIT_BAD_INPUT
    assert "cannot be loaded: it holds more than tensors" in capsys.readouterr().err
    assert not marker.exists()
