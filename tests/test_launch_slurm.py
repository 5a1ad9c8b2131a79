"""launch/slurm/ against a real SLURM: Debian's slurmctld + three slurmd "nodes" on this machine
(tests/support/local_slurm.py), munge authentication, a preemptible partition.

- the training batch script in its CPU smoke configuration (configs/smoke_tp2.yaml: TP=2 over two
  nodes, one torchrun per node, rendezvous from the SLURM environment) is preempted by a higher-priority
  job, then sent the time-limit signal; each time the trainers checkpoint on SIGTERM, the script requeues
  the job, and the next run resumes from the checkpoint, until the job COMPLETES with its final checkpoint;
- the producer batch script (Ray head + a Ray worker node inside a 2-node allocation) and a streaming
  training job run at the same time on one cache directory, and a dependent job seals the cache.

Skips, with the reason printed, where SLURM cannot run (packages missing and not installable, not root).
"""
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from tests.support.local_slurm import TERMINAL_STATES, LocalSlurm, SlurmUnavailable, install_system_packages
from launch.slurm.torchrun_slurm import SlurmEnvError, slurm_rendezvous, torchrun_argv
from tests.waiting import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(REPO, ".venv", "bin", "python") if os.path.exists(os.path.join(REPO, ".venv", "bin", "python")) \
    else shutil.which("python3")
STEP_RE = re.compile(r"^step\s+(\d+)/(\d+) \|", re.M)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        LocalSlurm.check_available()
    except SlurmUnavailable as first:
        if os.geteuid() == 0:
            print(install_system_packages())
        try:
            LocalSlurm.check_available()
        except SlurmUnavailable as e:
            pytest.skip(f"SLURM cannot run here: {e} (first: {first})")
    c = LocalSlurm(str(tmp_path_factory.mktemp("slurm")), nodes=3, grace_time_s=60)
    try:
        c.start()
    except SlurmUnavailable as e:
        pytest.skip(f"SLURM daemons did not start: {e}")
    yield c
    c.stop()


def _read(path) -> str:
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def _runs(log: str, job: str) -> list[str]:
    """The job's output split per run (the batch script prints a header per run; output is appended)."""
    return re.split(rf"\[train\.sbatch\] job {job} run \d+ on", log)[1:]


def _context(log_path, cluster=None, job=None):
    """What a timed-out wait prints: the job's record and the daemons' logs (if given), the job's output."""
    def context() -> str:
        record = f"job record: {_job_and_daemon_logs(cluster, job)}\n" if cluster else ""
        return record + _read(log_path)[-6000:]
    return context


def _kicking(cluster, job) -> bool:
    """Keep a requeued job moving while a test waits on it (LocalSlurm.kick_pending); always true."""
    cluster.kick_pending(job)
    return True


def _job_and_daemon_logs(cluster, job) -> str:
    return f"{cluster.job(job)}\n{cluster.daemon_logs(2500)}"


def _steps(run_log: str) -> list[int]:
    return [int(m.group(1)) for m in STEP_RE.finditer(run_log)]


def _train_env(**extra) -> dict:
    return {"OMP_NUM_THREADS": "1", "SHUTDOWN_TIMEOUT": "50", "PYTHON": PYTHON, **extra}


