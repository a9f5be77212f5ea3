from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cxrtune.search.cli import EXIT_BAD_INPUT, EXIT_OK, build_parser, main

COMMANDS = [["sweep"], ["resume"], ["leaderboard"], ["data"], ["data", "synth"]]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrtune.search.cli", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize("command", [[], *COMMANDS], ids=lambda c: " ".join(c) or "cxrtune")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: cxrtune" in capsys.readouterr().out


def test_help_does_not_import_ray_or_torch() -> None:
    code = (
        "import sys\nfrom cxrtune.search.cli import build_parser\n"
        "build_parser().format_help()\nprint('ray' in sys.modules, 'torch' in sys.modules)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert output.stdout.split() == ["False", "False"]


def test_an_unknown_sweep_key_exits_2_naming_it_without_a_traceback(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("num_sampels: 4\n")
    result = run_cli("sweep", str(sweep))
    assert result.returncode == EXIT_BAD_INPUT
    assert "num_sampels" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_dataset_without_a_covid_class_exits_2_before_any_trial(
    make_image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    root = make_image_folder({"Normal": 10, "Pneumonia": 10})
    result = run_cli("sweep", "--data", str(root), "--set", f"storage_path={tmp_path / 'out'}")
    assert result.returncode == EXIT_BAD_INPUT
    assert "no class matches the positive class 'COVID'" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Ray" not in result.stdout + result.stderr


def test_a_folder_that_is_not_an_experiment_exits_2(tmp_path: Path) -> None:
    result = run_cli("leaderboard", str(tmp_path))
    assert result.returncode == EXIT_BAD_INPUT
    assert "not a cxrtune experiment dir" in result.stderr


def test_data_synth_writes_a_labelled_synthetic_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "synthetic"
    assert main(["data", "synth", str(target), "--n", "40", "--size", "32"]) == EXIT_OK
    assert "SYNTHETIC" in capsys.readouterr().out
    assert sum(1 for _ in target.rglob("*.png")) == 40
    assert (target / "SYNTHETIC.txt").is_file()


def test_data_synth_refuses_a_folder_it_cannot_write_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 13: the output folder of `data synth` is checked like every other output."""
    (tmp_path / "blocker").write_text("a file")
    target = tmp_path / "blocker" / "sub"
    assert main(["data", "synth", str(target), "--n", "40"]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"data synth {target}: cannot write there, {tmp_path / 'blocker'} is a file" in error
    assert "Writing synthetic images" not in error


def test_data_synth_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = run_cli("data", "synth", str(tmp_path), "--n", "40")
    assert result.returncode == EXIT_BAD_INPUT
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_data_inspect_reports_counts_sizes_modes_and_duplicates(
    make_image_folder: Callable[..., Path],
) -> None:
    root = make_image_folder({"COVID": 20, "Normal": 24})
    (root / "Normal" / "again.png").write_bytes((root / "Normal" / "000.png").read_bytes())
    result = run_cli("data", "inspect", str(root))
    assert result.returncode == EXIT_OK, result.stderr
    assert "COVID: 20" in result.stdout and "Normal: 25" in result.stdout
    assert "24 x 24 (45)" in result.stdout and "L (45)" in result.stdout
    assert "Exact duplicates: 1 contents in 2 images" in result.stdout
    assert "positive class: COVID" in result.stdout
    assert "test " in result.stdout  # the split a sweep would make, per class


def write_manifest(root: Path, classes: dict[str, int]) -> Path:
    """A CSV manifest over the images of an image folder, one patient per two images."""
    rows = ["path,label,patient_id"]
    for name, count in classes.items():
        rows += [f"{name}/{index:03d}.png,{name},{name}-{index // 2}" for index in range(count)]
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_inspect_exits_2_on_a_class_too_small_to_split_as_the_sweep_does(
    make_image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    """Issue item 0: a class of 2 images passed inspect, then the sweep refused it."""
    classes = {"COVID": 2, "Normal": 30}
    manifest = write_manifest(make_image_folder(classes), classes)
    inspect = run_cli("data", "inspect", str(manifest))
    sweep = run_cli("sweep", "--data", str(manifest), "--set", f"storage_path={tmp_path}")
    for result in (inspect, sweep):
        assert result.returncode == EXIT_BAD_INPUT, result.stdout + result.stderr
        assert "too few images to split" in result.stderr and "COVID has" in result.stderr
        assert "Warning" not in result.stderr and "least populated" not in result.stderr
        assert "Traceback" not in result.stderr
    assert "COVID: 2" in inspect.stdout  # the ingest report still comes first


def test_inspect_exits_2_without_the_positive_class_unless_told_which_it_is(
    make_image_folder: Callable[..., Path],
) -> None:
    root = make_image_folder({"Normal": 20, "Pneumonia": 20})
    refused = run_cli("data", "inspect", str(root))
    assert refused.returncode == EXIT_BAD_INPUT
    assert "no class matches the positive class 'COVID'" in refused.stderr
    accepted = run_cli("data", "inspect", str(root), "--positive-class", "pneumonia")
    assert accepted.returncode == EXIT_OK, accepted.stderr
    assert "positive class: Pneumonia" in accepted.stdout


def test_data_inspect_reads_a_latin1_manifest_only_when_told_its_encoding(
    make_image_folder: Callable[..., Path],
) -> None:
    """Issue item 2: exit 2 naming the line, or a report with --manifest-encoding."""
    root = make_image_folder({"COVID": 20, "Normal": 20})  # enough to split
    manifest = root / "m.csv"
    rows = [f"{path.relative_to(root)},{path.parent.name},Hôpital" for path in root.rglob("*.png")]
    manifest.write_bytes(("path,label,source\n" + "\n".join(rows) + "\n").encode("latin-1"))
    refused = run_cli("data", "inspect", str(manifest))
    assert refused.returncode == EXIT_BAD_INPUT
    assert "line 2 is not UTF-8" in refused.stderr and "Traceback" not in refused.stderr
    read = run_cli("data", "inspect", str(manifest), "--manifest-encoding", "latin-1")
    assert read.returncode == EXIT_OK, read.stderr
    assert "COVID: 20" in read.stdout


def test_a_test_source_matching_no_image_stops_the_sweep_with_exit_2_and_the_counts(
    tmp_path: Path,
) -> None:
    """Issue item 3: the guard runs before any trial (and before Ray starts)."""
    from tests.trainables.test_ingest import four_scans

    four_scans(tmp_path)
    manifest = tmp_path / "m.csv"
    rows = [f"scans/{i}.png,{'COVID' if i < 2 else 'Normal'},site {i % 2}" for i in range(4)]
    manifest.write_text("path,label,source\n" + "\n".join(rows) + "\n")
    result = run_cli(
        "sweep", "--data", str(manifest), "--test-source", "elsewhere",
        "--set", f"storage_path={tmp_path / 'results'}",
    )  # fmt: skip
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "test_source 'elsewhere' matches no image; sources: 'site 0' (2), 'site 1' (2)" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "results").glob("*/*_*"))  # no trial folder


def test_bad_files_stop_inspect_and_sweep_with_exit_2_listing_all(
    make_image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    from tests.trainables.test_ingest import make_folder_with_bad_files

    root = make_folder_with_bad_files(tmp_path / "data")
    make_image_folder({"COVID": 20, "Normal": 20}, seed=1000, root=root)  # enough to split
    inspect = run_cli("data", "inspect", str(root))
    sweep = run_cli("sweep", "--data", str(root), "--set", f"storage_path={tmp_path}")
    for result in (inspect, sweep):
        assert result.returncode == EXIT_BAD_INPUT, result.stderr
        for name in ("corrupt.png", "truncated.jpg", "notes.png"):
            assert name in result.stderr
        assert "Traceback" not in result.stderr
    skipped = run_cli("data", "inspect", str(root), "--skip-bad-images")
    assert skipped.returncode == EXIT_OK
    assert "Unreadable files (skipped): 3" in skipped.stdout


def test_resuming_a_sweep_stored_on_s3_exits_2_saying_it_is_not_supported() -> None:
    result = run_cli("resume", "s3://KEY:SECRET@bucket/results/exp-1")
    assert result.returncode == EXIT_BAD_INPUT
    assert "not supported yet" in result.stderr and "s3://***@bucket/results/exp-1" in result.stderr
    assert "SECRET" not in result.stderr and "Traceback" not in result.stderr


# A folder name YAML would cut at " #", read as a mapping at ": ", or mangle otherwise.
AWKWARD_FOLDER = "ward #2: Zürich"


@pytest.mark.parametrize("data", ["/scans/ward #2", "2024", "null", f"/scans/{AWKWARD_FOLDER}"])
def test_sweep_options_reach_the_config_literally(
    data: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 3: --data and --mlflow-uri are taken as given, not parsed as YAML."""
    import cxrtune.search.cli as cli
    import cxrtune.search.sweep as sweep

    seen = {}

    def capture(config: object, **_: object) -> object:
        seen["config"] = config
        return sweep.SweepOutcome(experiment_dir="unused", trials=0, errored=0)

    monkeypatch.setattr(sweep, "run_sweep", capture)
    monkeypatch.setattr(cli, "finish_with_leaderboard", lambda *_, **__: EXIT_OK)
    assert main(["sweep", "--data", data, "--mlflow-uri", data, "--set", "num_samples=3"]) == 0
    config = seen["config"]
    assert config.data == data and config.mlflow_uri == data  # type: ignore[attr-defined]
    assert config.num_samples == 3  # type: ignore[attr-defined]


def test_a_sweep_of_a_missing_folder_named_null_is_refused_not_the_synthetic_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 3: `--data null` names a folder called null; it never means "no data"."""
    monkeypatch.chdir(tmp_path)
    storage = f"storage_path={tmp_path / 'out'}"
    assert main(["sweep", "--data", "null", "--set", storage]) == EXIT_BAD_INPUT
    output = capsys.readouterr()
    assert f"dataset not found: {tmp_path / 'null'}" in output.err
    assert "synthetic" not in (output.out + output.err).lower()


def test_a_dataset_under_a_folder_with_spaces_hash_colon_and_umlaut_is_ingested(
    make_image_folder: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 3: such a folder is read by `data inspect` and by a sweep's --data."""
    # Large enough to split, since inspect splits as a sweep would.
    root = make_image_folder({"COVID": 20, "Normal": 24}, root=tmp_path / AWKWARD_FOLDER)
    inspect = run_cli("data", "inspect", str(root))  # the name goes through a real argv
    assert inspect.returncode == EXIT_OK, inspect.stderr
    assert "COVID: 20" in inspect.stdout and AWKWARD_FOLDER in inspect.stdout
    no_covid = make_image_folder(
        {"Normal": 10, "Pneumonia": 10}, root=tmp_path / "b" / "#1: Zürich"
    )
    storage = f"storage_path={tmp_path / 'out'}"
    assert main(["sweep", "--data", str(no_covid), "--set", storage]) == EXIT_BAD_INPUT
    # Refused only after ingest read the folder and found its classes.
    error = capsys.readouterr().err
    assert "no class matches the positive class 'COVID'" in error
    assert "classes: ['Normal', 'Pneumonia']" in error


@pytest.mark.parametrize("password_set", [False, True])
def test_resume_logs_to_mlflow_without_the_keys_sweep_yaml_does_not_keep(
    password_set: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Item 6: sweep.yaml keeps ``***`` for the keys; resume needs MLflow's variables."""
    import cxrtune.search.cli as cli
    import cxrtune.search.sweep as sweep
    from cxrtune.search.config import load_sweep_config, write_sweep_config

    config = load_sweep_config(None, settings={"mlflow_uri": "http://me:pw@127.0.0.1:5000"})
    write_sweep_config(config, tmp_path / "sweep.yaml")
    outcome = sweep.SweepOutcome(experiment_dir=tmp_path, trials=1, errored=0)
    monkeypatch.setattr(sweep, "resume_sweep", lambda *_, **__: outcome)
    given = []
    monkeypatch.setattr(
        cli, "finish_with_leaderboard", lambda _, uri, **__: given.append(uri) or EXIT_OK
    )
    if password_set:
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    main(["resume", str(tmp_path), "--address", "unused"])
    if password_set:
        assert given == ["http://127.0.0.1:5000"]
    else:
        assert given == [None]
        assert (
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in capsys.readouterr().err
        )


@pytest.fixture(scope="module")
def experiment_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A finished experiment, its rank-1 model exported, and a folder of two images."""
    import numpy as np

    from cxrtune.analysis.export import export_model
    from tests.analysis.test_leaderboard import make_experiment
    from tests.conftest import write_png

    root = tmp_path_factory.mktemp("outputs")
    experiment = make_experiment(root)
    model = export_model(experiment, root / "model", rank=1)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        write_png(root / "images" / name, rng.integers(0, 256, (20, 20), dtype=np.uint8))
    return experiment, model, root / "images"


# Each output option: the command line writing to `target`, and what it writes there.
OUTPUT_COMMANDS = {
    "predict --csv": (
        lambda e, m, i, target: ["predict", str(m), str(i), "--csv", str(target / "p.csv")],
        "p.csv",
    ),
    "predict --gradcam": (
        lambda e, m, i, target: ["predict", str(m), str(i), "--gradcam", str(target / "cams")],
        "cams/a_gradcam.png",
    ),
    "report --out": (
        lambda e, m, i, target: ["report", str(e), "--out", str(target / "report")],
        "report/report.html",
    ),
    "export --out": (
        lambda e, m, i, target: ["export", str(e), "--rank", "1", "--out", str(target / "m")],
        "m/model.json",
    ),
}


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
def test_an_output_under_missing_folders_is_written_there(
    command: str, experiment_and_model: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Item 13: missing parent folders of every output option are created."""
    argv, written = OUTPUT_COMMANDS[command]
    target = tmp_path / "not" / "yet"
    assert main(argv(*experiment_and_model, target)) == EXIT_OK
    assert (target / written).is_file()


@pytest.mark.parametrize("command", OUTPUT_COMMANDS)
@pytest.mark.parametrize("place", ["file in the way", "refuses writes"])
def test_an_output_that_cannot_be_written_stops_the_command_before_any_work(
    command: str,
    place: str,
    experiment_and_model: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Item 13: exit 2 naming the option and the path, before anything is classified or read.

    Tests run as root, where permission bits stop nothing: /proc stands in for a
    read-only place, and a plain file for a folder.
    """
    argv, _ = OUTPUT_COMMANDS[command]
    if place == "file in the way":
        (tmp_path / "blocker").write_text("a file")
        target = tmp_path / "blocker" / "sub"
    else:
        target = Path("/proc/cxrtune-output-check")
    assert main(argv(*experiment_and_model, target)) == EXIT_BAD_INPUT
    output = capsys.readouterr()
    option = command.split()[1]
    assert f"cxrtune: error: {option} {target}" in output.err
    reason = "is a file, not a folder" if place == "file in the way" else "cannot write there"
    assert reason in output.err
    assert output.out == ""  # nothing was predicted, reported or exported
    if place == "file in the way":
        assert (tmp_path / "blocker").read_text() == "a file"


@pytest.mark.parametrize("place", ["missing parents", "file in the way", "refuses writes"])
def test_a_local_storage_path_is_created_or_refused_before_any_data_work(
    place: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 13: storage_path is checked like every other output, before decoding any image."""
    from cxrtune.search.config import load_sweep_config
    from cxrtune.search.sweep import experiment_dir_for

    if place == "missing parents":
        storage = tmp_path / "not" / "yet"
        config = load_sweep_config(None, settings={"storage_path": str(storage)})
        assert experiment_dir_for(config, "exp-1") == (storage.resolve() / "exp-1", "exp-1")
        assert storage.is_dir()
        return
    if place == "file in the way":
        (tmp_path / "blocker").write_text("a file")
        storage = tmp_path / "blocker" / "results"
    else:
        storage = Path("/proc/cxrtune-output-check")
    assert main(["sweep", "--set", f"storage_path={storage}"]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"cxrtune: error: storage_path {storage}: " in error
    assert "Decoding images" not in error


def test_a_manifest_split_that_leaks_a_duplicate_stops_inspect_and_sweep_naming_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Item 4: exit 2 with both paths; --drop-conflicting-duplicates leaves both copies out."""
    from tests.trainables.test_ingest import manifest_with_a_copy_across_splits

    manifest = manifest_with_a_copy_across_splits(tmp_path / "data")
    storage = f"storage_path={tmp_path / 'out'}"
    for argv in (["data", "inspect"], ["sweep", "--set", storage, "--data"]):
        assert main([*argv, str(manifest)]) == EXIT_BAD_INPUT
        assert "train/0.png (train) == test/copy.png (test)" in capsys.readouterr().err
    assert main(["data", "inspect", str(manifest), "--drop-conflicting-duplicates"]) == EXIT_OK
    report = capsys.readouterr().out
    assert "Images in two splits of the manifest: 1" in report
    assert "dropped: 2 images" in report


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", "", "back\\slash"])
def test_an_experiment_name_that_is_not_one_folder_exits_2_before_any_data_work(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--name becomes one folder under storage_path; a path there would write elsewhere."""
    storage = tmp_path / "results"
    assert main(["sweep", "--set", f"storage_path={storage}", "--name", name]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"cxrtune: error: experiment name {name!r}: must be one folder name" in error
    assert "Decoding images" not in error
    assert not (tmp_path / "outside").exists()
