"""Damage a study survives without Ray: a torn journal, a second writer, a read-only results dir,
a driver that died with its manifest saying "running", and the file modes of what it writes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from reports.build import write_table
from reports.query import list_studies
from study.spec import parse_spec, spec_hash
from study.sweep.cells import expand_cells
from study.sweep.lock import LockedError, ResultsLock
from study.sweep.optuna_cells import CellStudies, repair_journal
from study.sweep.records import Records, TrialRecord
from study.sweep.runner import _write_json
from study.vocabulary import LOCK_OWNER_FILE

STUDY_BIN = str(Path(sys.executable).with_name("study"))
ROOT = Path(__file__).resolve().parents[2]

SPEC = """\
name: damage
dataset: {name: mnist1d}
models: [cnn1d]
regularizers: {label_smoothing: {alpha: {low: 0.0, high: 0.3}}}
noise: [{kind: none}]
train: {epochs: 2, lr: 0.01}
search: {trials_per_cell: 6, sampler: random, pruner: {kind: none}}
final: {seeds: 1}
"""


def _studies(journal: Path) -> CellStudies:
    spec = parse_spec(SPEC)
    return CellStudies(spec, expand_cells(spec), journal)


def _run_trials(studies: CellStudies, n: int) -> None:
    cell = studies.cells[0]
    for i in range(n):
        trial = studies.ask(cell)
        studies.tell(trial._trial_id, TrialState.COMPLETE, float(i))


def test_torn_journal_is_repaired_and_the_study_goes_on(tmp_path):
    journal = tmp_path / "optuna.journal"
    _run_trials(_studies(journal), 3)
    whole = journal.read_bytes()
    # A crash while appending the next record: half of a line, no newline.
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[1]
    journal.write_bytes(whole + last[: len(last) // 2])

    # Without a repair, Optuna's next append is glued onto the fragment and every read then fails.
    broken = tmp_path / "unrepaired.journal"
    broken.write_bytes(journal.read_bytes())
    with pytest.raises(ValueError):
        _run_trials(_studies(broken), 1)
        JournalStorage(JournalFileBackend(str(broken))).get_all_studies()

    note = repair_journal(journal)
    assert note is not None and f"dropped {len(last) // 2} bytes" in note
    assert journal.read_bytes() == whole
    backups = list(tmp_path.glob("optuna.journal.damaged-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == whole + last[: len(last) // 2]
    assert repair_journal(journal) is None  # an intact journal is left alone

    studies = _studies(journal)
    cell_id = studies.cells[0].cell_id
    assert [t.value for t in studies.trials(cell_id)] == [0.0, 1.0, 2.0]
    _run_trials(studies, 3)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    reread = optuna.load_study(study_name=cell_id, storage=storage).get_trials()
    assert [t.value for t in reread] == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
    assert all(t.state == TrialState.COMPLETE for t in reread)


def test_torn_journal_ending_in_a_garbled_line_is_cut_to_the_last_record(tmp_path):
    journal = tmp_path / "optuna.journal"
    _run_trials(_studies(journal), 2)
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id"\n\x00\x00\x00')
    assert repair_journal(journal) is not None
    assert journal.read_bytes() == whole


HOLDER = """
import sys, time
from pathlib import Path
from study.sweep.lock import ResultsLock
with ResultsLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held_lock(tmp_path):
    """Another process holding the results directory's lock (as a running `study run` does)."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_second_writer_is_refused_naming_the_holder(held_lock):
    out, pid = held_lock
    owner = json.loads((out / LOCK_OWNER_FILE).read_text())
    assert owner["pid"] == pid and owner["host"]
    with pytest.raises(LockedError, match=f"pid {pid} on host {owner['host']}"):
        ResultsLock(out).acquire()


@pytest.mark.parametrize("resume", [False, True])
def test_study_run_on_a_locked_dir_exits_2_before_ray(held_lock, tmp_path, resume):
    out, pid = held_lock
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    before = sorted(p.name for p in out.iterdir())
    cmd = [STUDY_BIN, "run", str(spec), "--out", str(out), "--quiet", "--no-report"]
    res = subprocess.run([*cmd, "--resume"] if resume else cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and f"pid {pid} on host" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_lock_is_free_again_when_its_holder_is_killed(held_lock):
    out, pid = held_lock
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with ResultsLock(out):
                owner = json.loads((out / LOCK_OWNER_FILE).read_text())
                assert owner["pid"] == os.getpid()
                return
        except LockedError:
            time.sleep(0.1)
    pytest.fail("the lock of a killed process was never released")


def _manifest(out: Path, status: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    spec = parse_spec(SPEC)
    _write_json(out / "manifest.json", {"study": "damage", "spec_hash": spec_hash(spec), "status": status})


def test_ls_shows_a_running_study_without_its_driver_as_interrupted(tmp_path, held_lock):
    live, _ = held_lock  # a driver holds this one
    _manifest(live, "running")
    _manifest(tmp_path / "dead", "running")  # its driver died: nobody holds the lock
    _manifest(tmp_path / "done", "completed")
    status = {Path(s["path"]).name: s["status"] for s in list_studies(tmp_path)}
    assert status == {"out": "running", "dead": "interrupted", "done": "completed"}
    res = subprocess.run([STUDY_BIN, "ls", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "interrupted" in res.stdout


def _immutable(path: Path) -> bool:
    """Make `path` unwritable even for root (chattr +i); False where that is not possible."""
    path.chmod(0o555)
    if not os.access(path, os.W_OK):
        return True
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def test_read_only_results_dir_is_one_line_exit_2(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    if not _immutable(out):
        pytest.skip("cannot make a directory read-only here")
    try:
        for extra in ([], ["--resume"]):
            res = subprocess.run(
                [STUDY_BIN, "run", str(spec), "--out", str(out), "--quiet", *extra],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert res.returncode == 2, res.stderr
            assert len(res.stderr.strip().splitlines()) == 1 and "cannot write" in res.stderr
            assert "Traceback" not in res.stderr
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)
        out.chmod(0o755)


def test_result_files_are_readable_by_the_group(tmp_path):
    old = os.umask(0o022)
    try:
        write_table(tmp_path, "summary", [{"cell_id": "c", "metric": "accuracy"}])
        rec = TrialRecord(
            key="search|c|0", trial_id="t", phase="search", cell_id="c", index=0, config={}, params={}
        )
        Records(tmp_path / "records").save(rec)
        _write_json(tmp_path / "manifest.json", {"status": "running"})
    finally:
        os.umask(old)
    files = [tmp_path / "summary.parquet", tmp_path / "records" / "search" / "search_c_0.json"]
    for path in [*files, tmp_path / "manifest.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