def test_rendezvous_is_derived_from_the_slurm_environment(cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", cluster.conf_path)  # scontrol resolves host lists and node addresses
    env = {"SLURM_JOB_NODELIST": "node[1-3]", "SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_ID": "12345"}
    r = slurm_rendezvous(env)
    assert (r.hosts, r.master_addr, r.master_port, r.nnodes, r.node_rank) == \
        (("node1", "node2", "node3"), "127.0.0.1", 22345, 3, 2)  # node1's NodeAddr in the generated slurm.conf
    # Inside a step, the step's own node list and count win; MASTER_PORT overrides the derived port.
    r = slurm_rendezvous({**env, "SLURM_STEP_NODELIST": "node[2-3]", "SLURM_STEP_NUM_NODES": "2",
                          "SLURM_NODEID": "0", "MASTER_PORT": "29999"})
    assert (r.hosts, r.nnodes, r.node_rank, r.master_port) == (("node2", "node3"), 2, 0, 29999)
    argv = torchrun_argv(r, 8, ["-m", "consumer.train"], shutdown_timeout=90, python="py")
    assert argv == ["py", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "8",
                    "--master-addr", "127.0.0.1", "--master-port", "29999", "--shutdown-timeout", "90",
                    "-m", "consumer.train"]
    for bad, msg in (({}, "SLURM_JOB_NODELIST not set"), ({**env, "SLURM_JOB_NUM_NODES": "2"}, "has 3 hosts"),
                     ({**env, "SLURM_NODEID": "3"}, "SLURM_NODEID=3 outside 0..2"),
                     ({**env, "SLURM_JOB_ID": "x"}, "SLURM_JOB_ID='x' is not an integer")):
        with pytest.raises(SlurmEnvError, match=re.escape(msg)):
            slurm_rendezvous(bad)


@pytest.mark.slow
def test_train_sbatch_preempted_then_time_limited_requeues_and_resumes_to_completion(cluster, tmp_path):
    ckpt, out = tmp_path / "ckpt", str(tmp_path / "train.out")
    iters = 40
    job = cluster.sbatch(["-N2", "-o", out, "launch/slurm/train.sbatch", f"train.train_iters={iters}",
                          "--log-jsonl", str(tmp_path / "stats.jsonl"), "--tensorboard-dir", str(tmp_path / "tb")],
                         env=_train_env(CKPT_DIR=str(ckpt)), cwd=REPO)

    # Run 1: preempted by a job in the higher-priority partition that needs the first node.
    wait_for(lambda: len(_runs(_read(out), job)) == 1 and max(_steps(_runs(_read(out), job)[0]) or [0]) >= 3,
             240, "run 1 to train 3 steps", _context(out, cluster, job), interval=0.5)
    first_node = subprocess.run(["scontrol", "show", "hostnames", cluster.job(job)["NodeList"]], env=cluster.env,
                                capture_output=True, text=True, check=True).stdout.split()[0]
    urgent = cluster.sbatch(["-p", "urgent", "-N1", "-w", first_node, "-o", str(tmp_path / "urgent.out"),
                             "--wrap", "echo urgent work done"])
    rec = cluster.wait(job, 120, states={"PENDING"})
    assert rec["Restarts"] == "1", rec
    assert cluster.wait(urgent, 60)["JobState"] == "COMPLETED"
    cluster.release_requeue_hold(job)

    # Run 2: the time-limit warning (what --signal=B:USR1@300 delivers before the limit).
    wait_for(lambda: _kicking(cluster, job) and len(_runs(_read(out), job)) == 2 and _steps(_runs(_read(out), job)[1]),
             240, "run 2 to train a step", _context(out, cluster, job), interval=0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True, timeout=10)
    rec = cluster.wait(job, 120, states={"PENDING"})
    assert rec["Restarts"] == "2", rec
    cluster.release_requeue_hold(job)

    # Run 3: to the end.
    wait_for(lambda: _kicking(cluster, job) and cluster.job(job).get("JobState") in TERMINAL_STATES, 300,
             "run 3 to finish", _context(out, cluster, job), interval=0.5)
    rec = cluster.job(job)
    log = _read(out)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec, log[-6000:])
    runs = _runs(log, job)
    assert len(runs) == 3, log[-6000:]

    # Every run: two nodes, one torchrun each, the same rendezvous rule, TP=2 across the nodes.
    for run in runs:
        assert "world 2 = TP 2 x DP 1" in run
        assert re.search(r"torchrun_slurm: node 0/2 \(node\d\) master 127\.0\.0\.1:\d+", run)
        assert re.search(r"torchrun_slurm: node 1/2 \(node\d\)", run)

    s1, s2, s3 = (_steps(r) for r in runs)
    k1, k2 = s1[-1], s2[-1]
    assert "[checkpoint] no checkpoint" in runs[0] and s1[0] == 1
    assert "SIGTERM received" in runs[0] and f"stopping after step {k1} on SIGTERM" in runs[0]
    assert "job was preempted" in runs[0] and "requeueing job" in runs[0]
    assert f"resumed from {ckpt}/iter_{k1:07d} at step {k1}" in runs[1] and s2[0] == k1 + 1
    assert "SIGUSR1: time limit near" in runs[1] and f"stopping after step {k2} on SIGTERM" in runs[1]
    assert f"resumed from {ckpt}/iter_{k2:07d} at step {k2}" in runs[2] and s3[0] == k2 + 1
    assert s3[-1] == iters and s1 + s2 + s3 == list(range(1, iters + 1))
    assert (ckpt / "latest").read_text().strip() == f"iter_{iters:07d}"
    assert '"step": %d' % iters in (ckpt / f"iter_{iters:07d}" / "complete.json").read_text()


