"""Real sweeps on a local Ray instance bound to 127.0.0.1, with tiny settings."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxrtune.analysis.experiment import read_experiment
from cxrtune.analysis.leaderboard import build_leaderboard
from cxrtune.search.config import load_sweep_config
from cxrtune.search.sweep import run_sweep
from cxrtune.spaces import SPACES, register_space
from cxrtune.spaces._spaces import QUICK_RANGES, sample_family_config
from cxrtune.trainables.checkpoints import read_checkpoint
from cxrtune.trainables.data import read_cache

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FAMILIES = {"baseline_cnn", "regularized_cnn", "vgg16"}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    from cxrtune.search.sweep import start_ray

    start_ray(address=None)
    yield
    ray.shutdown()


def test_the_local_ray_instance_lives_on_loopback(local_ray: None) -> None:
    import ray

    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]


def intensity_baseline_auc(cache_path: Path) -> float:
    """Macro AUC of a logistic regression on per-image (mean, std): what 'trivial' reaches."""
    dataset = read_cache(cache_path)
    pixels = dataset.images.reshape(len(dataset.labels), -1).astype(np.float64)
    features = np.stack([pixels.mean(axis=1), pixels.std(axis=1)], axis=1)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    probabilities = cross_val_predict(
        model, features, dataset.labels, cv=folds, method="predict_proba"
    )
    return float(roc_auc_score(dataset.labels, probabilities, multi_class="ovr"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrtune.search.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's quickstart sweep, run once through the command line."""
    storage = tmp_path_factory.mktemp("results")
    result = run_cli(
        "sweep",
        str(REPO / "sweeps/quickstart.yaml"),
        "--set",
        f"storage_path={storage}",
        "--name",
        "quickstart",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Leaderboard written" in result.stdout
    return storage / "quickstart"


def test_the_quickstart_ranks_all_three_families_and_beats_the_intensity_baseline(
    quickstart: Path,
) -> None:
    experiment = quickstart
    leaderboard = pd.read_csv(experiment / "leaderboard.csv")
    assert set(leaderboard["family"]) == FAMILIES
    assert leaderboard["rank"].tolist() == list(range(1, len(leaderboard) + 1))

    trivial = intensity_baseline_auc(Path(read_experiment(experiment).dataset.cache_path))
    assert trivial < 0.75
    best = leaderboard["test_macro_auc"].max()
    assert best > trivial + 0.1, f"best trial test macro AUC {best:.3f} vs trivial {trivial:.3f}"

    for results in experiment.glob("*/result.json"):
        for line in results.read_text().splitlines():
            assert not [key for key in json.loads(line) if key.startswith("test_")]
    checkpoints = list(experiment.glob("*/checkpoint_*/checkpoint.pt"))
    assert checkpoints
    state = read_checkpoint(checkpoints[0])
    assert state["trial_config"]["family"] in FAMILIES


def test_an_exported_model_reproduces_the_leaderboard_on_the_test_images(
    quickstart: Path, tmp_path: Path
) -> None:
    leaderboard = pd.read_csv(quickstart / "leaderboard.csv", dtype={"trial_id": str})
    model = tmp_path / "model"
    exported = run_cli("export", str(quickstart), "--rank", "1", "--out", str(model))
    assert exported.returncode == 0, exported.stderr
    splits = pd.read_csv(quickstart / "splits.csv", keep_default_na=False)
    test = splits[splits["split"] == "test"]
    root = Path(read_experiment(quickstart).dataset.root)
    predictions = tmp_path / "predictions.csv"
    predicted = run_cli(
        "predict",
        str(model),
        *[str(root / path) for path in test["path"]],
        "--csv",
        str(predictions),
    )
    assert predicted.returncode == 0, predicted.stderr
    table = pd.read_csv(predictions)
    dataset = read_experiment(quickstart).dataset
    classes, positive = list(dataset.class_names), dataset.positive_index
    labels = test["label"].map(classes.index).to_numpy()
    probabilities = table[classes].to_numpy()
    best = leaderboard.iloc[0]
    auc = roc_auc_score(labels, probabilities, multi_class="ovr")
    assert auc == pytest.approx(best["test_macro_auc"], abs=1e-4)
    recall = np.mean(probabilities[labels == positive].argmax(axis=1) == positive)
    assert recall == pytest.approx(best["test_covid_recall"], abs=1e-9)


def test_grad_cam_overlays_of_every_family_are_not_blank(quickstart: Path, tmp_path: Path) -> None:
    leaderboard = pd.read_csv(quickstart / "leaderboard.csv", dtype={"trial_id": str})
    splits = pd.read_csv(quickstart / "splits.csv", keep_default_na=False)
    root = Path(read_experiment(quickstart).dataset.root)
    image = str(root / splits[splits["split"] == "test"]["path"].iloc[0])
    for family in sorted(FAMILIES):
        trial = leaderboard[leaderboard["family"] == family]["trial_id"].iloc[0]
        model = tmp_path / family
        assert (
            run_cli("export", str(quickstart), "--trial", trial, "--out", str(model)).returncode
            == 0
        )
        overlays = tmp_path / f"{family}-gradcam"
        result = run_cli("predict", str(model), image, "--gradcam", str(overlays))
        assert result.returncode == 0, result.stderr
        (overlay,) = overlays.glob("*.png")
        pixels = np.asarray(Image.open(overlay).convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{family} overlay is blank"


def test_the_report_of_the_quickstart_embeds_every_figure(quickstart: Path, tmp_path: Path) -> None:
    result = run_cli("report", str(quickstart), "--top", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "report.html").read_text()
    figures = sorted(tmp_path.glob("*.png"))
    assert len(figures) >= 3 + 3 * 3  # overview figures and three per top trial
    assert html.count("data:image/png;base64,") >= len(figures)


def write_user_dataset(root: Path) -> None:
    """A small real-world-shaped folder: spaces, nesting, RGB and 16-bit PNGs, JPEGs."""
    rng = np.random.default_rng(0)
    classes = {"COVID-19": 20, "Lung Opacity": 20, "Normal": 22, "Viral Pneumonia": 20}
    for class_index, (name, count) in enumerate(classes.items()):
        for index in range(count):
            base = rng.integers(0, 120, (40, 40)).astype(np.float64)
            base[5 + class_index * 8 : 12 + class_index * 8, 8:32] += 120  # a class-specific band
            folder = root / name / ("site b" if index % 2 else "site a") / "scans"
            folder.mkdir(parents=True, exist_ok=True)
            if index % 3 == 0:
                rgb = np.repeat(base[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)
                Image.fromarray(rgb).save(folder / f"img {index}.png")
            elif index % 3 == 1:
                Image.fromarray((base * 16).astype(np.uint16)).save(folder / f"img {index}.png")
            else:
                Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(
                    folder / f"img {index}.jpg"
                )


class ListeningSockets:
    """Polls, in a thread, every socket this process and its children listen on."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.seen: set[tuple[str, str, int]] = set()  # (process name, address, port)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ListeningSockets:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        while not self._stop.wait(self.interval_s):
            driver = psutil.Process()
            for process in [driver, *driver.children(recursive=True)]:
                try:
                    name = process.name()
                    connections = process.net_connections(kind="inet")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                for connection in connections:
                    # A TCP socket in LISTEN, or a UDP socket bound without a peer.
                    if connection.status == psutil.CONN_LISTEN or (
                        connection.type == socket.SOCK_DGRAM and not connection.raddr
                    ):
                        self.seen.add((name, connection.laddr.ip, connection.laddr.port))
            self.samples += 1


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket bound to ::ffff:127.0.0.1
    return ip.is_loopback


@pytest.fixture(scope="module")
def user_folder_sweep(
    tmp_path_factory: pytest.TempPathFactory, local_ray: None
) -> tuple[Path, ListeningSockets]:
    """A sweep of a messy user folder, with every listening socket recorded while it ran."""
    tmp_path = tmp_path_factory.mktemp("user-folder")
    data = tmp_path / "my xrays"
    write_user_dataset(data)
    (data / "Normal" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    (data / "Normal" / "notes.png").write_text("a text file")
    (data / "COVID-19" / "empty.jpg").write_bytes(b"")
    config = load_sweep_config(
        None,
        [
            "skip_bad_images=true",
            f"data={data}",
            f"storage_path={tmp_path / 'results'}",
            "image_size=32",
            "num_samples=3",
            "max_epochs=1",
            "grace_period=1",
            "space=quick",
        ],
    )
    with ListeningSockets() as sockets:
        outcome = run_sweep(config, name="mine")
    assert outcome.errored == 0
    return Path(outcome.experiment_dir), sockets


def test_a_user_image_folder_sweeps_and_ranks_skipping_bad_files(
    user_folder_sweep: tuple[Path, ListeningSockets],
) -> None:
    experiment_dir, _ = user_folder_sweep
    leaderboard = build_leaderboard(read_experiment(experiment_dir))
    assert set(leaderboard.ranked["family"]) == FAMILIES
    assert leaderboard.ranked["test_macro_auc"].notna().all()
    splits = pd.read_csv(experiment_dir / "splits.csv")
    assert len(splits) == 82 and set(splits["split"]) == {"train", "val", "test"}
    assert "COVID-19/site a/scans/img 0.png" in set(splits["path"])
    report = (experiment_dir / "ingest_report.txt").read_text()
    assert "Unreadable files (skipped): 3" in report
    assert "3 images skipped" in leaderboard.header


def test_every_socket_ray_listens_on_during_a_local_sweep_is_loopback(
    user_folder_sweep: tuple[Path, ListeningSockets],
) -> None:
    """Loopback, measured: the sockets Ray's processes really bind, not the address Ray reports."""
    _, sockets = user_folder_sweep
    names = {name for name, _, _ in sockets.seen}
    # The sweep's own processes were seen: Ray's servers and at least one trial worker.
    assert {"gcs_server", "raylet"} <= names, names
    assert any(name.startswith("ray::") for name in names), names
    exposed = sorted(entry for entry in sockets.seen if not is_loopback(entry[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.fixture
def misconfigured_space() -> Iterator[str]:
    """A space that hands trials a key TrialConfig does not know, so every trial errors."""
    name = "test_misconfigured"

    @register_space(name)
    def space(trial, families):  # type: ignore[no-untyped-def]
        return {**sample_family_config(trial, families, QUICK_RANGES), "drop_out": 0.5}

    yield name
    del SPACES[name]


def test_errored_trials_are_listed_apart_with_their_error(
    tmp_path: Path, local_ray: None, misconfigured_space: str
) -> None:
    config = load_sweep_config(
        None,
        [
            f"storage_path={tmp_path}",
            "image_size=32",
            "num_samples=1",
            "max_epochs=1",
            "grace_period=1",
            f"space={misconfigured_space}",
            "families=[baseline_cnn]",
            "max_failures=0",
            "synthetic.n=200",
            "synthetic.size=32",
        ],
    )
    outcome = run_sweep(config, name="broken")
    assert outcome.errored == 1
    leaderboard = build_leaderboard(read_experiment(outcome.experiment_dir))
    assert leaderboard.ranked.empty
    assert len(leaderboard.failed) == 1
    assert "drop_out" in leaderboard.failed.loc[0, "error"]
