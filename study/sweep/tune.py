"""Ray Tune execution of a study. THE ONLY MODULE THAT IMPORTS ray.

One Tuner runs both phases. Its Searcher hands out each cell's search trials (study/sweep/source.py),
then, once the cell's search has ended, its final trials, which fill the slots the search's last trials
leave idle in the same warm workers. The TrialScheduler reports every epoch to the cell's Optuna study
and asks its pruner. Every end of a trial (its final result, Tune stopping a pruned trial, a failure)
reaches the study through one hook, the TrialEnds callback, as one ``StudyContext.trial_ended`` call;
pruned trials are told to Optuna as PRUNED (Ray's own OptunaSearch would store them as COMPLETE with a
partial-budget value). With ``trials_per_process`` > 1 a Tune trial is a pack: its
members report with their id; the scheduler prunes members one by one, and refills the pack, through
a PackBoard actor.

Resume: the Optuna journal and the records under `records/` are the source of truth. A resumed run
re-issues trials the killed driver left RUNNING (same Optuna trial and checkpoint dir: they continue
from their last epoch) and asks only the remaining budget: nothing completed re-runs or duplicates.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Tune's own CSV/JSON/TensorBoard loggers would duplicate what we store (and slow every report down).
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
# Tune's own SIGINT handler stops the experiment and returns normally, which would let the driver go
# on to the next phase; without it, Ctrl-C raises KeyboardInterrupt and the study stops (--resume).
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.schedulers import FIFOScheduler, TrialScheduler  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from study.spec import StudySpec  # noqa: E402
from study.sweep import reaper as reaper_lib  # noqa: E402
from study.sweep.context import StudyContext, TrialNames, post_jobs  # noqa: E402
from study.sweep.net import check_tcp, trial_error_text  # noqa: E402
from study.sweep.optuna_cells import CellStudies  # noqa: E402
from study.sweep.records import final_result  # noqa: E402
from study.sweep.source import FINISHED, TrialSource  # noqa: E402


def _trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: one trial (``trial``) or a pack of trials of one cell (``pack``,
    study/trial/pack.py), as typed TrialConfigs on the first lines. A pack reports each member's epochs
    and final result with its ``member`` id, and reads the members the driver pruned from the board."""
    from study.trial.config import TrialConfig
    from study.trial.fit import resolve_device
    from study.trial.run import run_pack, run_trial

    pack = [(m["id"], TrialConfig.model_validate(m["trial"])) for m in config.get("pack", [])]
    cfg = pack[0][1] if pack else TrialConfig.model_validate(config["trial"])
    started_at, node = time.time(), ray.util.get_node_ip_address()
    device = str(resolve_device(cfg.train.device))
    board = ray.get_actor(config["board"]) if pack else None

    def refill(free: int) -> list[tuple[str, TrialConfig]]:  # new members for the slots of ended ones
        tune.report({"refill": free, "objective": float("nan")})
        new = ray.get(board.get.remote(f"refill/{config['pack_id']}")) or []
        return [(m["id"], TrialConfig.model_validate(m["trial"])) for m in new]

    tag = lambda member: {"member": member} if member else {}  # noqa: E731

    def report(row: dict[str, Any], member: str | None = None) -> bool:
        tune.report({**row, "objective": row[cfg.metric], "node": node, "device": device, **tag(member)})
        # Tune's reporting is synchronous: the scheduler has decided on this epoch when report returns.
        return board is not None and bool(ray.get(board.get.remote(f"pruned/{member}")))

    def finished(result: Any, member: str | None = None) -> None:
        tune.report({**final_result(result, node=node, started_at=started_at), **tag(member)})

    if not pack:
        finished(run_trial(cfg, report))
    elif len(pack) == 1:  # the last trials of a cell: alone, without the batched model's overhead
        finished(run_trial(cfg, lambda row: report(row, pack[0][0])), pack[0][0])
    else:
        run_pack(pack, lambda m, row: report(row, m), on_result=lambda m, r: finished(r, m), refill=refill)


