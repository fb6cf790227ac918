"""Two network namespaces joined by a veth pair: a private two-node "cluster" on one machine.

Used by tests/sweep/test_multinode.py. Every process started here runs inside a namespace this module created,
so teardown can find and kill all of them (Ray daemons, their workers, the driver) by the namespace's
PID list without touching any other Ray on the machine (`ray stop` would). Traffic only ever goes to
the two addresses inside the namespaces, or to loopback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.77.0"
IP_BIN = shutil.which("ip") or "/usr/sbin/ip"


def unavailable_reason() -> str | None:
    """None if namespaces can be made here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "iproute2 (`ip`) is not installed"
    name = f"rsprobe{os.getpid()}"
    res = subprocess.run([IP_BIN, "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    subprocess.run([IP_BIN, "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run([IP_BIN, *args], check=True, capture_output=True, text=True)


class NetnsPair:
    """Namespaces `<tag>a` (SUBNET.1) and `<tag>b` (SUBNET.2) on one veth link, loopback up in both.

    Names carry the PID so concurrent test runs never collide (interface names must stay <= 15 chars).
    Use as a context manager: `__exit__` kills every process in both namespaces, deletes them (which
    deletes the veth pair) and removes the temp dirs made by `temp_dir`, also when the body failed.
    """

    def __init__(self) -> None:
        tag = f"rs{os.getpid() % 100000}"
        self.ns = {"a": f"{tag}a", "b": f"{tag}b"}
        self.ip = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2"}
        self._veth = {"a": f"{tag}va", "b": f"{tag}vb"}
        self._procs: list[subprocess.Popen] = []
        self._dirs: list[Path] = []

    def __enter__(self) -> NetnsPair:
        for side in ("a", "b"):
            # A leftover of a killed earlier run with the same PID would make `netns add` fail.
            subprocess.run([IP_BIN, "netns", "del", self.ns[side]], capture_output=True)
        try:
            for side in ("a", "b"):
                _ip("netns", "add", self.ns[side])
            _ip("link", "add", self._veth["a"], "type", "veth", "peer", "name", self._veth["b"])
            for side in ("a", "b"):
                ns, dev = self.ns[side], self._veth[side]
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{self.ip[side]}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                # A fresh namespace has loopback down; Ray talks to itself over 127.0.0.1 too.
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def temp_dir(self, prefix: str) -> Path:
        # Directly under /tmp: Ray's unix socket paths live here and must stay under 107 chars.
        path = Path(os.path.realpath("/tmp")) / f"{prefix}{os.getpid() % 100000}-{len(self._dirs)}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        self._dirs.append(path)
        return path

    def popen(
        self, side: str, argv: list[str], *, env: dict[str, str] | None = None, log: Path | None = None
    ):
        """Start argv inside namespace `side` in its own process group; output goes to `log`."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [IP_BIN, "netns", "exec", self.ns[side], *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def pids(self, side: str) -> list[int]:
        res = subprocess.run([IP_BIN, "netns", "pids", self.ns[side]], capture_output=True, text=True)
        return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []

    def kill_side(self, side: str, timeout_s: float = 10.0) -> int:
        """SIGKILL every process in namespace `side` (a node "losing power"); returns how many."""
        killed: set[int] = set()
        deadline = time.time() + timeout_s
        # Repeat: a dying raylet may still fork a worker between our listing and our kill.
        while time.time() < deadline:
            pids = [p for p in self.pids(side) if p != os.getpid()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for proc in self._procs:
            if proc.poll() is None and proc.pid in killed:
                proc.wait(timeout=5)
        return len(killed)

    def close(self) -> None:
        for side in ("b", "a"):
            self.kill_side(side)
        for proc in self._procs:
            # `ip netns exec` itself, should it not have exec'ed yet: kill its whole group.
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for side in ("a", "b"):
            # Deleting a namespace also deletes the veth end inside it (and so its peer).
            subprocess.run([IP_BIN, "netns", "del", self.ns[side]], capture_output=True)
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
