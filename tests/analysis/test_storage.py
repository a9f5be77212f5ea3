from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import moto.settings
import pytest

from cxrtune.analysis.storage import (
    AppendedFile,
    AppendUpload,
    RemoteDir,
    StorageError,
    driver_files_dir,
    has_credentials,
    is_remote,
    joined,
    local_copy,
    mirror_dir,
    redacted,
    remote_cache_dir,
    segment_name,
)
from tests.s3 import S3Server


def test_the_storage_helpers_and_the_mirror_import_no_ray() -> None:
    code = (
        "import sys\nimport cxrtune.analysis.storage, cxrtune.analysis.experiment\n"
        "print('ray' in sys.modules)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert output.stdout.split() == ["False"], output.stderr


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("location", "remote"),
    [("s3://bucket/prefix", True), ("results", False), (Path("/mnt/nfs/results"), False)],
)
def test_only_uris_are_remote(location: str | Path, remote: bool) -> None:
    assert is_remote(location) is remote


def test_keys_in_a_uri_are_redacted_and_the_rest_kept() -> None:
    uri = "s3://AKEY:SECRET@bucket/p?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redacted(uri) == "s3://***@bucket/p?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redacted("s3://bucket/p") == "s3://bucket/p"
    assert redacted("/data/user@host/a") == "/data/user@host/a"


def test_keys_in_a_uri_query_or_an_http_uri_are_redacted_too() -> None:
    """Item 6: every place keys can sit in a URI is hidden when shown or written."""
    uri = "s3://bucket/p?access_key=AKEY&secret_key=SECRET&session_token=TOKEN&region=eu"
    shown = "s3://bucket/p?access_key=***&secret_key=***&session_token=***&region=eu"
    assert redacted(uri) == shown and has_credentials(uri)
    assert redacted("http://user:SECRET@mlflow.local:5000/") == "http://***@mlflow.local:5000/"
    assert not has_credentials("s3://bucket/p?endpoint_override=127.0.0.1:9000&scheme=http")
    assert not has_credentials("sqlite:///mlflow.db")


def test_a_file_under_a_uri_goes_before_its_query() -> None:
    uri = "s3://KEY:SECRET@bucket/results/exp?endpoint_override=127.0.0.1:9000"
    shown = "s3://***@bucket/results/exp/leaderboard.csv?endpoint_override=127.0.0.1:9000"
    assert joined(uri, "leaderboard.csv") == shown
    assert joined(Path("/results/exp"), "leaderboard.csv") == "/results/exp/leaderboard.csv"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/prefix", "gs://bucket/prefix: unsupported storage URI"),
        ("s3:///prefix", "s3:///prefix: the URI names no bucket"),
    ],
)
def test_unsupported_uris_are_refused_naming_them(
    uri: str, message: str, s3_environment: S3Server
) -> None:
    with pytest.raises(StorageError, match=message):
        RemoteDir.open(uri)


def test_a_child_keeps_the_query_of_its_parent(s3_environment: S3Server) -> None:
    storage = RemoteDir.open("s3://bucket/results?endpoint_override=127.0.0.1:9&scheme=http")
    child = storage.child("exp-1")
    assert child.uri == "s3://bucket/results/exp-1?endpoint_override=127.0.0.1:9&scheme=http"
    assert child.path == "bucket/results/exp-1"
    assert child.name == "exp-1"
    assert RemoteDir.open("s3://bucket").child("exp").path == "bucket/exp"


def test_the_local_folders_of_a_uri_are_stable_and_apart(
    isolated_cache: Path, s3_environment: S3Server
) -> None:
    experiment = RemoteDir.open("s3://KEY:ONE@bucket/results/exp-1")
    same_but_key = RemoteDir.open("s3://KEY:TWO@bucket/results/exp-1")
    other = RemoteDir.open("s3://bucket/results/exp-2")
    assert remote_cache_dir(experiment.uri) == remote_cache_dir(same_but_key.uri)
    assert remote_cache_dir(experiment.uri) != remote_cache_dir(other.uri)
    assert remote_cache_dir(experiment.uri).is_relative_to(isolated_cache)
    assert mirror_dir(experiment).name == "exp-1"
    assert driver_files_dir(experiment) != mirror_dir(experiment)


