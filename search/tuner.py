"""Build the Ray Tune ``Tuner`` for a sweep: the Optuna searcher, ASHA, resources, storage.

Everything here is wiring; the space comes from ``cxrtune.spaces`` and the
training from ``cxrtune.trainables``. What the sweep leaves for other tools:
the Optuna study as a journal file in the experiment dir (optuna-dashboard),
TensorBoard event files in every trial folder, and, when the sweep names an
``mlflow_uri``, one MLflow run per trial.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from cxrtune.analysis.experiment import OPTUNA_STUDY_NAME, ExperimentDir, optuna_journal
from cxrtune.analysis.mlflow_export import credentials_to_environment
from cxrtune.analysis.storage import (
    AppendUpload,
    RemoteDir,
    StorageError,
)
from cxrtune.search.config import SweepConfig
from cxrtune.search.progress import SweepProgress
from cxrtune.search.resources import (
    DATA_PARALLEL_DRIVER,
    FamilyResourcesFn,
    data_parallel_resources,
)
from cxrtune.search.retention import CheckpointRetention, ForgetEndedTrialHistory
from cxrtune.search.searcher import RAY_TRIAL_ID_ATTR as RAY_TRIAL_ID_ATTR
from cxrtune.search.searcher import StudySearcher
from cxrtune.spaces import get_space
from cxrtune.trainables.fit import TrialData
from cxrtune.trainables.metrics import metric_mode
from cxrtune.trainables.models import StateDict
from cxrtune.trainables.trainable import train_trial

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DATA_PARALLEL_DRIVER",
    "EXPERIMENT_DIR_ATTR",
    "JOURNAL_UPLOAD_INTERVAL_S",
    "REUSE_ACTORS",
    "FamilyResourcesFn",
    "JournalUpload",
    "TrialSpace",
    "UnendedTrialsASHA",
    "build_sampler",
    "build_scheduler",
    "build_searcher",
    "build_trainable",
    "build_tuner",
    "data_parallel_resources",
    "journal_storage",
    "mlflow_callback",
    "trial_dirname",
    "trial_space",
]

logger = logging.getLogger(__name__)

# The Optuna study attribute holding the experiment dir the sweep started in. Ray's
# snapshot (new trials' storage) and the searcher state (the journal) hold that path, so
# a sweep resumes only there.
EXPERIMENT_DIR_ATTR = "experiment_dir"


@dataclass(frozen=True)
class TrialSpace:
    """The define-by-run function Optuna calls: the sweep's space plus its fixed values.

    A class rather than a closure so the searcher state pickles for resume.
    """

    space: str
    families: tuple[str, ...]
    fixed: tuple[tuple[str, Any], ...]  # values every trial gets (max_epochs, seed, ...)
    vgg16_weights: str  # "none" or a state dict path, resolved on the driver

    def __call__(self, trial: Any) -> dict[str, Any]:
        held = get_space(self.space)(trial, self.families)
        is_vgg16 = trial.params["family"] == "vgg16"
        return {**held, **dict(self.fixed), "weights": self.vgg16_weights if is_vgg16 else "none"}


# A reused worker would carry the last trial's CUDA context and cached memory into the
# next; a fresh process per trial starts clean. (A benchmark whose trials only replay
# recorded results reuses them.)
REUSE_ACTORS = False


def trial_dirname(trial: Any) -> str:
    """``<trial id>_<family>``: short, unique and readable."""
    return f"{trial.trial_id}_{trial.config.get('family', 'trial')}"


def trial_space(config: SweepConfig, vgg16_weights: str) -> TrialSpace:
    """The sweep's define-by-run space, with the values every trial gets fixed."""
    return TrialSpace(
        space=config.space,
        families=tuple(config.families),
        fixed=(
            ("max_epochs", config.max_epochs),
            ("seed", config.seed),
            ("optimizer", config.optimizer),
        ),
        vgg16_weights=vgg16_weights,
    )


def journal_storage(path: Path) -> optuna.storages.JournalStorage:
    """The Optuna journal file at ``path`` (created if missing), as a storage.

    It pickles, so the searcher state Ray checkpoints still does: Optuna leaves the
    thread lock out of the pickle, and the file lock is a pair of paths. The path is
    kept as given, so a searcher restored from a checkpoint appends to the same file.
    """
    import optuna

    from cxrtune.search.samplers import JournalFile

    return optuna.storages.JournalStorage(JournalFile(str(path)))


