"""Ending the processes a test started: one helper, so every test cleans up the same way."""
from __future__ import annotations

import os
import signal
import subprocess


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads (it was started with start_new_session=True), if any is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
