"""A `sitecustomize` that replaces ``study.trial.run``'s ``run_trial`` and ``run_pack`` in every process
that imports it (Ray workers too: they inherit PYTHONPATH), for tests that need trials to misbehave in
ways no spec can ask for: hang once started, or fail at run time."""

from __future__ import annotations

import os
from pathlib import Path

_HOOK = """
import importlib.abc, importlib.machinery, os, sys, time
from pathlib import Path

class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "study.trial.run":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)

            def replaced(*args, **kwargs):
{body}

            module.run_trial = module.run_pack = replaced

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Hook())
"""

# A trial says it has started (the file named by STUDY_STARTED) and then waits to be killed.
HOLD = """\
                Path(os.environ["STUDY_STARTED"]).write_text(str(os.getpid()))
                while True:
                    time.sleep(3600)"""
# Every trial fails at run time.
FAIL = """\
                raise RuntimeError("injected: the GPU fell off the bus")"""


def env_with_hook(folder: Path, body: str, **extra: str) -> dict[str, str]:
    """os.environ plus PYTHONPATH holding a sitecustomize (in `folder`) whose trials run `body`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_HOOK.format(body=body))
    path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}
