"""Benchmark: build_summary + render on a large synthetic study (100k trials, ~1M epoch and eval rows).

Usage: python bench/bench_report.py [--dir DIR]   (generates the study once, then measures in a
fresh subprocess so peak RSS counts only loading + statistics + rendering, not the generator).
Results are recorded in bench/bench_report.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# 2 datasets x 5 models x 8 regularizers x 10 noise settings = 800 cells; 115 search + 10 final each
SPEC = dict(
    datasets=("mnist1d", "cifar10"),
    models=("mlp", "cnn1d", "cnn", "resnet20", "resnet56"),
    regularizers=(
        "ce",
        "label_smoothing",
        "maxsup",
        "confidence_penalty",
        "online_label_smoothing",
        "logit_penalty",
        "logitnorm",
        "focal",
    ),  # fmt: skip
    noise_settings=(
        "none",
        "symmetric:0.2",
        "symmetric:0.4",
        "symmetric:0.6",
        "asymmetric:0.2",
        "asymmetric:0.4",
        "pairflip:0.45",
        "instance:0.2",
        "adversarial-confident:0.2",
        "adversarial-boundary:0.2",
    ),  # fmt: skip
    seeds=10,
    search_trials=115,
    max_epochs=16,
    bins=15,
    corruptions=9,
)


def measure(out: Path) -> dict:
    from rich.console import Console

    from reports.build import build_summary, load_study
    from reports.export import render_markdown
    from reports.render import render_rich

    t0 = time.perf_counter()
    summary = build_summary(out)
    t1 = time.perf_counter()
    study = load_study(out)
    study.summary = summary
    with open("/dev/null", "w") as sink:
        render_rich(study, Console(width=80, file=sink))
    t2 = time.perf_counter()
    md = render_markdown(study)
    t3 = time.perf_counter()
    return {"build_summary_s": t1 - t0, "load_and_render_rich_s": t2 - t1, "render_markdown_s": t3 - t2,
            "total_s": t3 - t0, "summary_rows": len(summary), "markdown_chars": len(md),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    out = args.dir or Path(tempfile.mkdtemp(prefix="bench_report_"))
    if not (out / "trials.parquet").exists():
        from reports.synthetic import make_synthetic_study

        t = time.perf_counter()
        frames = make_synthetic_study(out, name="bench", **SPEC)
        sizes = {k: len(v) for k, v in frames.items()}
        print(f"generated {sizes} in {time.perf_counter() - t:.1f} s at {out}")
    res = subprocess.run(
        [sys.executable, __file__, "--measure", str(out)], capture_output=True, text=True, check=True
    )
    print(res.stdout.strip())


if __name__ == "__main__":
    main()
