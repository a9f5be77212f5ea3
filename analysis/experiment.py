"""An experiment dir on disk, read as plain files (no running Ray needed).

Layout, under ``storage_path/<experiment name>/``:

- ``sweep.yaml``: the resolved sweep config;
- ``dataset.json``: where the data came from, its cache, classes and counts;
- ``ingest_report.json`` and ``ingest_report.txt``: what ingest saw, skipped and refused;
- ``splits.csv``: path, label, group, split and content hash of every image;
- one folder per trial (Ray's): ``params.json``, ``result.json`` (one JSON line
  per epoch), ``checkpoint_*/checkpoint.pt``, and ``error.txt`` if it failed (Tune
  leaves it behind when a retry recovered the trial, which then reported again); a
  trial that failed on its own instead ends ``result.json`` with a row holding its
  error (``trial_error``);
- ``optuna_study.journal``: the sweep's Optuna study;
- ``leaderboard.csv`` and ``leaderboard.md``, written by ``cxrtune leaderboard``.

The experiment dir may also be remote (``s3://bucket/prefix/<experiment name>``).
``ExperimentDir`` is the one place that tells local from remote: the sweep writes
through it, and ``local_experiment_dir`` mirrors what the analysis reads into a local
folder and uploads what it writes there back. There the journal is uploaded as it grows, in
segments (``optuna_journal``), and compacted into one whole ``optuna_study.journal``
when the sweep ends; the mirror always holds it as one file.
"""

from __future__ import annotations

import json
import posixpath
import re
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs
import yaml

from cxrtune.analysis.outputs import writable_folder
from cxrtune.analysis.storage import (
    AppendedFile,
    RemoteDir,
    RemoteFile,
    driver_files_dir,
    is_remote,
    mirror_dir,
    redacted,
)
from cxrtune.trainables.failures import TRIAL_ERROR_KEY
from cxrtune.trainables.metrics import DEFAULT_TARGET_SPECIFICITY, metric_mode

__all__ = [
    "CHECKPOINT_COLUMN",
    "DATASET_FILE",
    "DEFAULT_BOOTSTRAP_RESAMPLES",
    "DEFAULT_SCHEDULER_METRIC",
    "EVALUATION_FILE",
    "INGEST_REPORT_JSON",
    "INGEST_REPORT_TEXT",
    "LEADERBOARD_CSV",
    "LEADERBOARD_MD",
    "MIRRORED_TRIAL_FILES",
    "OPTUNA_JOURNAL",
    "OPTUNA_JOURNAL_SEGMENTS",
    "OPTUNA_STUDY_NAME",
    "PARAMS_FILE",
    "RESULTS_FILE",
    "SPLITS_FILE",
    "SWEEP_FILE",
    "DatasetInfo",
    "Evaluations",
    "Evaluator",
    "Experiment",
    "ExperimentDir",
    "ExperimentError",
    "Predictions",
    "TrialRecord",
    "best_epoch_row",
    "local_experiment_dir",
    "optuna_journal",
    "read_experiment",
    "read_trial",
]

SWEEP_FILE = "sweep.yaml"
# Defaults of the sweep-file keys the analysis reads, for a sweep.yaml written before the
# key existed; the sweep file (``cxrtune.search.config``) takes its defaults from here.
DEFAULT_SCHEDULER_METRIC = "val_macro_auc"
DEFAULT_BOOTSTRAP_RESAMPLES = 1000
DATASET_FILE = "dataset.json"
SPLITS_FILE = "splits.csv"
INGEST_REPORT_JSON = "ingest_report.json"
INGEST_REPORT_TEXT = "ingest_report.txt"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_MD = "leaderboard.md"
PARAMS_FILE = "params.json"
RESULTS_FILE = "result.json"
ERROR_FILE = "error.txt"
# The sweep's Optuna study, as an Optuna journal file: `optuna-dashboard <file>` shows it.
OPTUNA_JOURNAL = "optuna_study.journal"
# In a remote experiment dir, the journal's appended bytes not yet in OPTUNA_JOURNAL:
# one object per upload, named by its byte offset (see ``optuna_journal``).
OPTUNA_JOURNAL_SEGMENTS = "optuna_study.journal.segments"
OPTUNA_STUDY_NAME = "cxrtune"
# A trial's val and test predictions, cached by the leaderboard so it evaluates once.
EVALUATION_FILE = "evaluation.json"
# What the analysis reads of a remote experiment dir besides each trial's chosen
# checkpoint and the Optuna journal: cxrtune's own files at the top and the small files
# of each trial folder.
MIRRORED_TOP_LEVEL_FILES = (
    SWEEP_FILE,
    DATASET_FILE,
    SPLITS_FILE,
    INGEST_REPORT_JSON,
    INGEST_REPORT_TEXT,
    LEADERBOARD_CSV,
    LEADERBOARD_MD,
)
MIRRORED_TRIAL_FILES = (PARAMS_FILE, RESULTS_FILE, ERROR_FILE, EVALUATION_FILE)
# The result.json key naming the checkpoint folder Ray wrote with each epoch.
CHECKPOINT_COLUMN = "checkpoint_dir_name"


