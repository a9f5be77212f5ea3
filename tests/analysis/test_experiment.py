from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cxrtune.analysis.experiment import (
    MIRRORED_TRIAL_FILES,
    OPTUNA_JOURNAL,
    OPTUNA_JOURNAL_SEGMENTS,
    DatasetInfo,
    ExperimentError,
    local_experiment_dir,
    optuna_journal,
    read_experiment,
    read_trial,
)
from cxrtune.analysis.leaderboard import EVALUATION_FILE
from cxrtune.analysis.storage import AppendUpload, RemoteDir, mirror_dir

# The files the analysis needs, as a fake experiment below lays them out.
NEEDED = {
    "sweep.yaml",
    "dataset.json",
    "splits.csv",
    "optuna_study.journal",
    "t1_baseline_cnn/params.json",
    "t1_baseline_cnn/result.json",
    "t1_baseline_cnn/checkpoint_000001/checkpoint.pt",  # the best val_macro_auc
    "t2_vgg16/params.json",
    "t2_vgg16/result.json",
    "t2_vgg16/error.txt",
}


def epoch(number: int, auc: float) -> str:
    name = f"checkpoint_{number - 1:06d}"
    return json.dumps({"epoch": number, "val_macro_auc": auc, "checkpoint_dir_name": name})


def write_fake_experiment(directory: Path) -> None:
    """An experiment dir as a finished sweep leaves it, Ray's own files included."""
    directory.mkdir(parents=True)
    (directory / "sweep.yaml").write_text("scheduler_metric: val_macro_auc\n")
    DatasetInfo(
        root="/data",
        synthetic=True,
        layout="imagefolder",
        cache_path="/cache/x.npz",
        image_size=32,
        class_names=["COVID", "Normal"],
        positive_class="COVID",
        split_counts={"train": {"COVID": 2, "Normal": 2}},
    ).write(directory / "dataset.json")
    (directory / "splits.csv").write_text("path,label,split\na.png,COVID,train\n")
    (directory / "optuna_study.journal").write_text('{"op_code": 0}\n')
    (directory / "experiment_state-2026.json").write_text("{}")
    (directory / "tuner.pkl").write_bytes(b"ray")
    trial = directory / "t1_baseline_cnn"
    for index in range(3):
        (trial / f"checkpoint_{index:06d}").mkdir(parents=True)
        (trial / f"checkpoint_{index:06d}" / "checkpoint.pt").write_bytes(bytes([index]) * 64)
    (trial / "params.json").write_text('{"family": "baseline_cnn"}')
    (trial / "result.json").write_text("\n".join([epoch(1, 0.6), epoch(2, 0.8), epoch(3, 0.7)]))
    (trial / "progress.csv").write_text("epoch\n1\n")
    (trial / "events.out.tfevents.1.host").write_bytes(b"tb")
    failed = directory / "t2_vgg16"
    (failed / "checkpoint_000000").mkdir(parents=True)
    (failed / "checkpoint_000000" / "checkpoint.pt").write_bytes(b"w")
    (failed / "params.json").write_text('{"family": "vgg16"}')
    (failed / "result.json").write_text(epoch(1, 0.9))
    (failed / "error.txt").write_text("RuntimeError: loss is nan\n")


@pytest.fixture
def remote_experiment(s3_bucket: str, tmp_path: Path) -> RemoteDir:
    """A finished experiment uploaded to a bucket on the loopback S3 server."""
    local = tmp_path / "written" / "exp-1"
    write_fake_experiment(local)
    experiment = RemoteDir.open(f"{s3_bucket}/results/exp-1")
    files = [path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()]
    experiment.upload_files(local, files)
    return experiment


def local_files(directory: Path) -> set[str]:
    return {
        path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file()
    }


def test_a_local_experiment_dir_is_used_in_place(tmp_path: Path) -> None:
    write_fake_experiment(tmp_path / "exp")
    with local_experiment_dir(tmp_path / "exp") as directory:
        assert directory == tmp_path / "exp"


def test_the_mirror_holds_what_the_analysis_reads_and_only_the_chosen_checkpoint(
    remote_experiment: RemoteDir,
) -> None:
    with local_experiment_dir(remote_experiment.uri) as directory:
        assert directory == mirror_dir(remote_experiment)
        assert directory.name == "exp-1"
        assert local_files(directory) == NEEDED
        experiment = read_experiment(directory)
    assert [trial.trial_id for trial in experiment.trials] == ["t1", "t2"]
    assert experiment.trials[1].error == "RuntimeError: loss is nan"


