"""A real sweep whose storage_path is s3:// (moto on 127.0.0.1), read back by the leaderboard."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from cxrtune.analysis.experiment import (
    LEADERBOARD_CSV,
    LEADERBOARD_MD,
    OPTUNA_JOURNAL,
    OPTUNA_JOURNAL_SEGMENTS,
    OPTUNA_STUDY_NAME,
)
from cxrtune.analysis.leaderboard import EVALUATION_FILE
from cxrtune.analysis.storage import RemoteDir
from cxrtune.search.tuner import journal_storage

pytestmark = pytest.mark.slow
NUM_SAMPLES = 3


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrtune.search.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "CXRTUNE_CACHE_DIR": str(cache)},
    )


def read_remote_text(experiment: RemoteDir, relative_path: str) -> str:
    with experiment.filesystem.open_input_stream(f"{experiment.path}/{relative_path}") as stream:
        return bytes(stream.read()).decode()


def test_a_sweep_on_s3_keeps_everything_there_and_the_leaderboard_reads_it_back(
    s3_bucket: str, tmp_path: Path
) -> None:
    storage = f"{s3_bucket}/results"
    sweep = run_cli(
        "sweep",
        "--name",
        "on-s3",
        *("--set", f"storage_path={storage}"),
        *(
            "--set",
            f"num_samples={NUM_SAMPLES}",
            "--set",
            "max_epochs=2",
            "--set",
            "grace_period=2",
        ),
        *("--set", "image_size=32", "--set", "space=quick"),
        *("--set", "synthetic.n=300", "--set", "synthetic.size=32"),
        cache=tmp_path / "driver-cache",
    )
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert f"Leaderboard written to {storage}/on-s3/leaderboard.csv" in sweep.stdout

    experiment = RemoteDir.open(f"{storage}/on-s3")
    files = {file.relative_path for file in experiment.files()}
    trials = {path.split("/")[0] for path in files if path.endswith("/params.json")}
    assert len(trials) == NUM_SAMPLES
    for trial in trials:
        assert f"{trial}/result.json" in files
        assert [path for path in files if path.startswith(f"{trial}/checkpoint_")]
        assert [path for path in files if path.endswith("checkpoint.pt")]
    for name in ("sweep.yaml", "dataset.json", "splits.csv", "ingest_report.txt", LEADERBOARD_CSV):
        assert name in files

    # Uploaded in segments as it grew, then compacted into one file optuna-dashboard opens.
    assert not [path for path in files if path.startswith(OPTUNA_JOURNAL_SEGMENTS)]
    journal = tmp_path / OPTUNA_JOURNAL
    journal.write_text(read_remote_text(experiment, OPTUNA_JOURNAL))
    study = optuna.load_study(study_name=OPTUNA_STUDY_NAME, storage=journal_storage(journal))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == NUM_SAMPLES

    # Another machine: an empty cache, and nothing the sweep's leaderboard left behind, so
    # the checkpoints must come down from the store to be evaluated again.
    for path in files:
        if path in (LEADERBOARD_CSV, LEADERBOARD_MD) or path.endswith(EVALUATION_FILE):
            experiment.filesystem.delete_file(f"{experiment.path}/{path}")
    leaderboard = run_cli("leaderboard", experiment.uri, "--format", "csv", cache=tmp_path / "new")
    assert leaderboard.returncode == 0, leaderboard.stderr[-3000:]

    printed = pd.read_csv(io.StringIO(leaderboard.stdout))
    uploaded = pd.read_csv(io.StringIO(read_remote_text(experiment, LEADERBOARD_CSV)))
    assert len(uploaded) == NUM_SAMPLES
    assert uploaded["trial_id"].tolist() == printed["trial_id"].tolist()
    assert uploaded["test_macro_auc"].notna().all()
    files_after = {file.relative_path for file in experiment.files()}
    assert len([path for path in files_after if path.endswith(EVALUATION_FILE)]) == NUM_SAMPLES
