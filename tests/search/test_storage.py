"""A sweep's storage on S3 (a moto server on loopback), without Ray running."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from cxrtune.analysis.experiment import (
    DATASET_FILE,
    INGEST_REPORT_JSON,
    INGEST_REPORT_TEXT,
    OPTUNA_JOURNAL,
    OPTUNA_STUDY_NAME,
    SPLITS_FILE,
    SWEEP_FILE,
    optuna_journal,
)
from cxrtune.analysis.storage import RemoteDir, StorageError, driver_files_dir
from cxrtune.search import tuner
from cxrtune.search.cli import EXIT_BAD_INPUT
from cxrtune.search.config import SweepConfigError, load_sweep_config
from cxrtune.search.sweep import experiment_dir_for, prepare_data, write_experiment_files
from cxrtune.search.tuner import JOURNAL_UPLOAD_INTERVAL_S, JournalUpload, journal_storage
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


def run_trials(study: optuna.Study, upload: JournalUpload, count: int) -> None:
    """``count`` trials asked, told and ended, as the searcher and Tune do in a sweep."""
    for number in range(count):
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True)
        trial.suggest_categorical("family", ["baseline_cnn", "vgg16"])
        study.tell(trial, [0.5 + number / 1000, 0.7])
        upload.on_trial_complete(iteration=number, trials=[], trial=None)


def new_study(journal: Path) -> optuna.Study:
    journal.parent.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=OPTUNA_STUDY_NAME,
        storage=journal_storage(journal),
        directions=["maximize", "maximize"],
    )


def fetched_journal(experiment: RemoteDir, local_dir: Path) -> bytes:
    """The journal as a reader of the remote experiment dir joins it."""
    assert optuna_journal(experiment).fetch(experiment.files(), local_dir)
    return (local_dir / OPTUNA_JOURNAL).read_bytes()


@pytest.fixture
def bytes_sent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every object written to the store, in order."""
    sent: list[int] = []
    write = RemoteDir.upload_bytes

    def counting(self: RemoteDir, data: bytes, relative_path: str, source: Path) -> None:
        write(self, data, relative_path, source)
        sent.append(len(data))

    monkeypatch.setattr(RemoteDir, "upload_bytes", counting)
    monkeypatch.setattr(RemoteDir, "upload", lambda *args: pytest.fail("a whole-file upload"))
    return sent


def test_the_journal_bytes_sent_grow_linearly_with_the_trials(
    s3_bucket: str, tmp_path: Path, bytes_sent: list[int]
) -> None:
    journal = tmp_path / "driver" / OPTUNA_JOURNAL
    study = new_study(journal)
    experiment = RemoteDir.open(f"{s3_bucket}/results/exp-1")
    upload = JournalUpload(journal, experiment, interval_s=0)  # an upload per trial end
    upload.setup()
    sizes_at_trial_ends = []
    for _ in range(30):
        run_trials(study, upload, 1)
        sizes_at_trial_ends.append(journal.stat().st_size)
    segments_sent = sum(bytes_sent)
    upload.on_experiment_end(trials=[])

    final_size = journal.stat().st_size
    assert segments_sent == final_size  # each byte once; whole copies would send the sum:
    assert sum(sizes_at_trial_ends) > 10 * final_size
    assert sum(bytes_sent) == 2 * final_size  # plus the one compaction at the end
    assert [file.relative_path for file in experiment.files()] == [OPTUNA_JOURNAL]
    assert fetched_journal(experiment, tmp_path / "reader") == journal.read_bytes()


def test_a_failed_upload_only_warns_and_the_next_one_carries_its_bytes(
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    journal = tmp_path / "driver" / OPTUNA_JOURNAL
    study = new_study(journal)
    experiment = RemoteDir.open(f"{s3_bucket}/results/exp-1")
    upload = JournalUpload(journal, experiment, interval_s=0)
    upload.setup()
    run_trials(study, upload, 3)
    write = RemoteDir.upload_bytes

    def refuse_once(self: RemoteDir, data: bytes, relative_path: str, source: Path) -> None:
        monkeypatch.setattr(RemoteDir, "upload_bytes", write)
        raise StorageError(f"cannot upload {source} to {self.display}: store unreachable")

    monkeypatch.setattr(RemoteDir, "upload_bytes", refuse_once)
    with caplog.at_level(logging.WARNING):
        run_trials(study, upload, 1)
    assert "store unreachable" in caplog.text and str(journal) in caplog.text
    run_trials(study, upload, 3)
    # The driver dies here: no compaction, the journal is left in segments.

    assert fetched_journal(experiment, tmp_path / "reader") == journal.read_bytes()
    reread = optuna.load_study(
        study_name=OPTUNA_STUDY_NAME, storage=journal_storage(tmp_path / "reader" / OPTUNA_JOURNAL)
    )
    assert [trial.values for trial in reread.trials] == [trial.values for trial in study.trials]
    assert len(reread.trials) == 7


def test_a_store_that_is_gone_only_warns(
    s3_environment: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / OPTUNA_JOURNAL
    journal.write_text('{"op_code": 0}\n')
    gone = JournalUpload(journal, RemoteDir.open("s3://no-such-bucket/results/exp-1"))
    with caplog.at_level(logging.WARNING):
        gone.setup()
        gone.on_experiment_end(trials=[])
    assert "cannot upload" in caplog.text and str(journal) in caplog.text


def test_a_crash_between_compacting_and_deleting_the_segments_reads_the_same(
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    journal = tmp_path / "driver" / OPTUNA_JOURNAL
    study = new_study(journal)
    experiment = RemoteDir.open(f"{s3_bucket}/results/exp-1")
    upload = JournalUpload(journal, experiment, interval_s=0)
    upload.setup()
    run_trials(study, upload, 4)

    def crash(self: RemoteDir, relative_path: str) -> None:
        raise StorageError(f"cannot delete {relative_path} in {self.display}: connection lost")

    monkeypatch.setattr(RemoteDir, "delete_folder", crash)
    with caplog.at_level(logging.WARNING):
        upload.on_experiment_end(trials=[])
    assert "connection lost" in caplog.text
    remote = {file.relative_path for file in experiment.files()}
    assert OPTUNA_JOURNAL in remote and len(remote) > 1  # the whole copy and the segments
    assert fetched_journal(experiment, tmp_path / "reader") == journal.read_bytes()


def test_the_journal_goes_up_on_a_timer_and_at_once_when_a_trial_errors(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bytes_sent: list[int]
) -> None:
    now = [1000.0]
    monkeypatch.setattr(tuner.time, "monotonic", lambda: now[0])
    journal = tmp_path / "driver" / OPTUNA_JOURNAL
    study = new_study(journal)
    experiment = RemoteDir.open(f"{s3_bucket}/results/exp-1")
    upload = JournalUpload(journal, experiment)
    upload.setup()
    assert len(bytes_sent) == 1  # the study's creation, when the sweep starts

    now[0] += JOURNAL_UPLOAD_INTERVAL_S - 1
    run_trials(study, upload, 5)
    upload.on_step_end(iteration=1, trials=[])
    assert len(bytes_sent) == 1  # within the interval, the trial ends wait
    now[0] += 1
    upload.on_step_end(iteration=2, trials=[])
    assert len(bytes_sent) == 2  # all five trials in one segment
    assert fetched_journal(experiment, tmp_path / "reader") == journal.read_bytes()

    run_trials(study, upload, 1)
    upload.on_trial_error(iteration=3, trials=[], trial=None)
    assert len(bytes_sent) == 3
    assert fetched_journal(experiment, tmp_path / "reader") == journal.read_bytes()


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
