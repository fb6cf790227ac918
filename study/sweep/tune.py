"""Ray Tune execution of a study. THE ONLY MODULE THAT IMPORTS ray.

One Tuner runs both phases. Its Searcher asks each cell's Optuna study for the next configuration
(spreading trials across cells so all progress together) and, once a cell's search has ended, hands out
that cell's final trials: its best configuration retrained over seeds with full evaluation. Final trials
thus fill the slots that the search's last trials leave idle, and the worker processes (each with torch
imported and the dataset loaded) serve both phases. The TrialScheduler reports every epoch's validation
value to the cell's study and asks its pruner; pruned trials are told to Optuna as PRUNED (Ray's own
OptunaSearch would store them as COMPLETE with a partial-budget value).

Resume: the Optuna journal and the per-trial records under `records/` are the source of truth. A
resumed run re-issues trials the killed driver left RUNNING (same Optuna trial, same checkpoint dir, so
they continue from their last epoch) and asks only the remaining budget: nothing completed is re-run and
nothing is duplicated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
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
from study.sweep.context import StudyContext, TrialNames, post_jobs  # noqa: E402
from study.sweep.net import check_tcp, trial_error_text  # noqa: E402
from study.sweep.optuna_cells import CellStudies  # noqa: E402
from study.sweep.records import trial_payload  # noqa: E402
from study.sweep.source import FINISHED, TrialSource  # noqa: E402


def _trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: one dict in, a typed TrialConfig on the first line."""
    from study.trial.config import TrialConfig
    from study.trial.fit import resolve_device
    from study.trial.run import run_trial

    cfg = TrialConfig.model_validate(config["trial"])
    started_at = time.time()

    node = ray.util.get_node_ip_address()
    device = str(resolve_device(cfg.train.device))

    def report(row: dict[str, Any]) -> bool:
        tune.report({**row, "objective": row[cfg.metric], "node": node, "device": device})
        return False

    result = run_trial(cfg, report)
    payload = trial_payload(result, node=node, started_at=started_at)
    # The clean test metrics of a final trial as plain numbers too, for the trackers (spec `tracking`).
    test = {
        f"test_{r['metric']}": r["value"]
        for r in result.eval_rows
        if r["split"] == "test" and r["condition"] == "clean" and not r["metric"].startswith("bin_")
    }
    tune.report(
        {
            "final": json.dumps(payload),
            "objective": result.best_value if result.best_value is not None else float("nan"),
            **test,
        }
    )


class CellSearcher(Searcher):
    """Tune's view of the TrialSource: suggestions and trial ends are forwarded; nothing to checkpoint
    (the Optuna journal and the records are the searcher's durable state)."""

    def __init__(self, source: TrialSource, direction: str) -> None:
        super().__init__(metric="objective", mode="max" if direction == "maximize" else "min")
        self.source = source

    def remaining(self) -> int:
        return self.source.remaining()

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = self.source.suggest(trial_id)
        return Searcher.FINISHED if config == FINISHED else config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.source.ended(trial_id, result, error)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        return None

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        return None


class OptunaPruningScheduler(FIFOScheduler):
    """Reports every epoch to the cell's Optuna study and stops the trial when its pruner says so."""

    def __init__(self, ctx: StudyContext) -> None:
        super().__init__()
        self.ctx = ctx
        self._supports_buffered_results = False

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if "final" in result or "epoch" not in result:
            return TrialScheduler.CONTINUE
        return (
            TrialScheduler.STOP if self.ctx.epoch_result(trial.trial_id, result) else TrialScheduler.CONTINUE
        )


class Collector(Callback):
    """Collects epoch rows and final payloads in the driver and keeps the live view up to date."""

    def __init__(self, ctx: StudyContext) -> None:
        self.ctx = ctx

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        rec = self.ctx.by_tune_id.get(trial.trial_id)
        if rec is None:
            return
        if "final" in result:
            rec.payload = json.loads(result["final"])
        elif "epoch" in result:
            StudyContext.add_epoch_row(rec, result)
        self.ctx.progress()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ctx.finish(trial.trial_id, error=None)
        self.ctx.after_trial()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ctx.finish(trial.trial_id, error=trial_error_text(trial))
        self.ctx.after_trial()


@dataclass
class RayHandle:
    address: str
    temp_dir: str | None
    started_here: bool


