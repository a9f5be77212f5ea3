"""Run a sweep end to end: prepare data and the experiment dir, run the Tuner, rank.

The data are decoded and split here once, before any trial starts, so that a
bad dataset fails in seconds with a clear message rather than in every trial.

``resume_sweep`` finishes a sweep whose driver died (killed, machine lost,
connection dropped) from what its experiment dir holds: Ray's snapshot of the
trials and the searcher, the Optuna journal, ``sweep.yaml`` and ``splits.csv``.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrtune.analysis.experiment import (
    DATASET_FILE,
    INGEST_REPORT_JSON,
    INGEST_REPORT_TEXT,
    SPLITS_FILE,
    SWEEP_FILE,
    DatasetInfo,
    ExperimentDir,
)
from cxrtune.search.config import SweepConfig, SweepConfigError, write_sweep_config
from cxrtune.search.ray_environment import (
    SWEEP_TUNE_ENVIRONMENT,
    check_loopback_ray,
    use_loopback_ray,
)
from cxrtune.trainables.data import (
    Dataset,
    IngestReport,
    default_cache_dir,
    find_positive_class,
    ingest,
)
from cxrtune.trainables.fit import TrialData
from cxrtune.trainables.metrics import DEFAULT_TARGET_SPECIFICITY
from cxrtune.trainables.splits import (
    SPLITS,
    SplitIndices,
    group_ids,
    images_in_no_split,
    make_splits,
    write_splits,
)

if TYPE_CHECKING:
    from ray.tune import ResultGrid, Tuner

    from cxrtune.trainables.models import StateDict

__all__ = [
    "UNRECORDED_TRIALS_DIR",
    "SweepOutcome",
    "describe_data",
    "experiment_dir_for",
    "ingest_with_progress",
    "prepare_data",
    "prepare_resumed_data",
    "resume_sweep",
    "run_sweep",
    "set_aside_unrecorded_trials",
    "split_data",
    "start_ray",
    "write_experiment_files",
]


@dataclass(frozen=True)
class PreparedData:
    """The decoded dataset, its split and what ``dataset.json`` records about it."""

    dataset: Dataset
    splits: SplitIndices
    groups: np.ndarray  # per image: images with one id never cross splits
    info: DatasetInfo
    report: IngestReport

    def trial_data(self, target_specificity: float = DEFAULT_TARGET_SPECIFICITY) -> TrialData:
        """Train and val arrays for the trials; the test split stays on the driver.

        ``target_specificity`` sets the operating point of ``val_covid_recall_at_spec``.
        """
        return TrialData(
            train_images=self.dataset.images[self.splits.train],
            train_labels=self.dataset.labels[self.splits.train],
            val_images=self.dataset.images[self.splits.val],
            val_labels=self.dataset.labels[self.splits.val],
            class_names=self.dataset.class_names,
            positive_index=self.info.positive_index,
            target_specificity=target_specificity,
        )


def synthetic_data_dir(config: SweepConfig) -> Path:
    """Where the embedded synthetic set for ``config`` lives (generated on first use)."""
    synthetic = config.synthetic
    name = f"n{synthetic.n}-size{synthetic.size}-seed{synthetic.seed}"
    return default_cache_dir() / "synthetic" / name


def ensure_synthetic_data(config: SweepConfig) -> Path:
    """Generate the embedded synthetic dataset unless it is already there."""
    from cxrtune.trainables.synthetic import write_synthetic_dataset

    directory = synthetic_data_dir(config)
    if not directory.is_dir():
        print(f"Writing the synthetic dataset ({config.synthetic.n} images) to {directory}")
        write_synthetic_dataset(
            directory, n=config.synthetic.n, size=config.synthetic.size, seed=config.synthetic.seed
        )
    return directory


def ingest_with_progress(
    config: SweepConfig, data: Path
) -> tuple[Dataset, IngestReport, Path, str]:
    """Ingest the sweep's data with a progress bar; the layout it used is returned too."""
    from tqdm import tqdm

    with tqdm(desc="Decoding images", unit="img", leave=False, file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = ingest(
            data,
            config.image_size,
            layout=config.layout,
            skip_bad_images=config.skip_bad_images,
            drop_conflicting_duplicates=config.drop_conflicting_duplicates,
            manifest_encoding=config.manifest_encoding,
            progress=progress,
        )
    return result.dataset, result.report, result.cache_path, result.layout


def prepare_data(config: SweepConfig) -> PreparedData:
    """Decode (or reuse the cache of) the sweep's dataset, find the positive class, split."""
    synthetic = config.data is None
    root = ensure_synthetic_data(config) if synthetic else Path(config.data).expanduser().resolve()
    dataset, report, cache_path, layout = ingest_with_progress(config, root)
    return split_data(config, root, dataset, report, cache_path, layout)


def split_data(
    config: SweepConfig,
    root: Path,
    dataset: Dataset,
    report: IngestReport,
    cache_path: Path,
    layout: str,
) -> PreparedData:
    """Find the positive class of an ingested dataset and split it as the sweep will.

    Raises ``DataError`` where the sweep would refuse the data: no positive
    class, or a class too small for every split. ``cxrtune data inspect`` runs
    this too, so it refuses exactly what the sweep refuses.
    """
    synthetic = config.data is None
    positive_index = find_positive_class(dataset.class_names, config.positive_class)
    groups = group_ids(dataset, config.group_by)
    splits = make_splits(
        dataset,
        groups,
        val_fraction=config.splits.val,
        test_fraction=config.splits.test,
        seed=config.seed,
        test_source=config.test_source,
    )
    if left_out := images_in_no_split(dataset, splits):
        report.notes.append(
            f"{left_out} image(s) of other sources share a patient or exact content with "
            f"test_source {config.test_source!r} and are in no split"
        )
    counts = {
        split: {
            name: int(count)
            for name, count in zip(
                dataset.class_names,
                np.bincount(dataset.labels[splits.of(split)], minlength=len(dataset.class_names)),
                strict=True,
            )
        }
        for split in SPLITS
    }
    known = {"patient": report.patients, "source": report.sources, "none": 0}[config.group_by]
    info = DatasetInfo(
        root=str(root),
        synthetic=synthetic,
        layout=layout,
        cache_path=str(cache_path),
        image_size=config.image_size,
        class_names=list(dataset.class_names),
        positive_class=dataset.class_names[positive_index],
        split_counts=counts,
        grouping=config.group_by if known else "none",
        groups=len(np.unique(groups)),
        duplicate_images=report.duplicate_images,
        skipped_images=report.skipped,
        dropped_images=report.dropped_conflicting,
        test_source=config.test_source or "",
    )
    return PreparedData(dataset=dataset, splits=splits, groups=groups, info=info, report=report)


def experiment_dir_for(config: SweepConfig, name: str | None) -> tuple[Path | str, str]:
    """The new experiment dir's location and name (see ``new_experiment_dir``)."""
    experiment = new_experiment_dir(config, name)
    return experiment.location, experiment.name


def new_experiment_dir(config: SweepConfig, name: str | None) -> ExperimentDir:
    """The new experiment dir, ``name`` under the storage path; a non-empty one is an error.

    Without a name, the sweep's name and the time make one. The storage is checked to
    take writes now, so a missing bucket, missing credentials or an unreachable endpoint
    (``StorageError``), or a local folder that cannot be written (``OutputError``), fail
    before any data work.
    """
    if name is None:
        name = f"{config.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if name in {"", ".", ".."} or any(character in name for character in "/\\\0"):
        raise SweepConfigError(
            f"experiment name {name!r}: must be one folder name under storage_path, "
            "without '/' or '\\' and not '.' or '..'"
        )
    experiment = ExperimentDir.under(config.storage_path, name)
    if experiment.is_taken():
        raise SweepConfigError(
            f"experiment dir {experiment.display} already exists; choose another --name"
        )
    experiment.check_writable()
    return experiment


def write_experiment_files(
    directory: Path | str, config: SweepConfig, prepared: PreparedData
) -> None:
    """Write what the analysis needs before any trial runs, so nothing is lost if the sweep dies.

    A remote dir gets them through the driver's local folder for it (see
    ``driver_files_dir``), which a new sweep starts empty.
    """
    ExperimentDir.at(directory).write(
        lambda folder: _write_experiment_files(folder, config, prepared)
    )


def _write_experiment_files(directory: Path, config: SweepConfig, prepared: PreparedData) -> None:
    write_sweep_config(config, directory / SWEEP_FILE)
    prepared.info.write(directory / DATASET_FILE)
    (directory / INGEST_REPORT_JSON).write_text(prepared.report.to_json())
    (directory / INGEST_REPORT_TEXT).write_text(prepared.report.to_text() + "\n")
    write_splits(prepared.dataset, prepared.splits, directory / SPLITS_FILE, prepared.groups)


def start_ray(address: str | None, *, resources: Mapping[str, float] | None = None) -> None:
    """Connect to a running cluster at ``address``, or start a private local one on loopback.

    ``resources``: custom resources a private instance offers besides its cores.
    """
    if not address:
        use_loopback_ray()
    for name, value in SWEEP_TUNE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)

    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        check_loopback_ray()
        # "local": always a new private instance, never one already running on this machine.
        ray.init(
            address="local",
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            resources=dict(resources or {}),
        )


