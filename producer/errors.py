"""The producer's errors: how any error is shown in one line (`root_cause`), and the errors that end a
shard or the whole run early.

A Ray error's text is the remote traceback; its first lines name the actor and the call, its last
exception line says what went wrong (`OSError: [Errno 28] No space left on device`). Every place that
shows an error (the console, the report's table, the JSON report's `root_cause`) shows that line; the
JSON report keeps the full text as well.
"""
from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the "ray::Actor.method()" part of its messages
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(\([\w.]+\))?(: |$)")  # OSError: ..., pkg.mod.Error: ..., StopIteration


def root_cause(error: BaseException | str) -> str:
    """The line that says what went wrong (`OSError: [Errno 28] No space left on device`): in a traceback
    text, the first line of the innermost exception, after the last frame; in a text without frames (Ray
    leaves them out of an error that travelled through a task's argument), its last line that names an
    exception; else its first line. An exception's type is put before a line that does not name one."""
    text = _ANSI.sub("", error if isinstance(error, str) else str(error)).strip()
    if isinstance(error, BaseException) and "\n" not in text:
        name = type(error).__name__
        return f"{name}: {text}" if text else name
    lines = [line.rstrip() for line in text.splitlines()]
    frames = [i for i, line in enumerate(lines) if line.startswith("  File \"")]
    after = [line for line in lines[frames[-1] + 1:] if line and not line[0].isspace()] if frames else []
    named = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if after or named:
        return (after or named[-1:])[0]
    return f"{type(error).__name__}: {lines[0]}" if isinstance(error, BaseException) else lines[0] if lines else ""


class IncompleteShard(RuntimeError):
    """An input shard ended early (a truncated tar, an unreadable Parquet file or row group): its work unit
    is not committed (unless `sources.commit_partial_units`), not retried in this run (it would end the
    same way) and is tried again by the next run."""


class ActorStartError(RuntimeError):
    """`pools.max_actor_start_failures` actors of one pool in a row died before they were ready: the run
    stops with the last one's error instead of replacing them forever."""

    def __init__(self, pool: str, failures: int, error: BaseException):
        self.pool, self.failures, self.error = pool, failures, error
        super().__init__(f"{pool} actors failed to start {failures} times in a row "
                         f"(pools.max_actor_start_failures); the last one's error: {root_cause(error)}")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the run stops, reports what it committed so far and ends its Ray."""

    def __init__(self, signum: int):
        self.signum, self.signal_name = signum, signal.Signals(signum).name
        super().__init__(self.signal_name)


_received: list[int] = []  # the signals interrupt_on_signals turned into Interrupted (signals are per process)


def interruption_name(error: KeyboardInterrupt) -> str:
    """The signal behind a KeyboardInterrupt. Ray's blocking calls (ray.wait, ray.get) re-raise an exception
    raised by a signal handler as a plain KeyboardInterrupt, so the handler's own record counts, not the
    exception's type; a KeyboardInterrupt with no record is Python's own SIGINT."""
    if isinstance(error, Interrupted):
        return error.signal_name
    return signal.Signals(_received[-1]).name if _received else "SIGINT"


@contextmanager
def interrupt_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """While inside, the first of `signals` raises `Interrupted` in the main thread; later ones, and any after
    the yielded `disarm()` is called, are ignored, so that clean-up (stopping actors, ending a local Ray)
    is not cut short. Install it after `ray.init`, which sets a SIGTERM handler of its own that exits at
    once. Outside the main thread (where Python delivers no signals) it does nothing."""
    armed = [True]

    def disarm():
        armed[0] = False

    if threading.current_thread() is not threading.main_thread():
        yield disarm
        return

    def handler(signum, frame):
        if armed[0]:
            disarm()
            _received.append(signum)
            raise Interrupted(signum)

    _received.clear()
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield disarm
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
