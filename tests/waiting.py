"""Waiting for a state, not for a time: the one polling helper of the tests.

A test that waits for something another process does (a log line, a job state, a server answering) polls
a predicate until it holds. The deadline only bounds a hang: it is set far above how long the wait takes
on a loaded machine, so it never decides a passing run, and when it does expire the error carries what
the test needs to be understood from the CI log alone (`context()`: a log tail, a job record).
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, context: Callable[[], str] | None = None,
             interval: float = 0.2) -> T:
    """Return predicate()'s first truthy value; after `timeout` s raise AssertionError naming `what`,
    followed by `context()`. A predicate may itself raise (e.g. an assert that a process is still alive)
    to stop the wait early."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = context() if context else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{detail}" if detail else ""))
        time.sleep(interval)