def build_sampler(config: SweepConfig) -> optuna.samplers.BaseSampler:
    """The sweep's seeded sampler, with the TPE settings the search benchmark chose."""
    import optuna

    if config.sampler == "nsga2":
        from cxrtune.search.samplers import NSGAIISampler

        return NSGAIISampler(seed=config.seed)
    with warnings.catch_warnings():
        # multivariate, group and constant_liar are marked experimental.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=config.seed,
            multivariate=config.tpe_multivariate,
            group=config.tpe_group,
            constant_liar=config.tpe_constant_liar,
            n_startup_trials=config.tpe_startup_trials,
        )
    if config.tpe_window_trials:
        from cxrtune.search.samplers import RecentTrialsSampler

        return RecentTrialsSampler(sampler, config.tpe_window_trials)
    return sampler


def build_searcher(
    config: SweepConfig, vgg16_weights: str, journal: Path | None = None
) -> StudySearcher:
    """Seeded Optuna search over the sweep's space, one or two objectives.

    With ``journal``, the study is kept in that Optuna journal file as study
    ``cxrtune``, its objectives named; the file must not hold that study yet.
    Without, it lives in memory (and in Ray's searcher checkpoints) only.
    """
    import optuna

    storage: optuna.storages.BaseStorage = (
        journal_storage(journal) if journal is not None else optuna.storages.InMemoryStorage()
    )
    study = optuna.create_study(
        storage=storage,
        study_name=OPTUNA_STUDY_NAME,
        sampler=build_sampler(config),
        directions=[
            "minimize" if metric_mode(metric) == "min" else "maximize"
            for metric in config.objectives
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # optuna-dashboard labels its plots with them.
        study.set_metric_names(list(config.objectives))
    if journal is not None:
        study.set_user_attr(EXPERIMENT_DIR_ATTR, str(journal.resolve().parent))
    if config.try_each_family_first:
        # Enqueued trials fix only the family; Optuna samples the rest as usual.
        for family in config.families:
            study.enqueue_trial({"family": family})
    return StudySearcher(
        space=trial_space(config, vgg16_weights),
        study=study,
        storage=storage,
        objectives=config.objectives,
        best_epoch_metric=config.scheduler_metric,
        stopped_trials=config.stopped_trials,
    )


def mlflow_callback(tracking_uri: str, experiment_name: str) -> tune.Callback:
    """One MLflow run per trial, in the MLflow experiment named after the sweep's.

    The run holds the trial's config as params and every reported metric per epoch
    (step = epoch); it is named, and tagged ``trial_name``, ``<trainable>_<trial id>``.
    Checkpoints are not uploaded: ``log_top_models`` adds those of the best trials.
    """
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(
        tracking_uri=credentials_to_environment(tracking_uri),
        experiment_name=experiment_name,
        save_artifact=False,
    )


# How long new lines of the Optuna journal may wait on the driver before they go up to
# an s3:// experiment dir, in seconds. It bounds what losing the driver machine costs
# the remote copy (the study's records of the last minute) and, with one object per
# upload, how many segments a reader joins (at most 1,440 for a day-long sweep).
JOURNAL_UPLOAD_INTERVAL_S = 60.0


class JournalUpload(tune.Callback):
    """Uploads the Optuna journal from the driver's disk to a remote experiment dir.

    An append-only journal cannot live on object storage, so the study is kept in
    ``driver_files_dir`` and only the lines appended since the last upload go up, as a
    new segment (``optuna_journal``): when the sweep starts, at most every
    ``interval_s`` seconds while it runs, at once when a trial errors, and when the
    sweep ends, which also compacts the segments into one whole journal. Each byte
    goes up once (twice with the compaction), so the bytes sent grow linearly with the
    trials. A failed upload is a warning: the sweep goes on, the next upload carries
    its bytes, and the local journal stays complete.
    """

    def __init__(
        self,
        journal: Path,
        experiment: RemoteDir,
        interval_s: float = JOURNAL_UPLOAD_INTERVAL_S,
    ) -> None:
        self.journal = journal
        self.interval_s = interval_s
        self.appended = AppendUpload(journal, optuna_journal(experiment))
        self.last_try = -math.inf  # time.monotonic() of the last upload tried

    def upload(self) -> None:
        self.last_try = time.monotonic()
        try:
            self.appended.upload_appended()
        except StorageError as error:
            logger.warning("%s (the study is kept in %s)", error, self.journal)

    def upload_if_due(self) -> None:
        if time.monotonic() - self.last_try >= self.interval_s:
            self.upload()

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        try:
            self.appended.resume()
        except StorageError as error:
            logger.warning("%s (the study is kept in %s)", error, self.journal)
        self.upload()

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.upload_if_due()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.upload_if_due()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.upload()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.upload()  # the last lines go up even if the compaction below fails
        try:
            self.appended.compact()
        except StorageError as error:
            # Whatever the compaction left, readers join the same journal from it.
            logger.warning("%s (the study is kept in %s)", error, self.journal)


def build_trainable(
    config: SweepConfig, data: TrialData, pretrained: StateDict | None = None
) -> Any:
    """``train_trial`` with the data and pretrained weights in the object store, and resources.

    Families with several ``workers`` get their workers' resources bound too: their
    trials run data-parallel under Ray Train.
    """
    resources = FamilyResourcesFn.for_sweep(config)
    return tune.with_resources(
        tune.with_parameters(
            train_trial,
            data=data,
            data_parallel=data_parallel_resources(config),
            pretrained=pretrained,
        ),
        resources,
    )


class UnendedTrialsASHA(ASHAScheduler):
    """ASHA that looks for the next trial to start among the trials that have not ended.

    Tune's schedulers look through every trial of the sweep for a pending one, at every
    turn of the driver's loop: in a replayed sweep on a simulated cluster
    (``benchmarks/cluster_scale.py``), 6% of the driver's time at 3,000 trials, and
    growing with the trials. This keeps the trials in the order Tune added them (a
    retried trial goes to the end, as in Tune's own list), drops them once ended, and
    chooses as Tune does: the first pending trial, else the first paused one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unended: dict[str, Trial] = {}  # trial id -> trial, in the order of Tune's list

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        self.unended.pop(trial.trial_id, None)
        self.unended[trial.trial_id] = trial

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        for trial_id in [key for key, trial in self.unended.items() if trial.is_finished()]:
            del self.unended[trial_id]
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in self.unended.values():
                if trial.status == status:
                    return trial
        return None


def build_scheduler(config: SweepConfig) -> ASHAScheduler:
    """ASHA on the sweep's scheduler metric, one rung step per epoch."""
    return UnendedTrialsASHA(
        time_attr="training_iteration",
        metric=config.scheduler_metric,
        mode=metric_mode(config.scheduler_metric),
        max_t=config.max_epochs,
        grace_period=config.grace_period,
        reduction_factor=config.reduction_factor,
    )


def build_tuner(
    config: SweepConfig,
    data: TrialData,
    *,
    experiment: ExperimentDir,
    vgg16_weights: str,
    progress: SweepProgress,
    pretrained: StateDict | None = None,
) -> tune.Tuner:
    """The ``Tuner`` that runs the sweep; ``data`` and ``pretrained`` go to the object store once.

    The Optuna journal is created in ``experiment``'s ``journal`` path here. On a
    remote experiment dir Ray is handed the store's pyarrow filesystem, and the journal
    lives in the driver's local folder for the experiment, uploaded as the sweep goes.
    """
    trainable = build_trainable(config, data, pretrained)
    scheduler = build_scheduler(config)
    # Ray adds a TensorBoard logger by default; naming it keeps the event files when
    # TUNE_DISABLE_AUTO_CALLBACK_LOGGERS is set. It logs each metric as ray/tune/<key>.
    callbacks: list[tune.Callback] = [
        progress,
        TBXLoggerCallback(),
        CheckpointRetention(config.checkpoints_to_keep, config.scheduler_metric),
        ForgetEndedTrialHistory(),
    ]
    if config.mlflow_uri:
        callbacks.append(mlflow_callback(config.mlflow_uri, experiment.name))
    # Written in place, not through Ray's staging dir. Its name must not end in .json or
    # .pkl: on resume Ray copies such files from the experiment dir to its staging dir and
    # later uploads them back, which would put a stale copy over the live journal.
    journal = experiment.journal
    journal.parent.mkdir(parents=True, exist_ok=True)
    if experiment.remote is not None:
        callbacks.append(JournalUpload(journal, experiment.remote))
    ray_storage_path, storage_filesystem = experiment.ray_storage()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(config, vgg16_weights, journal),
            scheduler=scheduler,
            num_samples=config.num_samples,
            max_concurrent_trials=config.max_concurrent_trials or None,
            trial_dirname_creator=trial_dirname,
            reuse_actors=REUSE_ACTORS,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=ray_storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=tune.CheckpointConfig(
                # Kept by CheckpointRetention, not by Ray's num_to_keep (see there).
                num_to_keep=None,
                checkpoint_score_attribute=config.scheduler_metric,
                checkpoint_score_order=metric_mode(config.scheduler_metric),
            ),
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            callbacks=callbacks,
            verbose=0,
        ),
    )