def optuna_journal(experiment: RemoteDir) -> AppendedFile:
    """The Optuna journal of the remote ``experiment``: a whole copy and/or segments."""
    return AppendedFile(experiment, whole=OPTUNA_JOURNAL, segments=OPTUNA_JOURNAL_SEGMENTS)


class ExperimentError(ValueError):
    """A folder is not a readable experiment dir; the message says what is missing."""


@dataclass(frozen=True)
class ExperimentDir:
    """Where one sweep's files live: a local folder, or a prefix on S3 (``s3://``).

    The one place that tells the two apart. The sweep writes through it: its files
    before any trial (``write``), the storage Ray puts trials in (``ray_storage``) and
    the Optuna journal (``journal``; on a remote dir ``remote`` is where it is uploaded).
    The analysis reads through ``local_experiment_dir``.
    """

    location: Path | str  # a local folder (absolute), or the URI of a remote one
    remote: RemoteDir | None = None

    @classmethod
    def under(cls, storage_path: str | Path, name: str) -> ExperimentDir:
        """The dir ``name`` under ``storage_path``; nothing is read or written yet."""
        if is_remote(storage_path):
            remote = RemoteDir.open(str(storage_path)).child(name)
            return cls(remote.uri, remote)
        return cls(Path(storage_path).expanduser().resolve() / name)

    @classmethod
    def at(cls, location: str | Path) -> ExperimentDir:
        """The dir at ``location``, a local path or a URI."""
        if is_remote(location):
            remote = RemoteDir.open(str(location))
            return cls(remote.uri, remote)
        return cls(Path(location).expanduser().resolve())

    @property
    def display(self) -> str:
        """The location for messages, without any keys written into a URI."""
        return redacted(str(self.location))

    @property
    def name(self) -> str:
        """The experiment's name: the dir's last part."""
        return self.remote.name if self.remote is not None else Path(self.location).name

    @property
    def driver_folder(self) -> Path:
        """Where the sweep's driver writes its own files of the dir: the dir itself when
        local, else this machine's folder for it (``driver_files_dir``), uploaded from."""
        if self.remote is not None:
            return driver_files_dir(self.remote)
        return Path(self.location)

    @property
    def journal(self) -> Path:
        """The Optuna journal the sweep's searcher appends to, on the driver's disk."""
        return self.driver_folder / OPTUNA_JOURNAL

    def is_taken(self) -> bool:
        """Whether the dir already holds something (a new sweep must not write into it)."""
        if self.remote is not None:
            return bool(self.remote.files())
        directory = Path(self.location)
        return directory.exists() and (not directory.is_dir() or any(directory.iterdir()))

    def check_writable(self) -> None:
        """Fail now if the dir cannot be written: a remote store that refuses writes is a
        ``StorageError``, a local folder (created here) that refuses them an ``OutputError``."""
        if self.remote is not None:
            self.remote.check_writable()
        else:
            writable_folder(Path(self.location).parent, option="storage_path")

    def write(self, write_files: Callable[[Path], None]) -> None:
        """Call ``write_files`` on the driver's folder of the dir and upload what it wrote.

        A remote dir's driver folder starts empty: one left by an earlier sweep of the
        same URI, since removed there, goes first.
        """
        folder = self.driver_folder
        if self.remote is not None and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_files(folder)
        if self.remote is not None:
            self.remote.upload_files(folder, sorted(path.name for path in folder.iterdir()))

    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem | None]:
        """The storage path and filesystem Ray's ``RunConfig`` takes for this dir's parent.

        Remote: the bare path with the store's filesystem, so an endpoint written into the
        URI reaches the trials inside the pickled filesystem.
        """
        if self.remote is not None:
            return posixpath.dirname(self.remote.path), self.remote.filesystem
        return str(Path(self.location).parent), None

    @staticmethod
    def resumable(location: str | Path) -> Path:
        """The local folder at ``location`` a sweep can resume in; a URI is an error.

        Nothing is contacted: the error comes before any store is opened.
        """
        if is_remote(location):
            # Ray can restore from S3, but the searcher's Optuna journal lives on the disk
            # of the driver that started the sweep, and resume does not fetch it yet.
            raise ExperimentError(
                f"cannot resume {redacted(str(location))}: resuming a sweep stored on S3 is "
                "not supported yet; start a new sweep (finished trials stay readable by "
                "`cxrtune leaderboard`)"
            )
        return Path(location).expanduser().resolve()


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` records about the data a sweep used."""

    root: str  # the dataset folder or manifest
    synthetic: bool  # the embedded synthetic set, not real X-rays
    layout: str  # a registered dataset layout
    cache_path: str  # the decoded array cache
    image_size: int
    class_names: list[str]
    positive_class: str  # the folder name of the class whose recall is ranked
    split_counts: dict[str, dict[str, int]]  # split -> class -> images
    grouping: str = "none"  # what kept images together: "patient", "source" or "none"
    groups: int = 0  # groups split as units (patients or sources, joined by duplicates)
    duplicate_images: int = 0  # images whose exact content occurs more than once
    skipped_images: int = 0  # unreadable files left out
    dropped_images: int = 0  # images left out for carrying two labels or two splits
    test_source: str = ""  # the source held out as the test split; "" = a random test split

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> DatasetInfo:
        return cls(**json.loads(path.read_text()))

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)


@dataclass(frozen=True)
class TrialRecord:
    """One trial as found on disk."""

    trial_id: str
    directory: Path
    config: dict[str, Any]
    results: pd.DataFrame  # one row per reported epoch, in order
    error: str | None  # the error text if the trial failed
    # The checkpoint folders still in the trial folder (Ray deletes all but the kept ones).
    checkpoints: frozenset[str] = frozenset()

    @property
    def family(self) -> str:
        return str(self.config.get("family", "?"))


@dataclass(frozen=True)
class Experiment:
    """A finished (or interrupted) sweep read from its experiment dir."""

    directory: Path
    sweep: dict[str, Any]
    dataset: DatasetInfo
    trials: list[TrialRecord]

    @property
    def scheduler_metric(self) -> str:
        """The metric each trial's checkpoint is chosen by (its best epoch)."""
        return str(self.sweep.get("scheduler_metric", DEFAULT_SCHEDULER_METRIC))

    @property
    def target_specificity(self) -> float:
        """The specificity the operating threshold is chosen on val to reach."""
        return float(self.sweep.get("target_specificity", DEFAULT_TARGET_SPECIFICITY))

    @property
    def bootstrap_resamples(self) -> int:
        """Resamples of the test metrics' confidence intervals."""
        return int(self.sweep.get("bootstrap_resamples", DEFAULT_BOOTSTRAP_RESAMPLES))


def read_experiment(directory: str | Path) -> Experiment:
    """Read a local experiment dir written by ``cxrtune sweep`` (see ``local_experiment_dir``)."""
    if is_remote(directory):
        raise ExperimentError(
            f"{redacted(str(directory))} is remote: read it through local_experiment_dir"
        )
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise ExperimentError(f"experiment dir not found: {directory}")
    for required in (SWEEP_FILE, DATASET_FILE, SPLITS_FILE):
        if not (directory / required).is_file():
            raise ExperimentError(
                f"{directory} is not a cxrtune experiment dir: {required} is missing"
            )
    sweep = yaml.safe_load((directory / SWEEP_FILE).read_text())
    dataset = DatasetInfo.read(directory / DATASET_FILE)
    trials = [read_trial(params.parent) for params in sorted(directory.glob(f"*/{PARAMS_FILE}"))]
    return Experiment(directory=directory, sweep=sweep, dataset=dataset, trials=trials)


def recovered_after(error: str, results: pd.DataFrame) -> bool:
    """Whether the trial reported an epoch after the last failure ``error.txt`` records.

    Tune writes ``Failure # N (occurred at <date>)`` and each result's ``date`` in
    the same format, so the two compare as strings.
    """
    failures = re.findall(r"^Failure # \d+ \(occurred at (\S+)\)", error, flags=re.MULTILINE)
    if not failures or "date" not in results or results.empty:
        return False
    return str(results["date"].iloc[-1]) > failures[-1]


def read_trial(directory: Path) -> TrialRecord:
    """Read one trial folder: its config, its per-epoch results and its error, if any."""
    config = json.loads((directory / PARAMS_FILE).read_text())
    results_path = directory / RESULTS_FILE
    rows = []
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a killed process; the rows before it stand
    results = pd.DataFrame(rows)
    error_path = directory / ERROR_FILE
    error = error_path.read_text().strip() if error_path.is_file() else None
    if error is not None and recovered_after(error, results):
        error = None
    if "trial_id" in results:
        trial_id = str(results["trial_id"].iloc[0])
    else:  # a trial that never reported: its folder is named <trial id>_<family>
        family = str(config.get("family", ""))
        trial_id = directory.name.removesuffix(f"_{family}") if family else directory.name
    if TRIAL_ERROR_KEY in results:
        # A trial that failed on its own ended with a result holding only its error.
        ended_by = results[TRIAL_ERROR_KEY].dropna()
        if not ended_by.empty:
            error = str(ended_by.iloc[-1])
        results = results[results[TRIAL_ERROR_KEY].isna()].drop(columns=TRIAL_ERROR_KEY)
    return TrialRecord(
        trial_id=trial_id,
        directory=directory,
        config=config,
        results=results,
        error=error,
        checkpoints=frozenset(path.parent.name for path in directory.glob("*/*") if path.is_file()),
    )


@contextmanager
def local_experiment_dir(location: str | Path) -> Iterator[Path]:
    """The experiment dir at ``location`` as a local folder to read and write in.

    A local path is given back as it is. For a URI (``s3://bucket/prefix/<name>``), a
    mirror in this machine's cache is first brought up to date with what the analysis
    reads: cxrtune's files, each trial's params, results, error and evaluation, and each
    trial's chosen (best-validation) checkpoint, not its other checkpoints. Files the
    caller writes or changes in the mirror (leaderboard, evaluations, report) are
    uploaded when the block ends without an error. A missing or unreadable remote
    dir is an ``ExperimentError`` or ``StorageError`` naming the URI.
    """
    if not is_remote(location):
        yield Path(location)
        return
    experiment = RemoteDir.open(str(location))
    mirror = mirror_dir(experiment)
    fetch_experiment(experiment, mirror)
    before = file_states(mirror)
    yield mirror
    after = file_states(mirror)
    experiment.upload_files(
        mirror, sorted(path for path, state in after.items() if before.get(path) != state)
    )


def fetch_experiment(experiment: RemoteDir, mirror: Path) -> None:
    """Bring ``mirror`` up to date with what the analysis reads of the remote ``experiment``.

    Only files missing locally or changed remotely are downloaded; local files the
    remote dir no longer has are deleted, so the mirror never shows a trial that is gone.
    """
    remote_files = {remote.relative_path: remote for remote in experiment.files()}
    if not remote_files:
        raise ExperimentError(f"experiment dir not found: {experiment.display}")
    for required in (SWEEP_FILE, DATASET_FILE, SPLITS_FILE):
        if required not in remote_files:
            raise ExperimentError(
                f"{experiment.display} is not a cxrtune experiment dir: {required} is missing"
            )
    for local in [path for path in mirror.rglob("*") if path.is_file()]:
        if local.relative_to(mirror).as_posix() not in remote_files:
            local.unlink()
    mirrored = [remote for remote in remote_files.values() if _is_mirrored(remote)]
    _download_missing(experiment, mirror, mirrored)
    # Joined from its segments while the sweep runs (or if it died before compacting).
    optuna_journal(experiment).fetch(remote_files.values(), mirror)

    read = read_experiment(mirror)
    metric = read.scheduler_metric
    mode = metric_mode(metric)
    checkpoint_files = []
    for record in read.trials:
        if record.error is not None:
            continue  # listed apart by the leaderboard, never evaluated or exported
        trial_dir = record.directory.relative_to(mirror).as_posix()
        stored = {
            parts[1]
            for parts in (path.split("/") for path in remote_files)
            if len(parts) > 2 and parts[0] == trial_dir
        }
        best = best_epoch_row(record.results, metric, mode, stored)
        if best is not None:
            prefix = f"{trial_dir}/{best[CHECKPOINT_COLUMN]}/"
            checkpoint_files += [
                remote
                for remote in remote_files.values()
                if remote.relative_path.startswith(prefix)
            ]
    _download_missing(experiment, mirror, checkpoint_files)


def _is_mirrored(remote: RemoteFile) -> bool:
    parts = remote.relative_path.split("/")
    if len(parts) == 1:
        return parts[0] in MIRRORED_TOP_LEVEL_FILES
    return len(parts) == 2 and parts[1] in MIRRORED_TRIAL_FILES


def _download_missing(experiment: RemoteDir, mirror: Path, files: list[RemoteFile]) -> None:
    for remote in files:
        if not experiment.is_current(remote, mirror):
            experiment.download(remote, mirror)


def file_states(directory: Path) -> dict[str, tuple[int, int]]:
    """Size and change time of every file under ``directory``, by posix relative path."""
    states = {}
    for path in directory.rglob("*"):
        if path.is_file():
            stat = path.stat()
            states[path.relative_to(directory).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return states


@dataclass(frozen=True)
class Predictions:
    """Labels and class probabilities (``N x C``) of one split, as kept in ``evaluation.json``."""

    labels: np.ndarray
    probabilities: np.ndarray


@dataclass(frozen=True)
class Evaluations:
    """Predictions of the checkpoints an evaluator read, and why it could not read the others."""

    predictions: dict[str, dict[str, Predictions]]  # trial id -> split -> predictions
    unreadable: dict[str, str] = field(default_factory=dict)  # trial id -> reason


# Evaluates chosen checkpoints (trial id -> checkpoint folder) of an experiment on val
# and test. A checkpoint that cannot be read (``CheckpointCorruptError``) is reported in
# ``unreadable``; any other error propagates.
Evaluator = Callable[[Experiment, Mapping[str, Path]], Evaluations]


def best_epoch_row(
    results: pd.DataFrame, metric: str, mode: str, checkpoints: Collection[str]
) -> pd.Series | None:
    """The reported epoch with the best ``metric`` among those whose checkpoint still exists.

    ``checkpoints`` names the checkpoint folders that still exist: ``result.json``
    also names the ones Ray deleted beyond ``checkpoints_to_keep``. The latest of
    tied epochs wins, as in Ray, which keeps the latest of equal scores.
    """
    if results.empty or metric not in results or CHECKPOINT_COLUMN not in results:
        return None
    # Plain numpy, not boolean frame indexing: this runs once per trial, 10,000 times
    # in a large sweep, where pandas' indexing alone took most of a minute.
    values = results[metric].to_numpy(dtype=float, na_value=np.nan)
    kept = np.fromiter(
        (name in checkpoints for name in results[CHECKPOINT_COLUMN]), dtype=bool, count=len(values)
    )
    candidates = kept & ~np.isnan(values)
    if not candidates.any():
        return None
    best = values[candidates].max() if mode == "max" else values[candidates].min()
    return results.iloc[int(np.flatnonzero(candidates & (values == best))[-1])]
