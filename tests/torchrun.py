"""Launch a multi-process test under torchrun (gloo on CPU) and always clean up its processes."""
import os
import subprocess
import sys

from tests.support.processes import kill_process_group

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(nproc: int, target: list[str], timeout: float = 600, env: dict | None = None) -> str:
    """Run `torchrun --nproc-per-node nproc TARGET...` from the repo root; return its combined output.

    `target` is what follows torchrun's own flags, e.g. ["-m", "consumer.train", "--config", "x.yaml"]
    or ["tests/dist/parity_worker.py", "--out", path]. Raises AssertionError with the output on a non-zero
    exit or a timeout; the whole process group is killed either way.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        # --standalone: the rendezvous store binds port 0 itself, so no port is picked here and lost to a race
        "--standalone", "--nproc-per-node", str(nproc),
        *target,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun timed out after {timeout}s: {' '.join(cmd)}\n{out[-20000:]}")
    finally:
        kill_process_group(proc)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}: {' '.join(cmd)}\n{out[-20000:]}")
    return out
