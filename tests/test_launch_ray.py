"""launch/ray/: the producer submitted as a Ray job to a real `ray start --head` on loopback, with Ray 2.60's
token authentication on (a fresh random token), the repository uploaded as the job's working directory,
and the pool sizes given to the submitter. Also: the submitter's argument checks (no cluster needed).
"""
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import pytest

from launch.ray.submit_producer import SubmitError, load_runtime_env, producer_entrypoint
from megatron_qwen_image.netutil import free_port
from tests.waiting import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.fixture(scope="module")
def ray_head():
    """A private Ray head (2 CPUs, token auth), started in the foreground (--block) and stopped by its PID:
    never `ray stop`, which would stop every Ray on the machine."""
    if not os.path.exists(RAY):
        pytest.skip(f"ray CLI not found next to {sys.executable}")
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    port, dash, client = free_port(), free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="mqi-rayjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = open(os.path.join(tmp, "head.log"), "w")
    proc = subprocess.Popen([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--ray-client-server-port", str(client), "--num-cpus", "2", "--temp-dir", tmp,
                             "--disable-usage-stats", "--block"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        def head_log() -> str:
            return open(os.path.join(tmp, "head.log")).read()[-4000:]

        def answers() -> bool:
            assert proc.poll() is None, f"ray start exited ({proc.returncode}):\n{head_log()}"
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
            except urllib.error.HTTPError:  # it answers (401 without the token): up
                return True
            except OSError:
                return False
            return True

        wait_for(answers, 120, "the Ray head's dashboard to answer", head_log, interval=1)
        yield {"address": address, "token": token, "env": env}
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its head processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        subprocess.run(["rm", "-rf", tmp])


@pytest.mark.slow
def test_producer_ray_job_writes_the_cache(ray_head, tmp_path):
    from megatron_qwen_image.cache import CacheReader
    from megatron_qwen_image.encoders.make_tiny import ensure_tiny
    from producer.synthetic import generate_shards

    # The cluster really demands the token.
    wrong = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    r = subprocess.run([sys.executable, "-c", f"from ray.job_submission import JobSubmissionClient as C; "
                        f"C({ray_head['address']!r}).list_jobs()"], env=wrong, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "AuthenticationError" in r.stderr, r.stderr[-2000:]

    raw, cache = tmp_path / "raw", tmp_path / "cache"
    generate_shards(str(raw), num_shards=2, per_shard=8, seed=7)
    cmd = [sys.executable, "-m", "launch.ray.submit_producer", "--address", ray_head["address"],
           "--python", sys.executable, "--cpu-actors", "1", "--encoder-actors", "1", "--job-id", "mqi-producer-test",
           "--timeout", "240", "--",
           "--input", str(raw), "--cache-dir", str(cache), "--encoders", ensure_tiny(),
           "--config", "configs/producer/default.yaml",  # relative: resolved in the uploaded working dir
           "pools.cpu_actor_num_cpus=0.5", "pools.encoder_num_cpus=0.5", "pools.chunk_size=4"]
    r = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "Ray job mqi-producer-test: SUCCEEDED" in out
    assert "'pools.cpu_actors={min: 1, max: 1}'" in out  # the pool sizes reached the producer

    # Ask the cluster itself (in a child process: Ray's client caches the auth token process-wide).
    r = subprocess.run([sys.executable, "-c", "import json; from ray.job_submission import JobSubmissionClient as C; "
                        f"i = C({ray_head['address']!r}).get_job_info('mqi-producer-test'); "
                        "print(json.dumps([str(i.status), i.runtime_env['working_dir'], i.entrypoint]))"],
                       env=ray_head["env"], capture_output=True, text=True, timeout=120)
    status, working_dir, entrypoint = json.loads(r.stdout.strip().splitlines()[-1])
    assert status.endswith("SUCCEEDED") and working_dir.startswith("gcs://"), (status, working_dir)
    assert entrypoint.startswith(f"{sys.executable} -m producer --address auto")
    reader = CacheReader(str(cache))
    keys = sorted(rec["key"] for rec in reader.iter_records())
    assert keys == sorted(f"{s:05d}{i:04d}" for s in range(2) for i in range(8))
    assert reader.verify_all()["bad"] == []
    assert any(f.endswith(".json") for f in os.listdir(cache / "reports"))


def test_submitter_refuses_bad_arguments_before_submitting():
    ok = producer_entrypoint(["--input", "/data/a.tar", "/data/b.tar", "--cache-dir", "/data/cache"],
                             python="/opt/venv/bin/python", cpu_actors="2:16", encoder_actors="4")
    assert ok.startswith("/opt/venv/bin/python -m producer --address auto "
                         "'pools.cpu_actors={min: 2, max: 16}' 'pools.encoder_actors={min: 4, max: 4}'")
    with pytest.raises(SubmitError, match="--input 'shards'"):
        producer_entrypoint(["--input", "/data/a.tar", "shards", "--cache-dir", "/c"])
    with pytest.raises(SubmitError, match="--cache-dir 'cache'"):
        producer_entrypoint(["--input", "/data", "--cache-dir=cache"])
    with pytest.raises(SubmitError, match="--address"):
        producer_entrypoint(["--input", "/data", "--cache-dir", "/c", "--address", "auto"])
    for bad in ("0", "8:2", "x", "1:2:3"):
        with pytest.raises(SubmitError, match="--cpu-actors"):
            producer_entrypoint(["--input", "/d", "--cache-dir", "/c"], cpu_actors=bad)
    env = load_runtime_env(extra_env={"EXTRA": "1"})
    assert env["working_dir"] == REPO and ".venv/" in env["excludes"]
    assert env["env_vars"]["EXTRA"] == "1" and env["env_vars"]["OMP_NUM_THREADS"] == "1"