def test_files_go_up_and_come_back_whole(s3_bucket: str, tmp_path: Path) -> None:
    remote = RemoteDir.open(f"{s3_bucket}/results/exp")
    assert remote.files() == []
    source = tmp_path / "source"
    (source / "trial_1").mkdir(parents=True)
    (source / "sweep.yaml").write_text("num_samples: 3\n")
    (source / "trial_1" / "result.json").write_text('{"epoch": 1}\n')
    remote.upload_files(source, ["sweep.yaml", "trial_1/result.json"])

    listed = {file.relative_path: file for file in remote.files()}
    assert set(listed) == {"sweep.yaml", "trial_1/result.json"}
    assert listed["sweep.yaml"].size == len("num_samples: 3\n")

    copy = tmp_path / "copy"
    assert not remote.is_current(listed["trial_1/result.json"], copy)
    remote.download(listed["trial_1/result.json"], copy)
    assert (copy / "trial_1" / "result.json").read_text() == '{"epoch": 1}\n'
    assert remote.is_current(listed["trial_1/result.json"], copy)
    assert not list(copy.rglob("*.partial"))
    (copy / "trial_1" / "result.json").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    assert not remote.is_current(listed["trial_1/result.json"], copy)


def test_a_local_copy_of_a_remote_folder_lasts_the_block_and_a_local_folder_is_itself(
    s3_bucket: str, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "checkpoint #1"
    (checkpoint / "parts").mkdir(parents=True)
    (checkpoint / "model.pt").write_bytes(b"weights")
    (checkpoint / "parts" / "state.json").write_text("{}")
    remote = RemoteDir.open(f"{s3_bucket}/exp/trial/checkpoint_000001")
    remote.upload_files(checkpoint, ["model.pt", "parts/state.json"])
    with local_copy(remote.uri) as folder:
        assert folder != checkpoint
        assert (folder / "model.pt").read_bytes() == b"weights"
        assert (folder / "parts" / "state.json").read_text() == "{}"
    assert not folder.exists()
    with local_copy(checkpoint) as folder:
        assert folder == checkpoint
    assert (checkpoint / "model.pt").is_file()


def test_a_writable_store_passes_the_write_check_and_keeps_no_probe(s3_bucket: str) -> None:
    remote = RemoteDir.open(f"{s3_bucket}/results/exp")
    remote.check_writable()
    assert remote.files() == []


def test_a_missing_bucket_fails_the_write_check_naming_the_uri(s3_environment: S3Server) -> None:
    remote = RemoteDir.open("s3://no-such-bucket/results")
    with pytest.raises(StorageError) as error:
        remote.check_writable()
    message = str(error.value)
    assert message.startswith("cannot write to s3://no-such-bucket/results: ")
    assert "NO_SUCH_BUCKET" in message
    assert "AWS_ENDPOINT_URL" in message  # the checklist


def test_an_unreachable_endpoint_fails_naming_the_uri(s3_environment: S3Server) -> None:
    uri = f"s3://bucket/results?endpoint_override=http://127.0.0.1:{free_loopback_port()}"
    with pytest.raises(StorageError, match=r"cannot list s3://bucket/results\?endpoint_override"):
        RemoteDir.open(uri).files()


@pytest.mark.parametrize("credentials", ["missing", "unknown"])
def test_credentials_the_store_refuses_fail_the_write_check_naming_the_uri(
    s3_bucket: str, credentials: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto checks signatures only once its count of unauthenticated actions is used up.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    if credentials == "missing":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    remote = RemoteDir.open(f"{s3_bucket}/results")
    with pytest.raises(StorageError, match=f"cannot write to {s3_bucket}/results: "):
        remote.check_writable()


def test_a_uri_pyarrow_cannot_take_is_an_error_naming_it(s3_environment: S3Server) -> None:
    with pytest.raises(StorageError, match=r"cannot open s3://bucket/results\?colour=blue: "):
        RemoteDir.open("s3://bucket/results?colour=blue")


@pytest.mark.parametrize(
    "crafted",
    ["../../escaped.json", "t1/../../../escaped.json", "/escaped.json", "./t1/escaped.json"],
)
def test_a_bucket_key_that_would_leave_the_local_copy_is_refused_naming_it(
    s3_environment: S3Server, tmp_path: Path, crafted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 7: keys are joined to the mirror's folder; `..`, absolute, empty parts are refused."""
    import boto3

    from cxrtune.search.cli import EXIT_BAD_INPUT, main

    bucket = s3_environment.new_bucket().removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_environment.endpoint)
    for key in ("exp/sweep.yaml", "exp/dataset.json", "exp/splits.csv", f"exp/{crafted}"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    with pytest.raises(StorageError, match="refusing the key") as error:
        RemoteDir.open(f"s3://{bucket}/exp").files()
    assert f"'{bucket}/exp/{crafted}'" in str(error.value)
    for command in ("leaderboard", "report", "export"):
        extra = ["--rank", "1", "--out", str(tmp_path / "model")] if command == "export" else []
        assert main([command, f"s3://{bucket}/exp", *extra]) == EXIT_BAD_INPUT
        assert f"{bucket}/exp/{crafted}" in capsys.readouterr().err
    cache = Path(os.environ["CXRTUNE_CACHE_DIR"])
    assert not list(cache.parent.rglob("escaped.json")) and not Path("/escaped.json").exists()


def appended_file(s3_bucket: str) -> AppendedFile:
    return AppendedFile(RemoteDir.open(f"{s3_bucket}/exp"), whole="log", segments="log.parts")


def test_only_the_appended_whole_lines_go_up_each_as_a_segment_named_by_its_offset(
    s3_bucket: str, tmp_path: Path
) -> None:
    local = tmp_path / "log"
    remote = appended_file(s3_bucket)
    upload = AppendUpload(local, remote)
    local.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')  # the last line is still being written
    assert upload.upload_appended() == 18
    with local.open("ab") as log:
        log.write(b'3}\n{"d": 4}\n')
    assert upload.upload_appended() == len(b'{"c": 3}\n{"d": 4}\n')
    assert upload.upload_appended() == 0  # nothing new: nothing sent

    listed = remote.folder.files()
    assert [(file.relative_path, file.size) for file in listed] == [
        (f"log.parts/{segment_name(0)}", 18),
        (f"log.parts/{segment_name(18)}", 18),
    ]
    assert segment_name(18) == "00000000000000000018"
    assert remote.length(listed) == local.stat().st_size == 36
    assert remote.fetch(listed, tmp_path / "reader")
    assert (tmp_path / "reader" / "log").read_bytes() == local.read_bytes()


def test_a_compacted_file_with_segments_after_it_reads_whole(
    s3_bucket: str, tmp_path: Path
) -> None:
    """A resumed upload continues after the whole copy an earlier one compacted."""
    local = tmp_path / "log"
    remote = appended_file(s3_bucket)
    local.write_bytes(b"1\n2\n")
    assert AppendUpload(local, remote).compact() == 4
    with local.open("ab") as log:
        log.write(b"3\n")
    resumed = AppendUpload(local, remote)
    resumed.resume()
    assert resumed.uploaded == 4
    assert resumed.upload_appended() == 2
    listed = remote.folder.files()
    assert {file.relative_path for file in listed} == {"log", f"log.parts/{segment_name(4)}"}
    assert remote.fetch(listed, tmp_path / "reader")
    assert (tmp_path / "reader" / "log").read_bytes() == b"1\n2\n3\n"


def test_a_missing_segment_is_an_error_naming_the_bytes(s3_bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "log"
    remote = appended_file(s3_bucket)
    upload = AppendUpload(local, remote)
    for line in (b"1\n", b"2\n", b"3\n"):
        with local.open("ab") as log:
            log.write(line)
        upload.upload_appended()
    remote.folder.filesystem.delete_file(f"{remote.folder.path}/log.parts/{segment_name(2)}")
    with pytest.raises(StorageError, match=f"bytes 2 to 3 of log are missing.*{segment_name(2)}"):
        remote.fetch(remote.folder.files(), tmp_path / "reader")
    assert not (tmp_path / "reader" / "log").exists()


def test_no_parts_is_no_file(s3_bucket: str, tmp_path: Path) -> None:
    remote = appended_file(s3_bucket)
    assert not remote.fetch([], tmp_path)
    assert remote.length([]) == 0