@pytest.mark.slow
def test_producer_and_streaming_consumer_jobs_share_one_cache(cluster, tmp_path):
    from megatron_qwen_image.cache import CacheReader
    from megatron_qwen_image.encoders.make_tiny import ensure_tiny
    from producer.synthetic import generate_shards

    raw, cache = tmp_path / "raw", tmp_path / "cache"
    generate_shards(str(raw), num_shards=2, per_shard=12, seed=5)
    tiny = ensure_tiny()
    # The streaming trainer may start before any producer has created the cache: create it first.
    subprocess.run([PYTHON, "-m", "megatron_qwen_image.cache", "init", str(cache)], check=True, cwd=REPO)
    ray_tmp = tempfile.mkdtemp(prefix="mqi-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    tout, pout, sout = (str(tmp_path / n) for n in ("train.out", "producer.out", "seal.out"))
    try:
        # Consumer pool: one node, 2 processes (TP=2), streaming from the cache while it is written.
        train = cluster.sbatch(["-N1", "-o", tout, "launch/slurm/train.sbatch", "--data", "cache", "--cache-dir",
                                str(cache), "data.cache.streaming=true", "train.global_batch_size=2", "train.train_iters=6",
                                "--log-jsonl", str(tmp_path / "stats.jsonl"), "--tensorboard-dir", str(tmp_path / "tb")],
                               env=_train_env(NPROC_PER_NODE="2", CKPT_DIR=str(tmp_path / "ckpt")), cwd=REPO)
        # Producer pool: a 2-node Ray cluster (head + worker) inside its own allocation.
        producer = cluster.sbatch(["-N2", "-o", pout, "launch/slurm/producer.sbatch", "--input", str(raw),
                                   "--cache-dir", str(cache), "--encoders", tiny,
                                   "--config", "configs/producer/default.yaml",
                                   "pools.cpu_actors=1", "pools.encoder_actors=1",
                                   "pools.cpu_actor_num_cpus=0.25", "pools.encoder_num_cpus=0.25",
                                   "pools.chunk_size=4", "progress_interval_s=5"],
                                  env={"RAY_TMP_ROOT": ray_tmp, "PYTHON": PYTHON, "OMP_NUM_THREADS": "1"}, cwd=REPO)
        # When the producer has succeeded, seal the cache: streaming consumers then finish the stream.
        seal = cluster.sbatch(["-N1", f"--dependency=afterok:{producer}", "-o", sout, "--wrap",
                               f"{PYTHON} -m megatron_qwen_image.cache seal {cache}"], cwd=REPO)

        prec = cluster.wait(producer, 300)
        plog = _read(pout)
        assert prec["JobState"] == "COMPLETED" and prec["ExitCode"] == "0:0", (prec, plog[-6000:])
        assert "2 of 2 Ray node(s) joined" in plog, plog[-6000:]
        assert re.search(r"samples\s+24 seen, 24 written", plog), plog[-6000:]
        assert cluster.wait(seal, 60)["JobState"] == "COMPLETED", _read(sout)
        trec = cluster.wait(train, 300)
        tlog = _read(tout)
        assert trec["JobState"] == "COMPLETED" and trec["ExitCode"] == "0:0", (trec, tlog[-6000:])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # The two pools overlapped in time: the consumer was running before the producer finished.
    assert trec["StartTime"] <= prec["EndTime"], (trec["StartTime"], prec["EndTime"])
    assert "SYNTHETIC" not in tlog and _steps(tlog) == list(range(1, 7)), tlog[-6000:]
    reader = CacheReader(str(cache))
    keys = sorted(r["key"] for r in reader.iter_records())
    assert keys == sorted(f"{s:05d}{i:04d}" for s in range(2) for i in range(12))
    assert reader.sealed and reader.verify_all()["bad"] == []