def test_files_written_in_the_mirror_go_back_to_the_store(remote_experiment: RemoteDir) -> None:
    with local_experiment_dir(remote_experiment.uri) as directory:
        (directory / "leaderboard.csv").write_text("rank,trial_id\n1,t1_baseline_cnn\n")
        (directory / "t1_baseline_cnn" / EVALUATION_FILE).write_text('{"checkpoint": "c"}')
    remote = {file.relative_path for file in remote_experiment.files()}
    assert {"leaderboard.csv", f"t1_baseline_cnn/{EVALUATION_FILE}"} <= remote
    fresh = mirror_dir(remote_experiment).parent / "fresh"
    uploaded = {file.relative_path: file for file in remote_experiment.files()}
    remote_experiment.download(uploaded["leaderboard.csv"], fresh)
    assert (fresh / "leaderboard.csv").read_text() == "rank,trial_id\n1,t1_baseline_cnn\n"


def test_nothing_goes_back_when_the_block_fails(remote_experiment: RemoteDir) -> None:
    with (
        pytest.raises(RuntimeError, match="evaluation failed"),
        local_experiment_dir(remote_experiment.uri) as directory,
    ):
        (directory / "leaderboard.csv").write_text("half written")
        raise RuntimeError("evaluation failed")
    assert "leaderboard.csv" not in {file.relative_path for file in remote_experiment.files()}


def test_the_mirror_follows_the_store_when_it_changes(
    remote_experiment: RemoteDir, tmp_path: Path
) -> None:
    with local_experiment_dir(remote_experiment.uri):
        pass
    # The sweep went on: trial 1 reported a better epoch 4; trial 2 was deleted.
    changed = tmp_path / "changed"
    results = changed / "t1_baseline_cnn" / "result.json"
    results.parent.mkdir(parents=True)
    results.write_text("\n".join([epoch(1, 0.6), epoch(2, 0.8), epoch(3, 0.7), epoch(4, 0.95)]))
    (changed / "t1_baseline_cnn" / "checkpoint_000003").mkdir()
    (changed / "t1_baseline_cnn" / "checkpoint_000003" / "checkpoint.pt").write_bytes(b"best")
    remote_experiment.upload_files(
        changed, ["t1_baseline_cnn/result.json", "t1_baseline_cnn/checkpoint_000003/checkpoint.pt"]
    )
    remote_experiment.filesystem.delete_dir(f"{remote_experiment.path}/t2_vgg16")

    with local_experiment_dir(remote_experiment.uri) as directory:
        files = local_files(directory)
        assert "t1_baseline_cnn/checkpoint_000003/checkpoint.pt" in files
        assert not [path for path in files if path.startswith("t2_vgg16/")]
        assert len(read_experiment(directory).trials[0].results) == 4


def test_the_mirror_joins_a_journal_left_in_segments_and_follows_its_compaction(
    s3_bucket: str, tmp_path: Path
) -> None:
    """A sweep that is running, or whose driver died, has its journal in segments."""
    local = tmp_path / "written" / "exp-1"
    write_fake_experiment(local)
    journal = local / OPTUNA_JOURNAL
    journal.unlink()
    files = [path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()]
    experiment = RemoteDir.open(f"{s3_bucket}/results/exp-1")
    experiment.upload_files(local, files)
    upload = AppendUpload(journal, optuna_journal(experiment))
    for line in ('{"op_code": 0}\n', '{"op_code": 4}\n', '{"op_code": 5}\n'):
        with journal.open("a") as appending:
            appending.write(line)
        upload.upload_appended()

    with local_experiment_dir(experiment.uri) as directory:
        assert local_files(directory) == NEEDED
        assert (directory / OPTUNA_JOURNAL).read_bytes() == journal.read_bytes()
    with journal.open("a") as appending:
        appending.write('{"op_code": 6}\n')
    upload.compact()
    with local_experiment_dir(experiment.uri) as directory:
        assert (directory / OPTUNA_JOURNAL).read_bytes() == journal.read_bytes()
    assert OPTUNA_JOURNAL_SEGMENTS not in {
        file.relative_path.split("/")[0] for file in experiment.files()
    }


def test_the_mirror_fetches_the_latest_tied_checkpoint_the_store_still_has_item_2(
    s3_bucket: str, tmp_path: Path
) -> None:
    """Issue item 2: of tied epochs, the one whose checkpoint Ray kept is fetched."""
    local = tmp_path / "written" / "exp-1"
    write_fake_experiment(local)
    trial = local / "t1_baseline_cnn"
    (trial / "result.json").write_text("\n".join([epoch(1, 0.8), epoch(2, 0.8), epoch(3, 0.7)]))
    shutil.rmtree(trial / "checkpoint_000000")
    experiment = RemoteDir.open(f"{s3_bucket}/results/exp-1")
    files = [path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()]
    experiment.upload_files(local, files)
    with local_experiment_dir(experiment.uri) as directory:
        fetched = {path for path in local_files(directory) if "/checkpoint_" in path}
        assert fetched == {"t1_baseline_cnn/checkpoint_000001/checkpoint.pt"}
        assert read_experiment(directory).trials[0].checkpoints == {"checkpoint_000001"}