@dataclass(frozen=True)
class SweepOutcome:
    """Where the sweep wrote its results and how its trials ended."""

    experiment_dir: Path | str  # a local folder, or the URI of a remote one
    trials: int
    errored: int


def run_sweep(
    config: SweepConfig, *, name: str | None = None, address: str | None = None
) -> SweepOutcome:
    """Run the whole sweep; the experiment dir holds everything afterwards."""
    if not address:
        use_loopback_ray()  # before the imports below bring Ray in
    from cxrtune.search.progress import SweepProgress
    from cxrtune.search.tuner import build_tuner

    experiment = new_experiment_dir(config, name)
    # Read before any data work or trial, so an offline machine or a bad file fails at once.
    vgg16_weights, pretrained = pretrained_weights(config)
    if config.mlflow_uri:
        # Also before any data work: MLflow missing, or refusing a local store URI, fails
        # at once. A server is not contacted until the first trial starts.
        from cxrtune.analysis.mlflow_export import MLflowError, tracking_client

        try:
            tracking_client(config.mlflow_uri)
        except MLflowError as error:
            raise SweepConfigError(f"mlflow_uri: {error}") from error
    prepared = prepare_data(config)
    experiment.write(lambda folder: _write_experiment_files(folder, config, prepared))
    print(describe_data(prepared.info))
    if (check := prepared.report.shortcut_check()) is not None and check.warns:
        print(check.warning(), file=sys.stderr)
    print(f"Experiment dir: {experiment.display}")

    start_ray(address)
    progress = SweepProgress(
        config.num_samples, config.max_epochs, config.grace_period, config.reduction_factor
    )
    tuner = build_tuner(
        config,
        prepared.trial_data(config.target_specificity),
        experiment=experiment,
        vgg16_weights=vgg16_weights,
        progress=progress,
        pretrained=pretrained,
    )
    results = tuner.fit()
    return SweepOutcome(
        experiment_dir=experiment.location, trials=len(results), errored=errored_trials(results)
    )


