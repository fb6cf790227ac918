"""Time and peak memory of study.metrics.classification_metrics on large logits (CPU).

Each configuration runs in a fresh subprocess so that ru_maxrss (a high-water mark) is its own.
Usage: python bench/bench_metrics.py [--n 1000000] [--k 100] [--repeats 3] [--write bench/bench_metrics.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _child(n: int, k: int, chunk_size: int | None, repeats: int) -> dict:
    import torch

    from study import metrics

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, k, generator=g).mul_(3)  # in place: no temporary raises the baseline
    labels = torch.randint(0, k, (n,), generator=g)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after the inputs exist
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = metrics.classification_metrics(logits, labels, chunk_size=chunk_size)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "chunk_size": chunk_size or metrics.CHUNK_SIZE,
        "best_s": min(times),
        "median_s": sorted(times)[len(times) // 2],
        "best_cpu_s": min(cpu_times),
        "inputs_mib": (logits.numel() * 4 + labels.numel() * 8) / 2**20,
        "rss_before_mib": base_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "extra_peak_mib": (peak_kib - base_kib) / 1024,
        "ece": out["ece"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", default=None, help="markdown file to write the results into")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        chunk = None if args.child == "default" else int(args.child)
        print(json.dumps(_child(args.n, args.k, chunk, args.repeats)))
        return
    rows = []
    for chunk in ("default", str(args.n)):  # the module default vs one chunk holding all N rows
        cmd = [sys.executable, __file__, "--n", str(args.n), "--k", str(args.k)]
        cmd += ["--repeats", str(args.repeats), "--child", chunk]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    arch = platform.processor() or platform.machine()
    machine = f"{arch}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, CPU only"
    lines = [
        "# bench_metrics: classification_metrics on large logits",
        "",
        f"Date: {dt.date.today().isoformat()}. Machine: {machine}; load average at the end "
        f"{os.getloadavg()[0]:.1f} (shared with other jobs). torch threads: 2.",
        f"Input: N = {args.n:,} x K = {args.k} float32 logits ({rows[0]['inputs_mib']:.0f} MiB with labels), "
        f"all nine metrics in one pass, best / median of {args.repeats} runs.",
        "Extra peak = ru_maxrss after the runs minus ru_maxrss once the inputs exist (fresh process each);",
        "CPU s = process time summed over threads (less sensitive than wall time to other jobs' load).",
        "",
        "| chunk_size | best wall s | median wall s | best CPU s | extra peak RSS MiB | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chunk_size']:,} | {r['best_s']:.2f} | {r['median_s']:.2f} | {r['best_cpu_s']:.2f} | "
            f"{r['extra_peak_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "Reading: the default chunking bounds the extra memory by O(chunk x K) (about 40 bytes per chunk",
        "entry: float32 softmax, its float64 copy and int64 class-bin indices for classwise ECE) plus O(N)",
        "for the adaptive-ECE sort; one chunk of all N rows needs ~2 GiB more. Most of the time goes to",
        "binning all N x K probabilities for classwise ECE (torch profiler at N = 100k).",
        "",
        "Command: `python bench/bench_metrics.py --write bench/bench_metrics.md`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
