"""Ctrl-C remembered: a library that turns the KeyboardInterrupt into its own error cannot hide it."""

from __future__ import annotations

import signal

import pytest

from study.sweep.interrupts import CtrlC


def test_a_sigint_still_interrupts_and_is_remembered_until_restored():
    before = signal.getsignal(signal.SIGINT)
    ctrl_c = CtrlC()
    assert not ctrl_c.seen
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert ctrl_c.seen
    # What the runner relies on: an error raised while handling the interrupt still reads as one.
    try:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise FileNotFoundError("a lock file a library's cleanup expected") from None
    except FileNotFoundError:
        assert ctrl_c.seen
    ctrl_c.restore()
    assert signal.getsignal(signal.SIGINT) is before