def pretrained_weights(config: SweepConfig) -> tuple[str, StateDict | None]:
    """Where the sweep's pretrained VGG16 weights come from, and their state dict.

    Read here, on the driver, and handed to every trial through Ray's object
    store: on a cluster the trials run on machines that cannot see this one's
    disk (torch's hub cache, a user's file). ``("none", None)`` when no VGG16
    trial is pretrained.
    """
    from cxrtune.trainables.models import read_vgg16_weights, resolve_vgg16_weights

    if "vgg16" not in config.families:
        return "none", None
    source = resolve_vgg16_weights(config.weights)
    return source, (read_vgg16_weights(source) if source != "none" else None)


def errored_trials(results: ResultGrid) -> int:
    """How many trials failed: on their own (ended by the trainable) or past their retries."""
    from cxrtune.trainables.failures import TRIAL_ERROR_KEY

    own = sum(
        results[index].error is None and TRIAL_ERROR_KEY in (results[index].metrics or {})
        for index in range(len(results))
    )
    return own + len(results.errors)


# What Ray writes into the experiment dir when the Tuner starts; its snapshot of the
# trials and the searcher (experiment_state-*.json, searcher-state-*.pkl) follows.
TUNER_STATE = "tuner.pkl"
EXPERIMENT_STATE_PATTERN = "experiment_state-*.json"
# Trial folders of trials that Ray's last snapshot before the driver died does not
# know; moved here on resume so that the experiment dir keeps one folder per trial.
UNRECORDED_TRIALS_DIR = "unrecorded_trials"


