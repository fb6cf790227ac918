"""`study run --address` on a real two-node Ray cluster, and on addresses where no cluster answers.

The cluster: two network namespaces on this machine joined by a veth pair (tests/sweep/netns.py), a Ray head
in one (10.77.0.1) and a worker node in the other (10.77.0.2), one CPU each; the driver runs in the
head's namespace. Both nodes see the same filesystem, as a cluster's shared mount would give them.
Checks: trials run on both nodes; losing the worker node mid-study costs no trial and duplicates none
(Tune retries them on the head, spec `max_failures: 2`); a bad --address fails fast with exit code 2
and leaves no results dir behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import netns
import nodegate
import optuna
import pandas as pd
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from study.spec import load_spec
from study.sweep.cells import expand_cells

BIN = Path(sys.executable).parent
STUDY_BIN, RAY_BIN = str(BIN / "study"), str(BIN / "ray")
PORT = 6379  # each namespace has its own port space: no clash with any other Ray on the machine

SPEC = """\
name: multinode
dataset: {{name: mnist1d, options: {{max_train: 800, max_test: 400}}}}
models: [cnn1d]
regularizers:
  "{prefix}ce": {{}}
  "{prefix}label_smoothing": {{alpha: {{low: 0.0, high: 0.3}}}}
noise:
  - {{kind: none}}
train: {{epochs: {epochs}, batch_size: 128, lr: {{low: 1.0e-4, high: 3.0e-2, log: true}}}}
search:
  trials_per_cell: 3
  sampler: tpe
  n_startup_trials: 1
  pruner: {{kind: median, n_startup_trials: {prune_after}, n_warmup_steps: 1}}