def test_a_trial_records_the_checkpoint_folders_left_in_it(tmp_path: Path) -> None:
    write_fake_experiment(tmp_path / "exp")
    shutil.rmtree(tmp_path / "exp" / "t1_baseline_cnn" / "checkpoint_000001")
    (tmp_path / "exp" / "t1_baseline_cnn" / "checkpoint_000002" / "checkpoint.pt").unlink()
    trial = read_trial(tmp_path / "exp" / "t1_baseline_cnn")
    assert trial.checkpoints == {"checkpoint_000000"}


def test_a_missing_or_foreign_remote_dir_is_an_error_naming_the_uri(
    remote_experiment: RemoteDir,
) -> None:
    missing = remote_experiment.child("nothing-here")
    with (
        pytest.raises(ExperimentError, match=f"experiment dir not found: {missing.uri}"),
        local_experiment_dir(missing.uri),
    ):
        pass
    trial = remote_experiment.child("t1_baseline_cnn")
    with (
        pytest.raises(ExperimentError, match=f"{trial.uri} is not a cxrtune experiment dir"),
        local_experiment_dir(trial.uri),
    ):
        pass


def test_reading_a_uri_directly_points_to_the_mirror(remote_experiment: RemoteDir) -> None:
    with pytest.raises(ExperimentError, match="is remote: read it through local_experiment_dir"):
        read_experiment(remote_experiment.uri)


def test_the_leaderboards_saved_predictions_are_mirrored() -> None:
    assert EVALUATION_FILE in MIRRORED_TRIAL_FILES


FAILURE = (
    "Failure # 1 (occurred at 2026-01-05_10-00-30)\n"
    "The actor is unavailable: RpcError: Socket closed\n"
)


def trial_folder(tmp_path: Path, dates: list[str], error: str) -> Path:
    folder = tmp_path / "a1b2c3d4_baseline_cnn"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"family": "baseline_cnn"}))
    rows = [
        {"trial_id": "a1b2c3d4", "epoch": epoch, "date": date}
        for epoch, date in enumerate(dates, 1)
    ]
    (folder / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "error.txt").write_text(error)
    return folder


def test_a_trial_that_reported_after_its_retried_failure_is_not_errored(tmp_path: Path) -> None:
    folder = trial_folder(tmp_path, ["2026-01-05_10-00-10", "2026-01-05_10-00-45"], FAILURE)
    assert read_trial(folder).error is None


def test_a_trial_that_failed_after_its_last_report_keeps_its_error(tmp_path: Path) -> None:
    second = FAILURE + "Failure # 2 (occurred at 2026-01-05_10-01-00)\nNonFiniteLossError: nan\n"
    folder = trial_folder(tmp_path, ["2026-01-05_10-00-10", "2026-01-05_10-00-45"], second)
    assert "NonFiniteLossError" in str(read_trial(folder).error)


def test_an_error_without_tunes_failure_header_stands(tmp_path: Path) -> None:
    folder = trial_folder(tmp_path, ["2026-01-05_10-00-10"], "NonFiniteLossError: nan\n")
    assert read_trial(folder).error == "NonFiniteLossError: nan"


def test_a_trial_that_ended_itself_on_its_own_failure_is_read_with_that_error(
    tmp_path: Path,
) -> None:
    """Item 8: no error.txt; the last result row holds the error, and is no epoch."""
    folder = tmp_path / "a1b2c3d4_baseline_cnn"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"family": "baseline_cnn"}))
    rows = [
        {"trial_id": "a1b2c3d4", "epoch": 1, "val_macro_auc": 0.6},
        {"trial_id": "a1b2c3d4", "trial_error": "NonFiniteLossError: loss became nan"},
    ]
    (folder / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    record = read_trial(folder)
    assert record.error == "NonFiniteLossError: loss became nan"
    assert record.results["epoch"].tolist() == [1]
    assert "trial_error" not in record.results


def test_a_trial_that_failed_on_its_own_before_its_first_epoch_keeps_its_id(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "a1b2c3d4_baseline_cnn"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"family": "baseline_cnn"}))
    row = {"trial_id": "a1b2c3d4", "trial_error": "ConfigError: unknown key 'drop_out'"}
    (folder / "result.json").write_text(json.dumps(row) + "\n")
    record = read_trial(folder)
    assert record.trial_id == "a1b2c3d4" and record.results.empty
    assert record.error == "ConfigError: unknown key 'drop_out'"
