"""SIGTERM to `python -m producer` on a local Ray it started: the run stops promptly, says in one line that it
was interrupted and what it had committed (exit 128 + 15), and no process of its Ray session outlives it
(before, the dashboard and runtime-env agents, ~200 MB, stayed about a minute)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from megatron_qwen_image.cache import CacheReader
from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from producer.synthetic import generate_shards
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _live(pid: int) -> tuple[int, str] | None:
    """(parent pid, command line) of a live, non-zombie process; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return None if stat[0] == "Z" else (int(stat[1]), cmd)


def _descendants(root: int) -> set[int]:
    procs = {int(p): _live(int(p)) for p in os.listdir("/proc") if p.isdigit()}
    children: dict[int, list[int]] = {}
    for pid, info in procs.items():
        if info:
            children.setdefault(info[0], []).append(pid)
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _session_processes(seen: set[int], ray_tmp: str) -> list[str]:
    """Processes of the run's Ray session still alive: those seen below the driver while it ran (the agents
    rename themselves `ray::DashboardAgent`, so their command lines do not name the session), and any
    whose command line names its private temp dir."""
    alive = []
    for p in os.listdir("/proc"):
        info = _live(int(p)) if p.isdigit() else None
        if info and int(p) != os.getpid() and (int(p) in seen or ray_tmp in info[1]):
            alive.append(f"{p}: {info[1][:160]}")
    return alive


@pytest.mark.timeout(300)
def test_sigterm_stops_the_run_reports_what_it_committed_and_ends_its_ray(tmp_path):
    raw = tmp_path / "raw"
    # Many small shards: the run is interrupted after its first commit, and must still be far from done then
    # on any machine (the shards after the first cost nothing: they are never processed).
    generate_shards(str(raw), num_shards=16, per_shard=4, seed=5)
    cache, report = str(tmp_path / "cache"), str(tmp_path / "run.json")
    # A short private temp dir for the session: Ray's socket paths must stay under 108 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    log_path = tmp_path / "producer.log"
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "producer", "--config", "configs/producer/tiny.yaml", "--encoders", ensure_tiny(),
           "--input", str(raw), "--cache-dir", cache, "--report", report, "--num-cpus", "2", "pools.chunk_size=2",
           "pools.max_chunks_in_flight=1"]

    def log():
        return log_path.read_text(errors="replace")

    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def working():
            assert proc.poll() is None, f"the producer ended before it was interrupted:\n{log()[-3000:]}"
            return "INFO committed " in log()

        wait_for(working, 180, "the producer's first commit", lambda: log()[-3000:])
        seen = _descendants(proc.pid)
        assert seen, "no Ray processes below the driver"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)  # prompt: a few seconds to stop the actors and the local Ray
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert rc == 128 + signal.SIGTERM, log()[-3000:]
        committed = len(CacheReader(cache).log.entries)
        last = log().strip().splitlines()[-1]
        assert last.startswith("interrupted by SIGTERM: ") and f": {committed} shards committed by this run" in last, \
            last
        with open(report) as f:
            assert json.load(f)["stopped"]["reason"] == "interrupted"
        assert "Traceback" not in log()
        wait_for(lambda: not _session_processes(seen, ray_tmp), 30, "the run's Ray processes to end",
                 lambda: "\n".join(_session_processes(seen, ray_tmp)))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
