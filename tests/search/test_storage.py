"""A sweep's storage on S3 (a moto server on loopback), without Ray running."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cxrtune.analysis.experiment import (
    DATASET_FILE,
    INGEST_REPORT_JSON,
    INGEST_REPORT_TEXT,
    OPTUNA_JOURNAL,
    SPLITS_FILE,
    SWEEP_FILE,
)
from cxrtune.analysis.storage import RemoteDir, driver_files_dir
from cxrtune.search.cli import EXIT_BAD_INPUT
from cxrtune.search.config import SweepConfigError, load_sweep_config
from cxrtune.search.sweep import experiment_dir_for, prepare_data, write_experiment_files
from cxrtune.search.tuner import JournalUpload
from tests.s3 import S3Server

TINY = ["image_size=32", "synthetic.n=200", "synthetic.size=32"]


def test_an_s3_storage_path_gives_the_experiment_uri_once_the_store_takes_writes(
    s3_bucket: str,
) -> None:
    config = load_sweep_config(None, [f"storage_path={s3_bucket}/results"])
    directory, name = experiment_dir_for(config, "exp-1")
    assert (directory, name) == (f"{s3_bucket}/results/exp-1", "exp-1")
    assert RemoteDir.open(f"{s3_bucket}/results").files() == []  # the write check cleaned up


def test_an_existing_remote_experiment_dir_is_refused_naming_it(
    s3_bucket: str, tmp_path: Path
) -> None:
    (tmp_path / "sweep.yaml").write_text("name: old\n")
    RemoteDir.open(f"{s3_bucket}/results/exp-1").upload(tmp_path / "sweep.yaml", SWEEP_FILE)
    config = load_sweep_config(None, [f"storage_path={s3_bucket}/results"])
    with pytest.raises(SweepConfigError, match=f"{s3_bucket}/results/exp-1 already exists"):
        experiment_dir_for(config, "exp-1")


def test_a_missing_bucket_stops_the_sweep_with_exit_2_before_any_data_work(
    s3_environment: S3Server,
) -> None:
    storage = "storage_path=s3://no-such-bucket/results"
    result = subprocess.run(
        [sys.executable, "-m", "cxrtune.search.cli", "sweep", "--set", storage, "--name", "exp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert "cannot write to s3://no-such-bucket/results/exp: " in result.stderr
    assert "NO_SUCH_BUCKET" in result.stderr
    assert "Traceback" not in result.stderr
    assert "synthetic" not in result.stdout.lower()  # no data was generated or decoded


def test_the_files_written_before_any_trial_reach_the_store(s3_bucket: str) -> None:
    config = load_sweep_config(None, [f"storage_path={s3_bucket}/results", *TINY])
    directory, _ = experiment_dir_for(config, "exp-1")
    experiment = RemoteDir.open(str(directory))
    stale = driver_files_dir(experiment) / OPTUNA_JOURNAL
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier sweep of the same URI\n")

    write_experiment_files(directory, config, prepare_data(config))

    written = {SWEEP_FILE, DATASET_FILE, SPLITS_FILE, INGEST_REPORT_JSON, INGEST_REPORT_TEXT}
    remote = {file.relative_path: file for file in experiment.files()}
    assert set(remote) == written
    local = driver_files_dir(experiment)
    assert {path.name for path in local.iterdir()} == written
    assert remote[SPLITS_FILE].size == (local / SPLITS_FILE).stat().st_size


def test_the_journal_goes_up_whole_and_a_failed_upload_only_warns(
    s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / OPTUNA_JOURNAL
    journal.write_text('{"op_code": 0}\n')
    experiment = RemoteDir.open(f"{s3_bucket}/results/exp-1")
    upload = JournalUpload(journal, experiment)
    upload.setup()
    journal.write_text('{"op_code": 0}\n{"op_code": 4}\n')
    upload.on_trial_complete(iteration=1, trials=[], trial=None)
    (remote,) = experiment.files()
    assert (remote.relative_path, remote.size) == (OPTUNA_JOURNAL, journal.stat().st_size)

    gone = JournalUpload(journal, RemoteDir.open("s3://no-such-bucket/results/exp-1"))
    with caplog.at_level(logging.WARNING):
        gone.on_experiment_end(trials=[])
    assert "cannot upload" in caplog.text and str(journal) in caplog.text


def test_a_sweep_with_keys_in_its_storage_uri_stops_and_writes_them_nowhere(
    tmp_path: Path, isolated_cache: Path
) -> None:
    """Item 6: exit 2 pointing at the credential chain; no sweep.yaml, no secret in the log."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "cxrtune.search.cli", "sweep", "--name", "keys"),
            *("--set", "storage_path=s3://AKEY:s3cr3tValue@bucket/results", "--set", TINY[0]),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert "s3://***@bucket/results carries credentials" in result.stderr
    assert "AWS credential chain" in result.stderr
    assert "s3cr3tValue" not in result.stdout + result.stderr and "AKEY" not in result.stderr
    assert not list(tmp_path.rglob(SWEEP_FILE)) and not list(isolated_cache.rglob(SWEEP_FILE))


def test_keys_in_the_mlflow_uri_reach_neither_sweep_yaml_nor_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 6: the files written before any trial and the sweep's output show ``***``."""
    import cxrtune.search.sweep as sweep

    class RayWouldStartHere(Exception):
        pass

    def stop(address: object) -> None:
        raise RayWouldStartHere

    monkeypatch.setattr(sweep, "start_ray", stop)
    config = load_sweep_config(
        None,
        [f"storage_path={tmp_path}", *TINY],
        {"mlflow_uri": "http://me:s3cr3tValue@127.0.0.1:5000"},
    )
    with pytest.raises(RayWouldStartHere):
        sweep.run_sweep(config, name="exp-1")
    written = (tmp_path / "exp-1" / SWEEP_FILE).read_text()
    assert "mlflow_uri: http://***@127.0.0.1:5000" in written
    output = capsys.readouterr()
    for text in (written, output.out, output.err):
        assert "s3cr3tValue" not in text