def resume_sweep(experiment_dir: str | Path, *, address: str | None = None) -> SweepOutcome:
    """Finish the interrupted sweep in ``experiment_dir``, keeping the searcher's state.

    Finished trials are kept as they are and unfinished ones continue from their
    last checkpoint. Trials that errored stay errored and are not run again:
    Tune already retried every failure that could go away (``max_failures``),
    and a trial that failed on its own ended itself, so what is left is the
    trial's own error, which the leaderboard lists. New trials are asked for
    only until the sweep has ``num_samples``. The train and val arrays are rebuilt from the dir's
    ``sweep.yaml`` and ``splits.csv`` (reusing the dataset cache) and must be
    identical to the ones the sweep started with: a changed or missing image is a
    ``DataError``; a missing file of the experiment dir is an ``ExperimentError``.
    Pretrained VGG16 weights are read again from the sweep's ``weights`` setting.
    """
    if not address:
        use_loopback_ray()  # before the imports below bring Ray in
    from ray import tune

    from cxrtune.search.config import load_sweep_config
    from cxrtune.search.tuner import build_trainable

    directory = ExperimentDir.resumable(experiment_dir)
    require_resumable(directory)
    config = load_sweep_config(directory / SWEEP_FILE)
    _, pretrained = pretrained_weights(config)
    prepared = prepare_resumed_data(config, directory)
    print(describe_data(prepared.info))
    print(f"Resuming the sweep in {directory}")

    start_ray(address)
    # Before Tuner.restore, which reuses the killed driver's staging folder for the
    # experiment (on the same Ray cluster it still holds the result files of trials the
    # snapshot lacks) and uploads it to the experiment dir as the sweep goes.
    set_aside_unrecorded_trials(directory, *snapshot_trials(directory))
    tuner = tune.Tuner.restore(
        str(directory),
        trainable=build_trainable(
            config, prepared.trial_data(config.target_specificity), pretrained
        ),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )
    print(describe_recorded(tuner.get_results()))
    forget_restored_results(tuner)
    results = tuner.fit()
    return SweepOutcome(
        experiment_dir=directory, trials=len(results), errored=errored_trials(results)
    )


# The two readings of the snapshot below load every trial with its results; each is
# made and dropped in a function of its own, so that neither stays in the driver's
# memory while the resumed sweep runs.


def snapshot_trials(directory: Path) -> tuple[set[str], Path | None]:
    """The trial folders Ray's snapshot in ``directory`` records, and its driver's staging dir."""
    from ray import tune

    snapshot = tune.ExperimentAnalysis(str(directory))
    storage = snapshot.trials[0].storage if snapshot.trials else None
    staging = Path(storage.experiment_driver_staging_path) if storage is not None else None
    return {Path(trial.path).name for trial in snapshot.trials if trial.path}, staging


def describe_recorded(recorded: ResultGrid) -> str:
    errored = errored_trials(recorded)
    return (
        f"{len(recorded)} trial(s) recorded: "
        f"{recorded.num_terminated + recorded.num_errors - errored} finished (kept), "
        f"{errored} errored (stay errored), the rest continue from their last checkpoint"
    )


def forget_restored_results(tuner: Tuner) -> None:
    """Drop the results ``Tuner.restore`` read of every recorded trial, before the sweep runs.

    Ray keeps them (``ExperimentAnalysis``, about 37 KB per trial) until ``fit`` ends,
    although ``fit`` makes its own; nothing reads them after ``describe_recorded``.
    Tune offers no public way to drop them, so a Ray that keeps them elsewhere keeps them.
    The memory they held is given back to the system.
    """
    local_tuner = getattr(tuner, "_local_tuner", None)
    if local_tuner is not None and hasattr(local_tuner, "_experiment_analysis"):
        local_tuner._experiment_analysis = None
    # Imported here: retention brings Ray in, which the sweep module leaves to its callers.
    from cxrtune.search.retention import return_freed_memory

    gc.collect()  # what is only held in reference cycles, first
    return_freed_memory()


def require_resumable(directory: Path) -> None:
    """Raise ``ExperimentError`` naming what ``directory`` lacks to be resumed.

    A sweep resumes only in the folder it started in: Ray's snapshot places new
    trials, and the searcher state finds the Optuna journal, by absolute path.
    """
    import optuna

    from cxrtune.analysis.experiment import OPTUNA_JOURNAL, OPTUNA_STUDY_NAME, ExperimentError
    from cxrtune.search.tuner import EXPERIMENT_DIR_ATTR, journal_storage

    if not directory.is_dir():
        raise ExperimentError(f"experiment dir not found: {directory}")
    for required in (SWEEP_FILE, DATASET_FILE, SPLITS_FILE, TUNER_STATE, OPTUNA_JOURNAL):
        if not (directory / required).is_file():
            raise ExperimentError(f"cannot resume {directory}: {required} is missing")
    if not any(directory.glob(EXPERIMENT_STATE_PATTERN)):
        raise ExperimentError(
            f"cannot resume {directory}: Ray saved no experiment state "
            f"({EXPERIMENT_STATE_PATTERN}); the sweep died before its first trial started"
        )
    try:
        study = optuna.load_study(
            study_name=OPTUNA_STUDY_NAME, storage=journal_storage(directory / OPTUNA_JOURNAL)
        )
    except KeyError as error:  # Optuna's word for a study the storage does not hold
        raise ExperimentError(
            f"cannot resume {directory}: {OPTUNA_JOURNAL} holds no study {OPTUNA_STUDY_NAME!r}"
        ) from error
    started_in = study.user_attrs.get(EXPERIMENT_DIR_ATTR, str(directory))
    if Path(started_in) != directory:
        raise ExperimentError(
            f"cannot resume {directory}: the sweep started in {started_in}, and Ray's saved "
            "state points there; move the folder back and resume it at that path"
        )


