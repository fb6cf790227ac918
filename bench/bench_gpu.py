"""GPU throughput of ResNet-20 on CIFAR-shaped synthetic data: our hot path vs a DataLoader, and packing.

Two subcommands (results as markdown tables on stdout, and as JSON with ``--json PATH``):

- ``images``: training images/s of one process on the GPU, batch 128, SGD (nesterov, as the CIFAR
  spec), bf16 autocast + channels_last exactly as study.train.run_trial does on CUDA:
    (a) hot path: uint8 data resident on the device, study.data.DeviceBatches with the on-device
        "crop_flip" augmentation (the batching run_trial uses); also with cudnn.benchmark on;
    (b) a DataLoader over a CPU Dataset of PIL images with torchvision transforms (RandomCrop(32, 4),
        RandomHorizontalFlip, ToTensor, Normalize), pin_memory, non_blocking copies, for each
        ``--workers`` value;
    (c) run_trial itself (full_eval off) on the same synthetic bundle: median epoch wall_s of epochs
        2.. (it includes the per-epoch validation pass over the 5k held-out samples), as images/s
        of training samples.
  (a)/(b): ``--warmup`` steps, then ``--steps`` timed steps between torch.cuda.synchronize() calls.
- ``packing``: for each ``--trials`` N, N concurrent run_trial processes (multiprocessing spawn: one
  process per trial on the one CUDA device, as Ray runs trials with fractional gpus_per_trial). Each
  trains ``--epochs`` epochs; epoch 1 is warm-up and ends at a barrier shared by all N, so the timed
  window (epoch-1 report to last-epoch report, validation included) starts together everywhere.
  Reported: aggregate training samples/s (all samples / (last end - common start)), per-trial
  samples/s, trials/hour EXTRAPOLATED to a 30-epoch 45k-sample trial, peak torch allocator memory per
  process, and (nvidia-smi, polled every 0.5 s) peak per-process GPU memory incl. the CUDA context and
  mean GPU utilisation.

The data are random uint8 images (fixed seed) with random labels: throughput does not depend on
what is learned. No download. Without a CUDA device the script says so and exits 0; ``--device cpu``
runs a tiny variant for debugging.

Usage: python bench/bench_gpu.py images [--steps 300] [--warmup 50] [--workers 4 8] [--json out.json]
       python bench/bench_gpu.py packing [--trials 1 2 4 8] [--epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from study import data, models, regularizers
from study.trial.config import TrialConfig
from study.trial.run import run_trial

BATCH = 128
VAL_FRACTION = 0.1  # the CIFAR-10 spec's: 45k train / 5k validation of the 50k training images
TRIAL_EPOCHS, TRIAL_SAMPLES = 30, 45_000  # the trial the trials/hour column is extrapolated to


# ---------------------------------------------------------------------------------------------- setup


def synthetic_bundle(n_train: int, n_test: int, seed: int = 0) -> data.DatasetBundle:
    """CIFAR-shaped random bundle: uint8 (N, 3, 32, 32) images, int64 labels in [0, 10), fixed seed."""
    g = torch.Generator().manual_seed(seed)
    x_tr = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    x_te = torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    y_tr = torch.randint(0, 10, (n_train,), generator=g)
    y_te = torch.randint(0, 10, (n_test,), generator=g)
    f = x_tr[:5000].float().div_(255.0)
    mean = tuple(f.mean((0, 2, 3)).tolist())
    std = tuple(f.std((0, 2, 3)).tolist())
    return data.DatasetBundle(
        name="cifar10",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        num_classes=10,
        input_shape=(3, 32, 32),
        kind="image",
        value_range=(0.0, 1.0),
        mean=mean,
        std=std,
        data_std=float(f.std()),
    )


def trial_config(epochs: int, device: str, batch_size: int = BATCH, model: str = "resnet20") -> TrialConfig:
    """The cifar10_noise spec's training recipe (ce, no noise, no final evaluation); resnet20 by default."""
    return TrialConfig(
        dataset={"name": "cifar10", "val_fraction": VAL_FRACTION},
        model={"name": model},
        train={
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "cosine",
            "augment": True,
            "precision": "auto",
            "device": device,
        },
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_and_opt(
    bundle: data.DatasetBundle, device: torch.device, normalise: bool
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    stats = {"mean": bundle.mean, "std": bundle.std} if normalise else {}
    model = models.create_model("resnet20", bundle.input_shape, bundle.num_classes, **stats).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    return model, opt


def _timed_steps(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device,
    warmup: int,
    steps: int,
) -> float:
    """Images/s over ``steps`` training steps after ``warmup`` ones; the step is run_trial's."""
    reg = regularizers.create("ce").to(device)
    model.train()
    use_bf16 = device.type == "cuda"
    n_seen, t0 = 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0, n_seen = time.perf_counter(), 0
        xb, yb = next(batches)
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(xb)
        loss = reg(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_seen += len(yb)
    _sync(device)
    return n_seen / (time.perf_counter() - t0)


def _cycle(iterable: Any) -> Iterator[Any]:
    while True:
        yield from iterable


# ---------------------------------------------------------------------------------------------- images


def hot_path_rate(
    bundle: data.DatasetBundle,
    device: torch.device,
    warmup: int,
    steps: int,
    cudnn_benchmark: bool = False,
    batch_size: int = BATCH,
    part: str = "full",
) -> float:
    """(a) Device-resident uint8 data + DeviceBatches(crop_flip) + bf16 + channels_last, in images/s.

    ``part`` splits the step to show where its time goes: "full" (batching + training step),
    "batches" (DeviceBatches with crop_flip alone, no model), "step" (the training step alone on one
    fixed, already augmented batch).
    """
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.manual_seed(0)
    model, opt = _model_and_opt(bundle, device, normalise=True)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = data.DeviceBatches(
        bundle.x_train.to(device),
        bundle.y_train.to(device),
        batch_size,
        shuffle=True,
        generator=gen,
        augment="crop_flip",
        to_float=bundle.to_float,
        drop_last=True,
    )
    it = _cycle(batches)
    try:
        if part == "batches":
            for i in range(warmup + steps):
                if i == warmup:
                    _sync(device)
                    t0 = time.perf_counter()
                next(it)
            _sync(device)
            return steps * batch_size / (time.perf_counter() - t0)
        if part == "step":
            it = _cycle([next(it)])
        return _timed_steps(it, model, opt, device, warmup, steps)
    finally:
        torch.backends.cudnn.benchmark = False


class _PILDataset(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's __getitem__: an HWC uint8 array -> PIL image -> transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Any) -> None:
        self.x = x.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C), as CIFAR10.data
        self.y = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def dataloader_rate(
    bundle: data.DatasetBundle, device: torch.device, workers: int, warmup: int, steps: int
) -> float:
    """(b) CPU Dataset + torchvision transforms + DataLoader(workers, pin_memory) + non_blocking copies."""
    import torchvision.transforms as T

    torch.manual_seed(0)
    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(bundle.mean, bundle.std),
        ]
    )
    loader = torch.utils.data.DataLoader(
        _PILDataset(bundle.x_train, bundle.y_train, tf),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )
    # Normalize already ran in the workers, so the model does not normalise again (same network).
    model, opt = _model_and_opt(bundle, device, normalise=False)
    return _timed_steps(_cycle(loader), model, opt, device, warmup, steps)


def run_trial_rate(
    bundle: data.DatasetBundle, device: torch.device, epochs: int, model: str = "resnet20"
) -> dict[str, float]:
    """(c) study.train.run_trial on the bundle: median wall_s of epochs 2.. and training images/s."""
    res = run_trial(trial_config(epochs, str(device), model=model), bundle=bundle)
    walls = [row["wall_s"] for row in res.epoch_rows[1:]] or [res.epoch_rows[0]["wall_s"]]
    n_train = round(len(bundle.y_train) * (1 - VAL_FRACTION))
    epoch_s = statistics.median(walls)
    return {
        "epoch_s": epoch_s,
        "first_epoch_s": res.epoch_rows[0]["wall_s"],
        "images_per_s": n_train / epoch_s,
    }


def cmd_images(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    bundle = synthetic_bundle(args.n_train, args.n_test)
    rows: list[dict[str, Any]] = []
    hot = "(a) hot path: device uint8 + DeviceBatches crop_flip"
    variants = [
        (f"{hot}, batch {BATCH}", {}),
        (f"{hot}, batch {BATCH}, + cudnn.benchmark", {"cudnn_benchmark": True}),
        (f"(a-i) DeviceBatches crop_flip alone (no model), batch {BATCH}", {"part": "batches"}),
        (f"(a-ii) training step alone on one fixed batch of {BATCH}", {"part": "step"}),
        *((f"{hot}, batch {b} (not the spec's batch)", {"batch_size": b}) for b in args.hot_batches),
    ]
    for name, kw in variants:
        rate = hot_path_rate(bundle, device, args.warmup, args.steps, **kw)
        rows.append({"pipeline": name, "images_per_s": rate})
        print(f"{name}: {rate:,.0f} img/s", flush=True)
    for w in args.workers:
        rate = dataloader_rate(bundle, device, w, args.warmup, args.steps)
        name = f"(b) DataLoader + torchvision transforms, num_workers={w}"
        rows.append({"pipeline": name, "images_per_s": rate})
        print(f"{name}: {rate:,.0f} img/s", flush=True)
    rt = run_trial_rate(bundle, device, args.trial_epochs)
    n_val = args.n_train - round(args.n_train * (1 - VAL_FRACTION))
    name = f"(c) run_trial, median epoch of {args.trial_epochs} (incl. {n_val} validation)"
    rows.append({"pipeline": name, "images_per_s": rt["images_per_s"], **rt})
    print(f"{name}: {rt['images_per_s']:,.0f} img/s ({rt['epoch_s']:.2f} s/epoch)", flush=True)
    print("\n| pipeline | images/s |\n| --- | ---: |")
    for r in rows:
        print(f"| {r['pipeline']} | {r['images_per_s']:,.0f} |")
    return {"images": rows, "steps": args.steps, "warmup": args.warmup, "batch": BATCH}


def cmd_trainer(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """run_trial with its fused optimizer (what it does on CUDA) vs the same with the foreach path,
    alternating A/B/A/B so that drift on the machine hits both."""
    from study.trial import fit as train

    bundle = synthetic_bundle(args.n_train, args.n_test)
    fused_factory = train._optimizer

    def foreach_factory(cfg: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
        opt = fused_factory(cfg, model)
        return type(opt)(model.parameters(), **{**opt.defaults, "fused": None, "foreach": True})

    rows: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for name, factory in (("fused", fused_factory), ("foreach", foreach_factory)):
            train._optimizer = factory
            try:
                rt = run_trial_rate(bundle, device, args.trial_epochs, args.model)
            finally:
                train._optimizer = fused_factory
            rows.append({"optimizer": name, "repeat": rep, **rt})
            print(f"{name} #{rep}: {rt['images_per_s']:,.0f} img/s ({rt['epoch_s']:.2f} s/epoch)", flush=True)
    med = {
        k: statistics.median(r["images_per_s"] for r in rows if r["optimizer"] == k)
        for k in ("fused", "foreach")
    }
    print(
        f"median images/s: fused {med['fused']:,.0f}, foreach {med['foreach']:,.0f}; "
        f"ratio {med['fused'] / med['foreach']:.3f}"
    )
    return {"trainer": rows, "median": med}


# ---------------------------------------------------------------------------------------------- packing


def _trial_worker(
    rank: int, args: dict[str, Any], barrier: Any, queue: Any
) -> None:  # runs in a spawned process
    try:
        torch.set_num_threads(args["threads"])
        device = torch.device(args["device"])
        bundle = synthetic_bundle(args["n_train"], args["n_test"])
        stamps: list[float] = []

        def report(row: dict[str, Any]) -> None:
            if row["epoch"] == 1:
                _sync(device)
                barrier.wait(timeout=600)  # every trial is warm before anyone's timed window opens
            stamps.append(time.monotonic())  # CLOCK_MONOTONIC: comparable across processes

        cfg = trial_config(args["epochs"], args["device"], model=args["model"])
        res = run_trial(cfg, report, bundle=bundle)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
        n_train = round(args["n_train"] * (1 - VAL_FRACTION))
        queue.put(
            {
                "rank": rank,
                "t0": stamps[0],
                "t1": stamps[-1],
                "samples": n_train * (len(stamps) - 1),
                "epoch_s": [r["wall_s"] for r in res.epoch_rows],
                "max_allocated": peak,
                "max_reserved": reserved,
                "status": res.status,
            }
        )
    except Exception as e:  # report instead of leaving the parent waiting
        barrier.abort()
        queue.put({"rank": rank, "error": repr(e)})


def _poll_nvidia_smi(stop: threading.Event, mem: dict[int, float], util: list[float]) -> None:
    """Peak used_memory (MiB) per compute pid and GPU utilisation samples, every 0.5 s."""
    q_apps = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    q_gpu = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    while not stop.wait(0.5):
        try:
            for line in subprocess.run(q_apps, capture_output=True, text=True, timeout=5).stdout.splitlines():
                pid, used = (s.strip() for s in line.split(","))
                mem[int(pid)] = max(mem.get(int(pid), 0.0), float(used))
            out = subprocess.run(q_gpu, capture_output=True, text=True, timeout=5).stdout.strip()
            if out:
                util.append(float(out.splitlines()[0]))
        except (OSError, ValueError, subprocess.SubprocessError):
            return


def pack(n: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Run n concurrent trials and summarise their timed windows."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    threads = args.threads or max(1, min(4, args.cores // n))
    wargs = {
        "device": str(device),
        "epochs": args.epochs,
        "model": args.model,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "threads": threads,
    }
    stop, mem, util = threading.Event(), {}, []
    poller = threading.Thread(target=_poll_nvidia_smi, args=(stop, mem, util), daemon=True)
    if device.type == "cuda":
        poller.start()
    procs = [ctx.Process(target=_trial_worker, args=(r, wargs, barrier, queue)) for r in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    stop.set()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} trial processes failed: {errors}")
    pids = {p.pid for p in procs}
    smi_mib = [v for pid, v in mem.items() if pid in pids]
    t0, t1 = min(r["t0"] for r in results), max(r["t1"] for r in results)
    per_trial = [r["samples"] / (r["t1"] - r["t0"]) for r in results]
    aggregate = sum(r["samples"] for r in results) / (t1 - t0)
    return {
        "trials": n,
        "threads_per_trial": threads,
        "aggregate_samples_per_s": aggregate,
        "per_trial_samples_per_s_mean": statistics.mean(per_trial),
        "per_trial_samples_per_s_min": min(per_trial),
        # EXTRAPOLATED: a 30-epoch, 45k-sample trial at the measured aggregate rate (no final evaluation).
        "trials_per_hour_extrapolated": aggregate * 3600 / (TRIAL_EPOCHS * TRIAL_SAMPLES),
        "max_allocated_mib": max(r["max_allocated"] for r in results) / 2**20,
        "max_reserved_mib": max(r["max_reserved"] for r in results) / 2**20,
        "nvidia_smi_mib_per_process": max(smi_mib) if smi_mib else None,
        "gpu_util_mean_pct": statistics.mean(util) if util else None,
        "window_s": t1 - t0,
        "epoch_s": [r["epoch_s"] for r in results],
    }


def cmd_packing(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rows = []
    for n in args.trials:
        row = pack(n, args, device)
        rows.append(row)
        print(
            f"N={n}: aggregate {row['aggregate_samples_per_s']:,.0f} samples/s, per trial "
            f"{row['per_trial_samples_per_s_mean']:,.0f}, window {row['window_s']:.1f} s",
            flush=True,
        )
    base = rows[0]["aggregate_samples_per_s"]
    print(
        "\n| trials | aggregate samples/s | x vs first | per-trial samples/s (mean / min) "
        "| trials/hour (extrapolated) | peak alloc MiB/proc | peak reserved MiB/proc "
        "| nvidia-smi MiB/proc | GPU util % |\n" + "| ---: " * 9 + "|"
    )
    for r in rows:
        smi = r["nvidia_smi_mib_per_process"]
        gu = r["gpu_util_mean_pct"]
        print(
            f"| {r['trials']} | {r['aggregate_samples_per_s']:,.0f} "
            f"| {r['aggregate_samples_per_s'] / base:.2f} "
            f"| {r['per_trial_samples_per_s_mean']:,.0f} / {r['per_trial_samples_per_s_min']:,.0f} "
            f"| {r['trials_per_hour_extrapolated']:.1f} | {r['max_allocated_mib']:,.0f} "
            f"| {r['max_reserved_mib']:,.0f} | {'-' if smi is None else f'{smi:,.0f}'} "
            f"| {'-' if gu is None else f'{gu:.0f}'} |"
        )
    return {"packing": rows, "epochs": args.epochs, "model": args.model}


# ---------------------------------------------------------------------------------------------- main


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        q = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        try:
            env["nvidia_smi"] = subprocess.run(q, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["nvidia_smi"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["images", "packing", "trainer"])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a tiny debugging run")
    p.add_argument("--n-train", type=int, default=None, help="default 50000 (cuda) / 1000 (cpu)")
    p.add_argument("--n-test", type=int, default=None, help="default 10000 (cuda) / 100 (cpu)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (images); default 300 / 5 on cpu")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (images); default 50 / 2 on cpu")
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8], help="DataLoader num_workers values")
    p.add_argument("--hot-batches", type=int, nargs="*", default=[], help="extra hot-path batch sizes")
    p.add_argument("--trial-epochs", type=int, default=3, help="run_trial epochs for (c); first is warm-up")
    p.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent trials (packing)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per packed trial; the first is warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch threads per trial (0: cores/N, 1..4)")
    p.add_argument("--cores", type=int, default=16, help="CPU cores to share between packed trials")
    p.add_argument("--repeats", type=int, default=3, help="A/B repeats (trainer)")
    p.add_argument("--model", default="resnet20", help="registered model for run_trial (trainer, packing)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device (none found); use --device cpu for a tiny debugging run.")
        return 0
    tiny = device.type == "cpu"
    args.n_train = args.n_train or (1000 if tiny else 50_000)
    args.n_test = args.n_test or (100 if tiny else 10_000)
    args.steps = args.steps or (5 if tiny else 300)
    args.warmup = args.warmup or (2 if tiny else 50)
    env = environment(device)
    print(json.dumps(env), flush=True)
    commands = {"images": cmd_images, "packing": cmd_packing, "trainer": cmd_trainer}
    out = commands[args.command](args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, **out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
