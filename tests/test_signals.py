"""vaerepro.signals: SIGTERM raises Stopped, except that inside `deferred` the first one is only recorded."""

from __future__ import annotations

import os
import signal

import pytest

from vaerepro import signals
from vaerepro.errors import Stopped


@pytest.fixture
def handler():
    previous = signal.getsignal(signal.SIGTERM)
    signals.install()
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_stopped_with_exit_status_143(handler):
    with pytest.raises(Stopped) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.value.exit_status == 143 and "SIGTERM" in str(stop.value)


def test_while_deferred_the_first_sigterm_is_recorded_and_the_second_stops_at_once(handler):
    with signals.deferred():
        os.kill(os.getpid(), signal.SIGTERM)  # recorded: the code inside polls it at its next safe point
        assert signals.requested() == signal.SIGTERM
        with pytest.raises(Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
    with signals.deferred():
        assert signals.requested() is None  # each deferred section starts afresh
    with pytest.raises(Stopped):  # and outside one, SIGTERM stops at once again
        os.kill(os.getpid(), signal.SIGTERM)


def test_take_over_replaces_a_handler_installed_later(handler):
    signal.signal(signal.SIGTERM, lambda *_: None)  # e.g. Lightning's, installed when fit starts
    signals.take_over()
    with pytest.raises(Stopped):
        os.kill(os.getpid(), signal.SIGTERM)