@ray.remote(num_cpus=0)
class PackBoard:
    """Driver -> pack messages, read once: ``pruned/<member>`` and ``refill/<pack>`` (new members)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        self.values[key] = value

    def get(self, key: str) -> Any:
        return self.values.pop(key, None)


class CellSearcher(Searcher):
    """Tune's view of the TrialSource: suggestions and trial ends are forwarded; nothing to checkpoint
    (the Optuna journal and the records are the searcher's durable state)."""

    def __init__(self, source: TrialSource, direction: str, board: str | None = None) -> None:
        super().__init__(metric="objective", mode="max" if direction == "maximize" else "min")
        self.source, self.board = source, board

    def remaining(self) -> int:
        return self.source.remaining()

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = self.source.suggest(trial_id)
        if isinstance(config, dict) and "pack" in config:
            config.update(board=self.board, pack_id=trial_id)
        return Searcher.FINISHED if config == FINISHED else config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        return None  # a trial's end reaches the study through TrialEnds (same controller event, see there)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        return None

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        return None


class OptunaPruningScheduler(FIFOScheduler):
    """Every reported epoch (of a trial or a pack member) goes to the study, which asks the cell's
    pruner; a pruned trial is stopped (a pruned member is dropped by its pack through the board). Tune
    calls the scheduler before anything else with each result, and never with the end-of-function
    duplicate of a result it stopped on."""

    def __init__(self, ctx: StudyContext, source: TrialSource) -> None:
        super().__init__()
        self.ctx, self.source = ctx, source
        self._supports_buffered_results = False

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if "refill" in result:  # a pack has free slots: hand it new search trials of its model's cells
            new = self.source.refill(trial.trial_id, int(result["refill"]))
            ray.get(self.ctx.pack_board.put.remote(f"refill/{trial.trial_id}", new))
            return TrialScheduler.CONTINUE
        if "epoch" not in result:
            return TrialScheduler.CONTINUE
        member = result.get("member")
        prune = self.ctx.epoch_result(member or trial.trial_id, result)
        if member is not None and prune:  # the pack drops it after this epoch and goes on with the rest
            ray.get(self.ctx.pack_board.put.remote(f"pruned/{member}", True))
        return TrialScheduler.STOP if prune and member is None else TrialScheduler.CONTINUE


class TrialEnds(Callback):
    """The one Tune hook through which a trial's end reaches the study (``StudyContext.trial_ended``):
    a final result ends the trial or pack member it names; Tune's end of a trial ends whatever of it
    still runs (a pruned trial Tune stopped, the members of a pack that failed) with the error text.

    Callbacks see each result once (Tune's scheduler and searcher also get the duplicate a function
    trainable's return sends). Ray 2.60's TuneController.step() asks the searcher (``suggest``) first,
    then handles one event, and calls these hooks inside that event (``_process_trial_result``,
    ``stop_trial``, ``_process_trial_failure``): a trial's end is recorded and told to Optuna before
    the next ``suggest``, which may then start the cell's final trials."""

    def __init__(self, ctx: StudyContext) -> None:
        self.ctx = ctx

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "final" in result:
            self.ctx.trial_ended(result.get("member") or trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ctx.trial_ended(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ctx.trial_ended(trial.trial_id, error=trial_error_text(trial))


@dataclass
class RayHandle:
    address: str
    temp_dir: str | None
    started_here: bool
    reaper: Any = None  # a subprocess.Popen: kills this Ray if the driver dies without shutdown


# The handle of the Ray this process runs on (set by init_ray): cluster_slots tells local from remote.
_current_handle: RayHandle | None = None


@contextlib.contextmanager
def _private_local_start() -> Iterator[None]:
    """While a private local Ray starts (this process's ray.init only; --address never comes here): loopback
    only (on Linux ray.init turns a loopback `_node_ip_address` into the machine's address; with Ray's switch
    ray_constants.ENABLE_RAY_CLUSTER off, as on macOS/Windows, it stays 127.0.0.1, "loopback only" to the
    gRPC servers), and lean: no dashboard API server (ray.init polls ~1 s for it even with include_dashboard
    off), no autoscaler monitor (ray.shutdown waits 1 s for it): a study needs neither (bench_sweep.md)."""
    from ray._private import ray_constants
    from ray._private.node import Node

    old = ray_constants.ENABLE_RAY_CLUSTER
    skipped = {n: Node.__dict__[n] for n in ("start_api_server", "start_monitor") if n in Node.__dict__}
    ray_constants.ENABLE_RAY_CLUSTER = False
    for name in skipped:
        setattr(Node, name, lambda self, **kwargs: None)
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old
        for name, method in skipped.items():
            setattr(Node, name, method)


def init_ray(address: str | None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> RayHandle:
    """Local Ray with a private temp dir (never joins another instance), or connect to `address`.

    Args:
        address: None or "local" for a private local Ray; else host:port, ray://host:port or "auto"
            (check it first with `check_address`: ray.init itself may wait a minute on a bad one).
        num_cpus: CPUs of the local Ray (None: all of this machine's); ignored when connecting.
        num_gpus: GPUs of the local Ray (None: those CUDA shows); ignored when connecting.
    """
    global _current_handle
    if address in (None, "local"):
        # Unix socket paths must stay short: a private dir directly under /tmp.
        with reaper_lib.watched_temp_dir("/tmp", "rs-") as (temp_dir, reaper), _private_local_start():
            ray.init(
                address="local",
                _temp_dir=temp_dir,
                # Idle workers prestarted for the driver never run Tune's actors (they get a runtime_env).
                _system_config={"prestart_worker_first_driver": False},
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=True,
                logging_level="ERROR",
                _node_ip_address="127.0.0.1",
            )
        _current_handle = RayHandle("local", temp_dir, True, reaper)
    else:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        _current_handle = RayHandle(address, None, False)
    return _current_handle


def check_address(address: str, timeout_s: float = 5.0) -> str | None:
    """None if a Ray cluster's GCS port at `address` (the --address value) accepts a TCP connection
    within `timeout_s`, else a one-line reason; before the results dir is touched, so a wrong address
    fails in seconds, not in ray.init. Accepts host:port ([v6]:port), ray://host:port and "auto"
    ($RAY_ADDRESS, else the last `ray start` here; resolved now). "local" is always fine. A port that
    answers but is not Ray is caught later by ray.init."""
    if address == "local":
        return None
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            lines = str(exc).strip().splitlines() or [repr(exc)]
            return f"--address auto found no Ray cluster to join ({lines[0]})"
        except Exception:  # noqa: BLE001 - Ray's private helper moved: let ray.init resolve "auto"
            return None
    return check_tcp(address, timeout_s)


def cluster_slots(spec: StudySpec, handle: RayHandle | None = None) -> int:
    """How many trials to run at once when --max-concurrent is not given: as many as fit in the resources
    the cluster has now (CPUs // cpus_per_trial, and GPUs / gpus_per_trial when trials take GPUs), >= 1.

    Exact on a local Ray. On a remote cluster (`handle`, default init_ray's last) only a lower bound: an
    autoscaling cluster starting without GPU workers reports 0 GPUs, Tune then keeps one trial pending and
    the autoscaler never adds a node. Its maximum cannot be read reliably, so a one-line hint on stderr
    says to pass --max-concurrent (trials beyond current resources wait PENDING: that makes it scale).
    """
    import sys

    handle = handle or _current_handle
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    slots = int(cpus // spec.resources.cpus_per_trial + 1e-9)
    if spec.resources.gpus_per_trial > 0:
        slots = min(slots, int(gpus / spec.resources.gpus_per_trial + 1e-9))
    slots = max(slots, 1)
    if gpus > 0 and spec.resources.gpus_per_trial == 0:
        print(
            f"study: the cluster has {gpus:g} GPU(s) but resources.gpus_per_trial is 0, so trials run on "
            "CPUs; set it (e.g. 0.25 packs 4 small-model trials per GPU) to train on the GPUs.",
            file=sys.stderr,
        )
    if handle is not None and not handle.started_here:
        print(
            f"study: running {slots} trial(s) at once, sized from the cluster's current resources "
            f"({cpus:g} CPU, {gpus:g} GPU); if it autoscales, pass --max-concurrent for its full size.",
            file=sys.stderr,
        )
    return slots


def run_trials(
    spec: StudySpec, out: Path, ctx: StudyContext, source: TrialSource, max_concurrent: int
) -> None:
    """Both phases in one Tuner (see the module docstring), trials from `source`; its ``on_search_done``
    runs once, in the driver, when every cell's search has ended (also at once when a resumed study's
    search had ended before)."""
    remaining = source.remaining()
    if remaining == 0:
        source.queue_finals()  # nothing to run: still tells on_search_done
        return
    board = None
    if spec.resources.trials_per_process != 1:
        board = f"regstudy-pack-board-{os.getpid()}-{time.time_ns()}"
        ctx.pack_board = PackBoard.options(name=board).remote()
    searcher = CellSearcher(source, spec.search.direction, board)
    tuner = tune.Tuner(
        tune.with_resources(
            _trainable, {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
        ),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=OptunaPruningScheduler(ctx, source),
            # An upper bound: the searcher says FINISHED early when a cell has no final trials.
            num_samples=remaining,
            max_concurrent_trials=max_concurrent,
            # Re-using worker processes saves a Python + torch import and a dataset load per trial.
            reuse_actors=True,
            trial_name_creator=TrialNames.name,
            trial_dirname_creator=TrialNames.dirname,
        ),
        run_config=tune.RunConfig(
            name=f"trials-{int(time.time())}",
            storage_path=ctx.tune_storage[0] if ctx.tune_storage else str(out / "ray"),
            storage_filesystem=ctx.tune_storage[1] if ctx.tune_storage else None,
            callbacks=[TrialEnds(ctx)],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=0,
        ),
    )
    tuner.fit()


def run_post_phase(
    spec: StudySpec,
    ctx: StudyContext,
    max_concurrent: int,
    *,
    on_start: Callable[[int], None] = lambda jobs: None,
    on_progress: Callable[..., None] = lambda *a, **k: None,
) -> None:
    """Transfer attacks and distillation (context.post_jobs) as Ray tasks over the final models, each
    result in its record on arrival; `on_start(jobs)`, then `on_progress(done, total, kind, key, error)`."""
    from study.trial import post

    jobs = post_jobs(spec, ctx)
    if not jobs:
        return
    on_start(len(jobs))
    remote = ray.remote(num_cpus=spec.resources.cpus_per_trial, num_gpus=spec.resources.gpus_per_trial)
    tasks = {"transfer": remote(post.transfer_rows), "distill": remote(post.distill_rows)}
    pending = {tasks[kind].remote(*args): (key, kind) for key, kind, args in jobs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        key, kind = pending.pop(ready[0])
        done = len(jobs) - len(pending)
        try:
            rows = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - one failed evaluation must not lose the others
            ctx.post_failed(key, kind, str(exc).splitlines()[-1])
            on_progress(done, len(jobs), kind, key, str(exc).splitlines()[-1])
            continue
        ctx.post_done(key, kind, rows)
        on_progress(done, len(jobs), kind, key)


def shutdown(handle: RayHandle) -> None:
    """Stop Ray (a local one with all its processes) and remove the private temp dir it ran in."""
    global _current_handle
    ray.shutdown()
    _current_handle = None  # nothing runs on it any more (cluster_slots must not read a stale one)
    if handle.started_here and handle.temp_dir:
        reaper_lib.stop(handle.reaper, handle.temp_dir)  # Ray has stopped: nothing left to reap


__all__ = ["CellStudies", "StudyContext", "init_ray", "run_trials", "run_post_phase", "cluster_slots",
           "check_address", "shutdown"]  # fmt: skip