# The handle of the Ray this process runs on (set by init_ray): cluster_slots tells local from remote.
_current_handle: RayHandle | None = None


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray's local-only mode while a private local Ray starts: every component listens on 127.0.0.1.

    On Linux, ray.init turns a loopback `_node_ip_address` into the machine's address
    (services.resolve_ip_for_localhost -> get_node_ip_address), and gcs_server, raylet and the workers
    then listen on all interfaces. With ray_constants.ENABLE_RAY_CLUSTER off (Ray's own switch,
    $RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read once at import; off by default on macOS and Windows)
    the node address stays 127.0.0.1, which the gcs, raylet and worker gRPC servers take as "listen on
    loopback only". Only the constant of this process is switched, and only during ray.init: joining
    a cluster later (--address) still resolves the machine's routable address.
    """
    from ray._private import ray_constants

    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


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
        temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
        with _loopback_only():
            ray.init(
                address="local",
                _temp_dir=temp_dir,
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=True,
                logging_level="ERROR",
                _node_ip_address="127.0.0.1",
            )
        _current_handle = RayHandle("local", temp_dir, True)
    else:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        _current_handle = RayHandle(address, None, False)
    return _current_handle


def check_address(address: str, timeout_s: float = 5.0) -> str | None:
    """None if a Ray cluster's GCS port at `address` accepts a TCP connection, else a one-line reason.

    Runs before the results dir is touched, so a wrong address fails in seconds instead of in ray.init.
    Accepts host:port (IPv6 as [addr]:port), ray://host:port and "auto" ($RAY_ADDRESS, else the cluster
    last started here with `ray start`; resolved now so that "no cluster" also fails early). "local" is
    always fine. Only opens and closes one TCP connection: a port that answers but is not Ray is caught
    later by ray.init.

    Args:
        address: the --address value.
        timeout_s: how long to wait for the TCP handshake (an unroutable host takes this long).
    """
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
    """How many trials to run at once when --max-concurrent is not given.

    Rule: as many trials as fit in the resources the cluster has right now (CPUs // cpus_per_trial and,
    when trials take GPUs, GPUs / gpus_per_trial), at least 1. On a local Ray that is exact. On a remote
    cluster (`handle`, default the one init_ray returned last, did not start Ray here) it is only a lower
    bound: an autoscaling cluster that starts with no GPU workers reports 0 GPUs, which gives 1, and Tune
    then keeps only one trial pending, so the autoscaler never adds a second node. The cluster's maximum
    cannot be read reliably, so we do not guess it: we print a one-line hint to stderr to pass
    --max-concurrent (trials beyond the current resources wait PENDING, which is what makes the
    autoscaler add nodes).
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


def tracking_callbacks(spec: StudySpec) -> list[Callback]:
    """Ray Tune's own logger callbacks for the spec's ``tracking`` block (each imported only if asked)."""
    t = spec.tracking
    callbacks: list[Callback] = []
    if t.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if t.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=t.mlflow.tracking_uri,
                experiment_name=t.mlflow.experiment_name or spec.name,
                tags={"study": spec.name},
            )
        )
    if t.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        extra = {"entity": t.wandb.entity} if t.wandb.entity else {}
        callbacks.append(
            WandbLoggerCallback(
                project=t.wandb.project, group=t.wandb.group or spec.name, mode=t.wandb.mode, **extra
            )
        )
    return callbacks


def _resources(spec: StudySpec) -> dict[str, float]:
    return {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}


def run_trials(
    spec: StudySpec,
    out: Path,
    ctx: StudyContext,
    max_concurrent: int,
    on_search_done: Callable[[], None] = lambda: None,
) -> None:
    """Both phases in one Tuner (see the module docstring); `on_search_done` runs once, in the driver,
    when every cell's search has ended (also at once when a resumed study's search had ended before)."""
    source = TrialSource(spec, list(ctx.cells.values()), ctx.studies, ctx, on_search_done)
    remaining = source.remaining()
    if remaining == 0:
        source.queue_finals()  # nothing to run: still tells on_search_done
        return
    searcher = CellSearcher(source, spec.search.direction)
    tuner = tune.Tuner(
        tune.with_resources(_trainable, _resources(spec)),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=OptunaPruningScheduler(ctx),
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
            callbacks=[Collector(ctx), *tracking_callbacks(spec)],
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
    """Transfer attacks and distillation (study/sweep/context.post_jobs) as Ray tasks over the finished
    final-phase models; each result lands in its record as soon as it arrives. `on_start(jobs)` runs
    when there is something to do, `on_progress(done, total, kind, key, error)` after each job."""
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
    ray.shutdown()
    if handle.started_here and handle.temp_dir:
        shutil.rmtree(handle.temp_dir, ignore_errors=True)


__all__ = [
    "CellStudies",
    "StudyContext",
    "init_ray",
    "run_trials",
    "run_post_phase",
    "tracking_callbacks",
    "cluster_slots",
    "check_address",
    "shutdown",
]