final: {{seeds: 1}}
resources: {{cpus_per_trial: 1}}
max_failures: 2
"""


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"{log.name}: process exited with {proc.returncode}:\n{_tail(log)}")
        time.sleep(0.3)
    pytest.fail(f"{log.name}: no {text!r} within {timeout_s:.0f}s:\n{_tail(log)}")


class Cluster:
    """A running head + worker node pair, the env its processes share, and a spec to run."""

    def __init__(self, net: netns.NetnsPair, root: Path) -> None:
        self.net, self.root = net, root
        self.prune_after = 1  # completed trials before the median pruner may prune
        self.epochs = 3
        # The nodegate losses (tests/sweep/nodegate.py): trials on the head wait at epoch 2, once this many
        # trials have ended, until a trial has reached the worker; `hold` keeps that one there.
        self.head_after, self.hold = 0, False
        self.gate = root / "gate"
        self.address = f"{net.ip['a']}:{PORT}"
        self.spec = root / "multinode.yaml"
        self.out = root / "out"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # A token left in ~/.ray by another Ray would switch the head to token auth but not the worker
        # node or the driver; this private cluster needs none. One thread per trial: two cores here.
        env.update(
            REGSTUDY_CACHE=str(root / "cache"),
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            OMP_NUM_THREADS="1",
            NODEGATE_DIR=str(self.gate),
            # The driver (spec check) and both nodes' trial workers import nodegate from here.
            PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).parent), env.get("PYTHONPATH")) if p),
        )
        self.env = env

    def start(self) -> None:
        common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", "--block"]
        head_log, worker_log = self.root / "head.log", self.root / "worker.log"
        head = self.net.popen(
            "a",
            [RAY_BIN, "start", "--head", "--port", str(PORT), "--node-ip-address", self.net.ip["a"],
             "--include-dashboard=false", "--temp-dir", str(self.net.temp_dir("rsh")), *common],
            env=self.env,
            log=head_log,
        )  # fmt: skip
        _wait_for_log(head, head_log, "Ray runtime started")
        worker = self.net.popen(
            "b",
            [RAY_BIN, "start", "--address", self.address, "--node-ip-address", self.net.ip["b"],
             "--temp-dir", str(self.net.temp_dir("rsw")), *common],
            env=self.env,
            log=worker_log,
        )  # fmt: skip
        _wait_for_log(worker, worker_log, "Ray runtime started")

    def run_study(self) -> subprocess.Popen:
        self.spec.write_text(
            SPEC.format(prune_after=self.prune_after, epochs=self.epochs, prefix="nodegate:")
        )
        nodegate.write_config(
            self.gate,
            worker_ip=self.net.ip["b"],
            records=self.out / "records",
            head_after=self.head_after,
            hold=self.hold,
        )
        argv = [STUDY_BIN, "run", str(self.spec), "--address", self.address, "--out", str(self.out)]
        return self.net.popen(
            "a", [*argv, "--quiet", "--no-report"], env=self.env, log=self.root / "driver.log"
        )

    def wait(self, driver: subprocess.Popen, timeout_s: float = 300.0) -> None:
        try:
            rc = driver.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"study run did not finish in {timeout_s:.0f}s (trials that reached the worker node: "
                f"{nodegate.worker_markers(self.gate)}):\n{_tail(self.root / 'driver.log')}"
            )
        assert rc == 0, _tail(self.root / "driver.log")


@pytest.fixture
def cluster(tmp_path):
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.NetnsPair() as net:
        c = Cluster(net, tmp_path)
        c.start()
        yield c  # NetnsPair.__exit__ kills every process in both namespaces, also on failure


def _check_planned_trials(c: Cluster) -> pd.DataFrame:
    """Every planned trial exactly once, none failed, and the Optuna journal agrees."""
    spec = load_spec(c.spec)
    trials = pd.read_parquet(c.out / "trials.parquet")
    assert trials["trial_id"].is_unique
    counts = trials.groupby(["cell_id", "phase"]).size().unstack()
    assert set(counts.index) == {cell.cell_id for cell in expand_cells(spec)}
    assert (counts["search"] == spec.search.trials_per_cell).all()
    assert (counts["final"] == spec.final.seeds).all()
    assert set(trials["status"]) <= {"completed", "pruned"}, trials[["cell_id", "status", "error"]]
    assert json.loads((c.out / "manifest.json").read_text())["status"] == "completed"
    storage = JournalStorage(JournalFileBackend(str(c.out / "optuna.journal")))
    for summary in optuna.get_all_study_summaries(storage):
        frozen = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
        assert len(frozen) == spec.search.trials_per_cell
        assert {t.state for t in frozen} <= {TrialState.COMPLETE, TrialState.PRUNED}
    return trials


@pytest.mark.slow
def test_trials_run_on_both_nodes(cluster):
    # Head trials wait at epoch 2 until a trial has reached the worker (tests/sweep/nodegate.py): both nodes
    # train whatever the worker's actor start-up costs on a loaded machine.
    t0 = time.time()
    cluster.wait(cluster.run_study())
    print(f"study on two nodes: {time.time() - t0:.0f}s")
    trials = _check_planned_trials(cluster)
    assert set(trials["node"]) == {cluster.net.ip["a"], cluster.net.ip["b"]}
    assert (trials["device"] == "cpu").all()
    # cluster_slots saw both nodes' CPUs, and said that it sized from the current resources.
    assert "running 2 trial(s) at once" in (cluster.root / "driver.log").read_text()


@pytest.mark.slow
def test_losing_the_worker_node_mid_study_loses_and_duplicates_no_trial(cluster):
    # No pruning: a trial must be mid-training when its node goes, not stopping because it was pruned.
    cluster.prune_after = 100
    # Deterministic, not timed (tests/sweep/nodegate.py): the first trial on the worker node waits there at
    # the start of epoch 2, after epoch 1's checkpoint, until we kill the node; once 2 trials have ended
    # (the study is under way), head trials wait at epoch 2 until that trial is there, so the head cannot
    # finish the study alone however slowly the worker's first actor starts.
    cluster.epochs, cluster.head_after, cluster.hold = 4, 2, True
    t0 = time.time()
    driver = cluster.run_study()
    records = cluster.out / "records" / "search"
    deadline = time.time() + 240
    while not (nodegate.worker_markers(cluster.gate) and len(list(records.glob("*.json"))) >= 2):
        if time.time() > deadline or driver.poll() is not None:
            pytest.fail(
                f"no trial held on the worker node with 2 trials ended (markers: "
                f"{nodegate.worker_markers(cluster.gate)}):\n{_tail(cluster.root / 'driver.log')}"
            )
        time.sleep(0.2)
    (held,) = nodegate.worker_markers(cluster.gate)  # one CPU on the worker: one trial there
    # The held trial's process is alive in the worker's namespace: it is mid-training there right now.
    assert held["node"] == cluster.net.ip["b"] and held["epochs_done"] == 1, held
    assert held["pid"] in cluster.net.pids("b"), held
    killed_at = time.time()
    assert cluster.net.kill_side("b") > 0
    done_before = len(list(records.glob("*.json")))
    cluster.wait(driver)
    print(f"study with a lost node: {time.time() - t0:.0f}s (node killed after {killed_at - t0:.0f}s)")

    trials = _check_planned_trials(cluster)
    assert done_before < len(trials), "the worker node must be lost mid-study"
    # Retried trials resume from their checkpoint: every epoch exactly once, none lost.
    assert (trials["status"] == "completed").all() and (trials["epochs"] == trials["max_epochs"]).all()
    # Nothing ends on a dead node: whatever ended after the kill ran (or was retried) on the head.
    late = trials[trials["ended_at"] > pd.Timestamp(killed_at + 1.0, unit="s", tz="UTC")]
    assert len(late) >= 1 and (late["node"] == cluster.net.ip["a"]).all(), late[["node", "ended_at"]]
    # Tune saw the trial on the lost node fail, and retried it (max_failures: 2) instead of giving up.
    errors = [p.read_text() for p in (cluster.out / "ray").rglob("error.txt")]
    assert errors, "the trial running on the lost node was not failed by Tune"
    assert all("Failure # 3" not in e for e in errors)


def _bad_address_cli(tmp_path: Path, addresses: list[str]) -> dict[str, tuple[int, str, Path]]:
    """`study run --address A` for each A at once (start-up dominates): A -> (exit code, stderr, --out)."""
    spec = tmp_path / "multinode.yaml"
    spec.write_text(SPEC.format(prune_after=1, epochs=3, prefix=""))
    procs = {}
    for i, address in enumerate(addresses):
        out = tmp_path / f"out{i}"
        argv = [
            STUDY_BIN,
            "run",
            str(spec),
            "--address",
            address,
            "--out",
            str(out),
            "--quiet",
            "--no-report",
        ]
        procs[address] = (
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            out,
        )
    results = {}
    for address, (proc, out) in procs.items():
        try:
            _, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"study run --address {address} hung")
        results[address] = (proc.returncode, stderr, out)
    return results


@pytest.mark.slow
def test_bad_address_exits_2_before_touching_the_results_dir(tmp_path):
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    results = _bad_address_cli(tmp_path, ["127.0.0.1:1", "garbage"])
    for address, expected in [
        ("127.0.0.1:1", "cannot reach a Ray cluster at 127.0.0.1:1"),
        ("garbage", "--address must be host:port"),
    ]:
        rc, stderr, out = results[address]
        assert rc == 2, stderr[-2000:]
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], stderr
        # Checked before prepare_out_dir and ray.init: no results dir, no manifest, no tables.
        assert not out.exists()


def test_check_address_refused_port_answers_at_once():
    from study.sweep.tune import check_address

    t0 = time.time()
    problem = check_address("127.0.0.1:1")
    # ray.init on the same address retries for about half a minute before giving up; a third of that
    # leaves room for a busy machine and still tells the two apart.
    assert time.time() - t0 < 10.0
    assert problem is not None and "127.0.0.1:1" in problem and "\n" not in problem


@pytest.mark.parametrize("address", ["garbage", "10.77.0.1:notaport", ":6379", "host:70000", "host:0", ""])
def test_check_address_refuses_malformed_addresses_without_connecting(address):
    from study.sweep.tune import check_address

    problem = check_address(address)
    assert (
        problem is not None and problem.startswith("--address must be host:port") and repr(address) in problem
    )


def test_check_address_accepts_a_listening_port():
    import socket

    from study.sweep.tune import check_address

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert check_address(f"127.0.0.1:{port}") is None
        assert check_address(f"ray://127.0.0.1:{port}") is None
    assert check_address("local") is None


@pytest.mark.slow
def test_cluster_slots_sizes_from_current_resources_and_hints_on_remote_clusters(tmp_path, capsys):
    from study.sweep import tune as tune_lib

    spec_path = tmp_path / "multinode.yaml"
    spec_path.write_text(SPEC.format(prune_after=1, epochs=3, prefix=""))
    spec = load_spec(spec_path)
    gpu_spec = spec.model_copy(
        update={"resources": spec.resources.model_copy(update={"gpus_per_trial": 0.5})}
    )
    num_cpus = 3
    handle = tune_lib.init_ray(None, num_cpus=num_cpus)
    try:
        assert tune_lib.cluster_slots(spec) == num_cpus // spec.resources.cpus_per_trial
        assert capsys.readouterr().err == ""  # a local Ray is sized exactly: nothing to hint
        # A remote cluster whose GPU workers are not up yet (0 GPUs now): one trial, and the hint.
        remote = tune_lib.RayHandle("10.0.0.5:6379", None, started_here=False)
        assert tune_lib.cluster_slots(gpu_spec, remote) == 1
        err = capsys.readouterr().err
        assert "--max-concurrent" in err and f"{num_cpus} CPU, 0 GPU" in err and len(err.splitlines()) == 1
    finally:
        tune_lib.shutdown(handle)


@pytest.mark.slow
def test_cluster_slots_counts_gpus_and_hints_when_trials_take_none(tmp_path, capsys):
    from study.sweep import tune as tune_lib

    spec_path = tmp_path / "multinode.yaml"
    spec_path.write_text(SPEC.format(prune_after=1, epochs=3, prefix=""))
    spec = load_spec(spec_path)
    resources = spec.resources.model_copy(update={"gpus_per_trial": 0.5})
    half_gpu = spec.model_copy(update={"resources": resources})
    # Ray's GPU resource is a count it schedules by: two logical GPUs work on a CPU-only machine.
    handle = tune_lib.init_ray(None, num_cpus=8, num_gpus=2)
    try:
        # 8 CPUs, 2 GPUs at 0.5 per trial: the GPUs bound it to 4 trials, and nothing to hint.
        assert tune_lib.cluster_slots(half_gpu) == 4
        assert capsys.readouterr().err == ""
        # Trials that reserve no GPU would train on CPUs next to idle GPUs: one line says so.
        assert tune_lib.cluster_slots(spec) == 8
        err = capsys.readouterr().err
        assert "2 GPU(s)" in err and "gpus_per_trial is 0" in err and len(err.splitlines()) == 1
    finally:
        tune_lib.shutdown(handle)