def prepare_resumed_data(config: SweepConfig, directory: Path) -> PreparedData:
    """The data of the sweep in ``directory``, split as its ``splits.csv`` says.

    Raises ``DataError`` when an image of the split is missing or its label or
    content changed since the sweep started.
    """
    import pandas as pd

    from cxrtune.trainables.data import DataError
    from cxrtune.trainables.splits import read_splits

    info = DatasetInfo.read(directory / DATASET_FILE)
    root = ensure_synthetic_data(config) if info.synthetic else Path(info.root)
    if not root.exists():
        raise DataError(f"the sweep's dataset {root} is missing; it is needed to resume")
    dataset, report, _, _ = ingest_with_progress(config, root)
    if list(dataset.class_names) != list(info.class_names):
        raise DataError(
            f"the classes in {root} are now {list(dataset.class_names)}; "
            f"the sweep started with {info.class_names}"
        )
    splits = read_splits(dataset, directory / SPLITS_FILE)
    table = pd.read_csv(directory / SPLITS_FILE, keep_default_na=False)
    index_of = {path: index for index, path in enumerate(dataset.paths)}
    indices = table["path"].map(index_of).to_numpy()
    groups = np.full(len(dataset.labels), -1)
    groups[indices] = table["group"].to_numpy()
    return PreparedData(dataset=dataset, splits=splits, groups=groups, info=info, report=report)


def set_aside_unrecorded_trials(
    directory: Path, recorded: set[str], staging: Path | None = None
) -> None:
    """Move trial folders that Ray's snapshot lacks into ``unrecorded_trials/``.

    Such a folder belongs to a trial started in the seconds between Ray's last
    snapshot and the driver's death; its Optuna trial is handed to a new Ray
    trial, which starts again from its first epoch with the same parameters.
    The experiment dir holds the folder's checkpoints; ``staging``, the killed
    driver's staging folder for the experiment where it is still there, holds its
    result files, which the resumed driver would otherwise upload as a trial of its
    own. Both go to the same folder under ``unrecorded_trials/``.
    """
    from cxrtune.spaces import FAMILIES

    roots = [directory] + ([staging] if staging is not None and staging.is_dir() else [])
    moved: set[str] = set()
    for root in roots:
        for folder in sorted(root.iterdir()):
            is_trial = folder.is_dir() and any(
                folder.name.endswith(f"_{family}") for family in FAMILIES
            )
            if not is_trial or folder.name in recorded:
                continue
            destination = directory / UNRECORDED_TRIALS_DIR / folder.name
            destination.parent.mkdir(exist_ok=True)
            shutil.copytree(folder, destination, dirs_exist_ok=True)
            shutil.rmtree(folder)
            if folder.name not in moved:
                moved.add(folder.name)
                print(
                    f"Trial folder {folder.name} was not in Ray's last snapshot: "
                    f"moved to {destination}"
                )


def describe_data(info: DatasetInfo) -> str:
    """One paragraph on the data a sweep uses: source, classes, split sizes."""
    source = "SYNTHETIC embedded demo set, not real X-rays" if info.synthetic else info.root
    lines = [
        f"Data: {source}; layout {info.layout}",
        f"  positive class: {info.positive_class}",
        f"  split grouped by: {info.grouping} ({info.groups} groups); "
        f"exact duplicates: {info.duplicate_images}; skipped: {info.skipped_images}; "
        f"dropped as conflicting: {info.dropped_images}",
    ]
    for split, counts in info.split_counts.items():
        listing = ", ".join(f"{name} {count}" for name, count in counts.items())
        lines.append(f"  {split:<5} {sum(counts.values()):5d} images ({listing})")
    return "\n".join(lines)
