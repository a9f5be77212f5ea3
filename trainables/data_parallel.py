"""Data-parallel trials: one Tune trial training on several workers with Ray Train.

A family whose sweep resources ask for ``workers: N`` (N > 1) trains each trial
on N processes, each holding ``cpus`` and ``gpus``, with gradients averaged
across them (PyTorch DDP; NCCL on GPUs, gloo on CPUs). This follows Ray Train
V2's way of running Train inside Tune (the Ray docs' "Hyperparameter Tuning with
Ray Tune" guide): the Tune trial drives a ``TorchTrainer`` run whose folder is
inside the trial's, and the workers train.

What the rest of cxrtune sees does not change: the trial reports the same
metric keys once per epoch, each with a checkpoint in the trial folder. Ray's
``TuneReportCallback`` forwards metrics only (the checkpoint stays in Train's
run folder), so ``ReportToTune`` forwards the checkpoint too and the trial
reports both with ``tune.report``; ASHA, Optuna, the leaderboard and resuming
then work as for any trial. Tune's checkpoint is the only one a trial resumes
from. ``TrainRunHost`` keeps the run out of reach of the trial's end, so that a
trial Tune stops still gets its workers shut down by Ray Train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import UserCallback

from cxrtune.trainables.config import FamilyResources, TrialConfig
from cxrtune.trainables.devices import wait_for_device_memory
from cxrtune.trainables.fit import TrialData, fit
from cxrtune.trainables.models import StateDict

__all__ = ["ReportToTune", "TrainReports", "TrialStopped", "train_data_parallel"]

if TYPE_CHECKING:
    from ray.train import Checkpoint
    from ray.util.queue import Queue

# Ray Train's run folder, inside the trial folder.
RUN_NAME = "data_parallel"


class TrialStopped(RuntimeError):
    """Tune stopped the trial (ASHA cut it short); its Ray Train run ends here."""


class ReportToTune(UserCallback):
    """Hands each epoch's metrics (rank 0's) and checkpoint from Ray Train to the trial.

    Runs in Ray Train's controller. It waits for the trial's answer: ``True``
    once Tune has copied the checkpoint into the trial folder (Train deletes its
    own copy when the next one arrives, ``num_to_keep=1``), ``False`` when Tune
    stopped the trial, which ends the run through Train's own error handling, so
    Train shuts the workers down and removes their placement group.
    """

    def __init__(self, reports: Queue, answers: Queue):
        self.reports = reports
        self.answers = answers

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: Checkpoint | None,
    ) -> None:
        self.reports.put(("epoch", metrics[0], checkpoint))
        if not self.answers.get():
            raise TrialStopped("Tune stopped this trial")


def train_data_parallel(
    trial: TrialConfig,
    data: TrialData,
    state: dict[str, Any] | None,
    resources: FamilyResources,
    pretrained: StateDict | None = None,
) -> None:
    """Run the trial as a Ray Train run on ``resources.workers`` workers; the Tune trial drives.

    ``pretrained`` (the VGG16 weights the config names) reaches the workers through
    the object store, as the data do.

    Raises what the workers raised (wrapped by Ray Train) when training fails.
    """
    from ray import train, tune
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    storage = tune.get_context().get_storage()
    run_folder = f"{storage.trial_fs_path}/{RUN_NAME}"
    _remove_run_folder(storage.storage_filesystem, run_folder)
    # Zero CPUs: they live in the trial's own placement group beside this driver,
    # and die with it, which tells a run whose trial is gone to stop.
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    answers = Queue(maxsize=1, actor_options={"num_cpus": 0})
    per_worker = {"CPU": resources.cpus} | ({"GPU": resources.gpus} if resources.gpus else {})
    trainer_arguments = {
        "train_loop_per_worker": data_parallel_worker,
        "train_loop_config": {
            "trial": trial.to_dict(),
            # Into the object store once; every worker on a node reads the same memory.
            "data": ray.put(data),
            "state": ray.put(state) if state is not None else None,
            "pretrained": ray.put(pretrained) if pretrained is not None else None,
            "threads": max(1, int(resources.cpus)),
            "gpus": resources.gpus,
        },
        "scaling_config": train.ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus > 0,
            resources_per_worker=per_worker,
        ),
        "run_config": train.RunConfig(
            name=RUN_NAME,
            storage_path=storage.trial_fs_path,
            storage_filesystem=storage.storage_filesystem,
            checkpoint_config=train.CheckpointConfig(num_to_keep=1),
            # Any failure fails the run, and the trial; Tune retries the trial from
            # its last checkpoint (`max_failures` in the sweep file) when the failure
            # was the infrastructure's (cxrtune.trainables.failures). A retry inside
            # Ray Train would restart from the state the run began with.
            # (Ray Train V2's FailureConfig; mypy sees the older one of the same name.)
            failure_config=train.FailureConfig(  # type: ignore[call-arg]
                max_failures=0, controller_failure_limit=0, max_preemption_failures=0
            ),
            # Ray Train V2 takes UserCallbacks here though its annotation names
            # the older Callback type.
            callbacks=[ReportToTune(reports, answers)],  # type: ignore[list-item]
        ),
    }
    # The run's controller, which owns the workers and their placement group,
    # lives in a host actor that is not the trial's: when Tune stops the trial it
    # removes the trial's placement group and every actor in it at once, and a
    # controller dying that way leaves its workers' placement group (and GPUs)
    # reserved wherever Ray's state API (the dashboard) is off. The host outlives
    # the trial, ends the run through Ray Train, which frees the workers, and exits.
    host = TrainRunHost.options(  # type: ignore[attr-defined]
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True
        ),
    ).remote()
    hosting = host.fit.remote(trainer_arguments, reports, run_folder, storage.storage_filesystem)
    error = _relay_reports(
        reports,
        answers,
        hosting,
        trial.max_epochs,
        remove_run_folder=lambda: _remove_run_folder(storage.storage_filesystem, run_folder),
    )
    with contextlib.suppress(ray.exceptions.RayActorError):
        ray.get(hosting)  # the host has exited by now; this only collects the call
    if error is not None:
        raise error


@ray.remote(num_cpus=0)
class TrainRunHost:
    """Runs one data-parallel trial's ``TorchTrainer.fit`` where the trial's end cannot reach it."""

    def fit(
        self, trainer_arguments: dict[str, Any], reports: Queue, run_folder: str, filesystem: Any
    ) -> None:
        """Run, hand the outcome (the run's error, or ``None``) to the trial, and exit."""
        from ray.train.torch import TorchTrainer

        outcome: BaseException | None = None
        try:
            TorchTrainer(**trainer_arguments).fit()
        except Exception as error:  # handed to the trial, which raises it
            outcome = error
        if outcome is not None:
            # A run that ended early leaves nothing the trial still has to copy.
            _remove_run_folder(filesystem, run_folder)
        # Gone when Tune has stopped the trial; nobody is left to tell then.
        with contextlib.suppress(ray.exceptions.RayActorError):
            reports.put(("done", outcome))
        ray.actor.exit_actor()


def _relay_reports(
    reports: Queue,
    answers: Queue,
    hosting: ray.ObjectRef,
    max_epochs: int,
    remove_run_folder: Callable[[], None],
) -> BaseException | None:
    """Report each epoch the run hands over to Tune; returns the run's error, or ``None``.

    The last epoch is reported only after the run has ended, so Ray Train has
    released the workers before Tune, which may stop the trial at that report
    (ASHA's ``max_t``), ends this process. A trial Tune stops earlier tells the
    run to stop; if it cannot, the run finds its trial gone at the next report.
    """
    from ray import tune

    while True:
        kind, *content = _next_report(reports, hosting)
        if kind == "done":
            error: BaseException | None = content[0]
            return error
        metrics, checkpoint = content
        if metrics["epoch"] >= max_epochs:
            answers.put(True)
            kind, error = _next_report(reports, hosting)
            if error is None:
                try:
                    # Train keeps its latest checkpoint, so it is still there to copy.
                    tune.report(metrics, checkpoint=checkpoint)
                finally:
                    # Tune has copied it, whether it returned or stopped the trial:
                    # every checkpoint is in the trial folder, Train's are duplicates.
                    remove_run_folder()
            return error
        try:
            tune.report(metrics, checkpoint=checkpoint)
        except SystemExit:  # how Tune stops a function trainable
            answers.put(False)
            raise
        answers.put(True)


def _next_report(reports: Queue, hosting: ray.ObjectRef) -> tuple[Any, ...]:
    """The next item the run sends; raises if its host died without saying how the run ended."""
    from ray.util.queue import Empty

    while True:
        try:
            item: tuple[Any, ...] = reports.get(timeout=1.0)
            return item
        except Empty:
            host_ended, _ = ray.wait([hosting], timeout=0)
            if host_ended and reports.empty():
                ray.get(hosting)  # raises why the host died
                raise RuntimeError("the data-parallel run ended without a result") from None


def _remove_run_folder(filesystem: Any, path: str) -> None:
    # A run folder left by an earlier attempt of this trial would make Ray Train
    # restore that run's own checkpoint, which may be ahead of Tune's.
    import pyarrow.fs

    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(path)


def data_parallel_worker(loop_config: dict[str, Any]) -> None:
    """The training loop of each Ray Train worker: ``fit``, reporting to Train."""
    # Train's torch backend loads in the workers only, not in the trial that drives them.
    import ray.train.torch

    trial = TrialConfig.from_dict(loop_config["trial"])
    data: TrialData = ray.get(loop_config["data"])
    state = ray.get(loop_config["state"]) if loop_config["state"] is not None else None
    pretrained = (
        ray.get(loop_config["pretrained"]) if loop_config["pretrained"] is not None else None
    )
    device = ray.train.torch.get_device()
    torch.set_num_threads(loop_config["threads"])
    if device.type == "cuda":
        wait_for_device_memory(loop_config["gpus"], lambda: torch.cuda.mem_get_info(device))
    fit(trial, data, state, device, TrainReports(), pretrained)


class TrainReports:
    """One Ray Train worker of a data-parallel trial: DDP, and each epoch reported to Train."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def replicate(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP; starts from rank 0's weights

    def mean_train_loss(self, loss: float, device: torch.device) -> float:
        # Shards are the same size, so the mean of the workers' means is the epoch's mean.
        total = torch.tensor([loss], device=device)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None,
        )
