"""Build the Ray Tune ``Tuner`` for a sweep: Optuna search, ASHA, resources, storage.

Everything here is wiring; the space comes from ``cxrtune.spaces`` and the
training from ``cxrtune.trainables``. What the sweep leaves for other tools:
the Optuna study as a journal file in the experiment dir (optuna-dashboard),
TensorBoard event files in every trial folder, and, when the sweep names an
``mlflow_uri``, one MLflow run per trial.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.logger import TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from cxrtune.analysis.experiment import OPTUNA_JOURNAL, OPTUNA_STUDY_NAME
from cxrtune.analysis.mlflow_export import credentials_to_environment
from cxrtune.analysis.storage import RemoteDir, StorageError, driver_files_dir, is_remote
from cxrtune.search.config import SweepConfig
from cxrtune.search.progress import SweepProgress
from cxrtune.spaces import get_space
from cxrtune.trainables.failures import TRIAL_ERROR_KEY
from cxrtune.trainables.models import StateDict
from cxrtune.trainables.trainable import TrialData, WorkerResources, train_trial

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

# The Optuna user attribute holding the Ray trial id, the name the trial folders,
# the leaderboard and MLflow use.
RAY_TRIAL_ID_ATTR = "ray_trial_id"
# The Optuna study attribute holding the experiment dir the sweep started in. Ray's
# snapshot (new trials' storage) and the searcher state (the journal) hold that path, so
# a sweep resumes only there.
EXPERIMENT_DIR_ATTR = "experiment_dir"


def metric_mode(metric: str) -> str:
    """``"min"`` for losses, ``"max"`` for everything else a trial reports."""
    return "min" if metric.endswith("loss") else "max"


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


# What the Tune trial of a data-parallel family reserves for itself: it only
# starts the Ray Train run, waits, and copies each checkpoint into the trial
# folder. Ray Train reserves the workers' resources in a placement group of its own.
DATA_PARALLEL_DRIVER = {"CPU": 0.25}


@dataclass(frozen=True)
class FamilyResourcesFn:
    """Per-trial resource request, looked up by the trial's family.

    A single-worker trial trains in the Tune trial's own bundle (a GPU fraction
    lets several trials share one GPU). A data-parallel trial's bundle holds only
    its driver, ``DATA_PARALLEL_DRIVER``.
    """

    resources: tuple[tuple[str, float, float, int], ...]  # (family, cpus, gpus, workers)

    @classmethod
    def for_sweep(cls, config: SweepConfig) -> FamilyResourcesFn:
        """The sweep file's ``resources``, family by family."""
        return cls(
            tuple((family, r.cpus, r.gpus, r.workers) for family, r in config.resources.items())
        )

    def __call__(self, config: dict[str, Any]) -> PlacementGroupFactory:
        for family, cpus, gpus, workers in self.resources:
            if family == config["family"]:
                if workers > 1:
                    return PlacementGroupFactory([dict(DATA_PARALLEL_DRIVER)])
                return PlacementGroupFactory([{"CPU": cpus, "GPU": gpus}])
        raise ValueError(f"no resources configured for family {config['family']!r}")


def data_parallel_resources(config: SweepConfig) -> dict[str, WorkerResources]:
    """The families that train data-parallel, with what each of their workers holds."""
    return {
        family: WorkerResources(workers=r.workers, cpus=r.cpus, gpus=r.gpus)
        for family, r in config.resources.items()
        if r.workers > 1
    }


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


class TrialIdOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that records the Ray trial id on each Optuna trial it asks for.

    Restored after its driver died, it takes the study in the journal as the truth.
    The journal is written at once, while Ray snapshots the searcher with the trial
    list only every few seconds, so the journal may be ahead of the snapshot: an
    Optuna trial asked for by a Ray trial the snapshot lacks is handed to the next
    new Ray trial (same parameters, nothing sampled twice), and a trial told after
    the snapshot is not told again. An Optuna trial that was asked for and finished
    after the snapshot (within seconds: a trial erroring at once) stays in the
    journal, and Ray runs a trial in its place.
    """

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        import optuna

        unclaimed: list[int] = getattr(self, "_unclaimed_trials", [])
        if trial_id not in self._ot_trials and unclaimed:
            self._ot_trials[trial_id] = optuna.Trial(self._study, unclaimed.pop(0))
        config: dict[str, Any] | None = super().suggest(trial_id)
        # OptunaSearch keeps the Optuna trial it asked for, by Ray trial id, in `_ot_trials`.
        self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ID_ATTR, trial_id)
        return config

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials:
            return  # told before the driver died; Ray reran its last epochs after the snapshot
        if result and TRIAL_ERROR_KEY in result:
            # A trial that failed on its own ended itself with its error: a failed
            # Optuna trial, not a pruned or complete one.
            result, error = None, True
        super().on_trial_complete(trial_id, result=result, error=error)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        if self._storage is not None:  # an in-memory study: the snapshot is all there is
            self._reconcile_with_study()

    @property
    def _study(self) -> optuna.Study:
        """The Optuna study (``OptunaSearch`` types it as possibly unset)."""
        assert self._ot_study is not None, "the searcher has no study yet"
        study: optuna.Study = self._ot_study
        return study

    def _reconcile_with_study(self) -> None:
        import optuna

        # Ray trial id -> Optuna trial, as Ray snapshotted them; their study, unpickled
        # from the snapshot, has read the whole journal.
        snapshot = self._ot_trials
        in_study: dict[str, optuna.trial.FrozenTrial] = {}
        unclaimed = []
        asked_after_snapshot = False
        for frozen in self._study.get_trials(deepcopy=False):
            ray_trial_id = frozen.user_attrs.get(RAY_TRIAL_ID_ATTR)
            if isinstance(ray_trial_id, str) and ray_trial_id in snapshot:
                in_study[ray_trial_id] = frozen
            elif frozen.state != optuna.trial.TrialState.WAITING:
                asked_after_snapshot = True
                if frozen.state == optuna.trial.TrialState.RUNNING:
                    unclaimed.append(frozen._trial_id)
        if asked_after_snapshot:
            # The sampler's random state is the snapshot's: left as it is, it would draw
            # again the parameters it drew for the trials asked for since. The sweep stays
            # seeded up to the resume, not after it.
            self._study.sampler.reseed_rng()
        self._completed_trials = set(self._completed_trials) | {
            ray_trial_id for ray_trial_id, frozen in in_study.items() if frozen.state.is_finished()
        }
        self._unclaimed_trials = unclaimed


def journal_storage(path: Path) -> optuna.storages.JournalStorage:
    """The Optuna journal file at ``path`` (created if missing), as a storage.

    It pickles, so the searcher state Ray checkpoints still does: Optuna leaves the
    thread lock out of the pickle, and the file lock is a pair of paths. The path is
    kept as given, so a searcher restored from a checkpoint appends to the same file.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def build_searcher(
    config: SweepConfig, vgg16_weights: str, journal: Path | None = None
) -> TrialIdOptunaSearch:
    """Seeded Optuna search over the sweep's space, one or two objectives.

    With ``journal``, the study is kept in that Optuna journal file as study
    ``cxrtune``, its objectives named; the file must not hold that study yet.
    Without, it lives in memory (and in Ray's searcher checkpoints) only.
    """
    import optuna

    space = trial_space(config, vgg16_weights)
    if config.sampler == "nsga2":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.NSGAIISampler(seed=config.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=config.seed)
    modes = [metric_mode(metric) for metric in config.objectives]
    # Enqueued trials fix only the family; Optuna samples the rest as usual.
    first_points = (
        [{"family": family} for family in config.families] if config.try_each_family_first else None
    )
    storage = None
    if journal is not None:
        storage = journal_storage(journal)
        # Created here rather than by OptunaSearch (which then loads it) to name the
        # objectives: optuna-dashboard labels its plots with them.
        study = optuna.create_study(
            storage=storage,
            study_name=OPTUNA_STUDY_NAME,
            directions=["minimize" if mode == "min" else "maximize" for mode in modes],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(config.objectives))
        study.set_user_attr(EXPERIMENT_DIR_ATTR, str(journal.resolve().parent))
    if len(config.objectives) == 1:
        return TrialIdOptunaSearch(
            space=space,
            metric=config.objectives[0],
            mode=modes[0],
            sampler=sampler,
            points_to_evaluate=first_points,
            storage=storage,
            study_name=OPTUNA_STUDY_NAME,
        )
    return TrialIdOptunaSearch(
        space=space,
        metric=list(config.objectives),
        mode=modes,
        sampler=sampler,
        points_to_evaluate=first_points,
        storage=storage,
        study_name=OPTUNA_STUDY_NAME,
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


class JournalUpload(tune.Callback):
    """Copies the Optuna journal from the driver's disk to a remote experiment dir.

    An append-only journal cannot live on object storage, so the study is kept in
    ``driver_files_dir`` and a whole copy goes up when the sweep starts, after each
    trial ends and when the sweep ends. A failed upload is a warning: the sweep goes
    on, the next upload carries everything, and the local journal stays complete.
    """

    def __init__(self, journal: Path, experiment: RemoteDir) -> None:
        self.journal = journal
        self.experiment = experiment

    def upload(self) -> None:
        try:
            self.experiment.upload(self.journal, OPTUNA_JOURNAL)
        except StorageError as error:
            logger.warning("%s (the study is kept in %s)", error, self.journal)

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        self.upload()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.upload()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.upload()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.upload()


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


def build_scheduler(config: SweepConfig) -> ASHAScheduler:
    """ASHA on the sweep's scheduler metric, one rung step per epoch."""
    return ASHAScheduler(
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
    experiment_name: str,
    storage_path: str,
    vgg16_weights: str,
    progress: SweepProgress,
    pretrained: StateDict | None = None,
) -> tune.Tuner:
    """The ``Tuner`` that runs the sweep; ``data`` and ``pretrained`` go to the object store once.

    The experiment dir ``storage_path/experiment_name`` must exist: the Optuna
    journal is created in it here. Under an ``s3://`` storage path Ray is handed the
    store's pyarrow filesystem, and the journal lives in the driver's local folder for
    the experiment (``driver_files_dir``), uploaded as the sweep goes.
    """
    trainable = build_trainable(config, data, pretrained)
    scheduler = build_scheduler(config)
    # Ray adds a TensorBoard logger by default; naming it keeps the event files when
    # TUNE_DISABLE_AUTO_CALLBACK_LOGGERS is set. It logs each metric as ray/tune/<key>.
    callbacks: list[tune.Callback] = [progress, TBXLoggerCallback()]
    if config.mlflow_uri:
        callbacks.append(mlflow_callback(config.mlflow_uri, experiment_name))
    # Written in place, not through Ray's staging dir. Its name must not end in .json or
    # .pkl: on resume Ray copies such files from the experiment dir to its staging dir and
    # later uploads them back, which would put a stale copy over the live journal.
    journal = Path(storage_path) / experiment_name / OPTUNA_JOURNAL
    storage_filesystem = None
    if is_remote(storage_path):
        storage = RemoteDir.open(storage_path)
        experiment = storage.child(experiment_name)
        journal = driver_files_dir(experiment) / OPTUNA_JOURNAL
        journal.parent.mkdir(parents=True, exist_ok=True)
        callbacks.append(JournalUpload(journal, experiment))
        # Ray takes the bare path with the filesystem: an endpoint written into the URI
        # reaches the trials inside the pickled filesystem (keys in the URI are refused).
        storage_path, storage_filesystem = storage.path, storage.filesystem
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(config, vgg16_weights, journal),
            scheduler=scheduler,
            num_samples=config.num_samples,
            max_concurrent_trials=config.max_concurrent_trials or None,
            trial_dirname_creator=trial_dirname,
            # A reused actor would carry the last trial's CUDA context and cached
            # memory into the next; a fresh process per trial starts clean.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=experiment_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=config.checkpoints_to_keep,
                checkpoint_score_attribute=config.scheduler_metric,
                checkpoint_score_order=metric_mode(config.scheduler_metric),
            ),
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            callbacks=callbacks,
            verbose=0,
        ),
    )
