"""Checkpoint disk use of the quickstart, before and after the search checkpoints are removed.

    python bench/bench_disk.py [SPEC]   # default search_spaces/quickstart.yaml

Runs the study once with `search.keep_checkpoints: true` (what every run kept before the cleanup
existed), measures checkpoints/, then applies the cleanup a default run does
(StudyContext.remove_search_checkpoints: every ended search trial's checkpoint goes, final models
stay) and measures again. Results are printed as markdown lines; bench/bench_disk.md records them.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _size(paths: list[Path]) -> tuple[int, int]:
    files = [f for p in paths for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def main(spec_path: Path) -> None:
    from study.spec import load_spec
    from study.sweep.context import StudyContext
    from study.sweep.runner import run_study

    with tempfile.TemporaryDirectory() as tmp:
        raw = yaml.safe_load(spec_path.read_text())
        raw.setdefault("search", {})["keep_checkpoints"] = True
        kept = Path(tmp) / "spec.yaml"
        kept.write_text(yaml.safe_dump(raw))
        out = run_study(kept, out=Path(tmp) / "out", quiet=True)
        ck = out / "checkpoints"
        search, final = sorted(ck.glob("search*")), sorted(ck.glob("final*"))
        before, n_before = _size([ck])
        s_bytes, _ = _size(search)
        # The spec as given (keep_checkpoints false): the cleanup of a default run.
        StudyContext(load_spec(spec_path), out, None, lambda: None).remove_search_checkpoints()
        after, n_after = _size([ck])
    mib = 1024 * 1024
    print(f"| {spec_path.name} | {len(search)} search + {len(final)} final trial dirs |")
    print(f"| before (every checkpoint kept) | {before / mib:.2f} MiB in {n_before} files "
          f"(search {s_bytes / mib:.2f} MiB) |")  # fmt: skip
    print(f"| after (final models only) | {after / mib:.2f} MiB in {n_after} files |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "search_spaces" / "quickstart.yaml")
