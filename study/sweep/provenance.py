"""Where a study's results came from: package versions and the git state, for its manifest."""

from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """The versions of Python and of the packages whose behaviour the numbers depend on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("regstudy", "torch", "torchvision", "ray", "optuna", "pyarrow"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """The commit the study was run from: ``git_sha`` / ``git_dirty`` of the user's working directory
    (their specs, label files, own regularizers) when it is a git repository, else None; and
    ``package_git_sha``, the regstudy checkout's commit (None for an installed wheel)."""
    cwd = Path.cwd() if cwd is None else cwd
    sha = _git(["rev-parse", "HEAD"], cwd) or None
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], cwd) if sha else None
    return {
        "git_sha": sha,
        "git_dirty": None if dirty is None else bool(dirty),
        "package_git_sha": _git(["rev-parse", "HEAD"], Path(__file__).parent) or None,
    }
