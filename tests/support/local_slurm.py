"""A real SLURM cluster on this one machine, for tests, CI and trying the batch scripts locally (run it
from the repository root: `python -m tests.support.local_slurm ...`).

It runs Debian's `slurm-wlm` daemons (munged, slurmctld, and one slurmd per emulated node) with a
generated `slurm.conf` whose state, spool, logs and pid files all live under one work directory, on
free ports, so it never touches a system-wide SLURM set-up. `nodes=N` emulates N compute nodes
(`node1..nodeN`, all at 127.0.0.1 on their own slurmd ports, the machine's CPUs and memory split between
them, at least one CPU each): multi-node jobs, `srun` across nodes and `SLURM_JOB_NODELIST`/`SLURM_NODEID` are then the real
thing. `proctrack/linuxproc`, `task/none`, `select/cons_tres`; no accounting daemon, so no `sacct`:
job states come from `scontrol show job` (kept for `MinJobAge` seconds after a job ends) and from the
`jobcomp/filetxt` log.

Two partitions make preemption real, not simulated: `batch` (default, PriorityTier 1, preemptible with
PreemptMode=REQUEUE) and `urgent` (PriorityTier 10). A job submitted to `urgent` that needs the CPUs a
`batch` job holds preempts it: SLURM sends the batch job SIGTERM, waits `GraceTime`, then requeues it.

    from tests.support.local_slurm import LocalSlurm, SlurmUnavailable
    with LocalSlurm("/tmp/slurm-test", nodes=2) as cluster:  # raises SlurmUnavailable(reason) if it can't
        job = cluster.sbatch(["launch/slurm/train.sbatch"], env={...})
        info = cluster.wait(job, timeout=120)              # -> {"JobState": "COMPLETED", "ExitCode": "0:0", ...}

    python -m tests.support.local_slurm up /tmp/slurm-demo --nodes 2   # prints `export SLURM_CONF=...`
    python -m tests.support.local_slurm down /tmp/slurm-demo

Daemons are started in the foreground as our own children and stopped by their PIDs (munged only if
we started it: a munged that already answers on the default socket is reused and left running).
Needs root (slurmd launches jobs, munged runs as user `munge`); `launch/ci_system_deps.sh` installs the
packages.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time

from megatron_qwen_image.netutil import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MUNGE_RUN_DIR = "/run/munge"
MUNGE_KEY = "/etc/munge/munge.key"
REQUIRED_BINARIES = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (missing packages, not root, a daemon failed to start)."""


def install_system_packages(timeout: float = 600) -> str:
    """Run launch/ci_system_deps.sh (apt-get install slurm-wlm slurmd slurmctld munge; a quick no-op when
    they are there); return its output. It never fails hard: if it cannot install, check_available() says why."""
    script = os.path.join(REPO, "launch", "ci_system_deps.sh")
    r = subprocess.run(["bash", script], capture_output=True, text=True, timeout=timeout)
    return (r.stdout + r.stderr).strip()


def _machine_cpus_and_memory() -> tuple[int, int]:
    """The machine's CPU count and memory (MB) as slurmd itself detects them (`slurmd -C`).

    A node declaring more than slurmd detects is drained; declaring at most that never is.
    """
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(tok.split("=", 1) for tok in out.split("\n", 1)[0].split() if "=" in tok)
    try:
        return int(fields["CPUs"]), int(fields.get("RealMemory", "1024"))
    except (KeyError, ValueError):
        raise SlurmUnavailable(f"`slurmd -C` did not report the machine's CPUs: {out!r}")


def _slurm_time(value: str) -> float | None:
    """Epoch seconds of a SLURM timestamp (local time, as slurmctld prints it); None for Unknown/None."""
    try:
        return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_scontrol_record(line: str) -> dict:
    """`scontrol show job -o` prints one `Key=Value Key=Value ...` line per job; values hold no spaces
    except the trailing free-text fields, which we do not need."""
    rec = {}
    for tok in line.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            rec.setdefault(k, v)
    return rec


class LocalSlurm:
    """Start/stop a private single-node SLURM cluster rooted at `workdir` (created if missing)."""

    def __init__(self, workdir: str, nodes: int = 1, grace_time_s: int = 20, kill_wait_s: int = 10,
                 min_job_age_s: int = 600):
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.workdir = os.path.abspath(workdir)
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.conf_path = os.path.join(self.workdir, "slurm.conf")
        self.grace_time_s = grace_time_s
        self.kill_wait_s = kill_wait_s
        self.min_job_age_s = min_job_age_s
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs = []

    # ---------------------------------------------------------------- environment
    @property
    def env(self) -> dict:
        """Environment for SLURM clients (sbatch, scontrol, ...) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": self.conf_path}

    @staticmethod
    def check_available() -> None:
        """Raise SlurmUnavailable with the reason if this machine cannot run the cluster at all."""
        missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
        if missing:
            raise SlurmUnavailable(
                f"SLURM/munge binaries not installed: {', '.join(missing)} "
                "(run launch/ci_system_deps.sh as root to install slurm-wlm slurmd slurmctld munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local SLURM cluster needs root (slurmd launches jobs; munged runs as user munge)")
        try:
            pwd.getpwnam("munge")
        except KeyError:
            raise SlurmUnavailable("user 'munge' does not exist (the munge package creates it)")
        if not os.path.exists(MUNGE_KEY):
            raise SlurmUnavailable(f"munge key {MUNGE_KEY} missing (the munge package creates it; or run mungekey -c)")

    # ---------------------------------------------------------------- config
    def write_config(self) -> str:
        for sub in ("state", "log"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        cpus, mem_mb = _machine_cpus_and_memory()
        w = self.workdir
        host = socket.gethostname().split(".")[0]
        # Every emulated node is this machine: same address, its own slurmd port, a share of the CPUs.
        node_lines = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={free_port()} "
            f"CPUs={max(1, cpus // len(self.nodes))} RealMemory={mem_mb // len(self.nodes)} State=UNKNOWN"
            for n in self.nodes)
        nodelist = ",".join(self.nodes)
        conf = f"""# Generated by tests/support/local_slurm.py: a private single-node cluster under {w}
ClusterName=mqi-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool/%n
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd-%n.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# The emulated nodes share one machine: take the declared CPUs/memory as given (more nodes than CPUs is
# fine for tests, whose processes are not bound to cores: task/none).
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={w}/log/jobcomp.txt
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait={self.kill_wait_s}
MinJobAge={self.min_job_age_s}
SlurmdTimeout=60
InactiveLimit=0
{node_lines}
PartitionName=batch Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime={self.grace_time_s}
PartitionName=urgent Nodes={nodelist} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""
        with open(self.conf_path, "w") as f:
            f.write(conf)
        return self.conf_path

    # ---------------------------------------------------------------- daemons
    def _spawn(self, name: str, cmd: list[str], **popen_kw) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, "log", f"{name}.stdout"), "ab")
        self._logs.append(log)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                                cwd=self.workdir, **popen_kw)
        self._procs[name] = proc
        return proc

    @staticmethod
    def munge_works() -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
            if cred.returncode != 0:
                return False
            return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self) -> None:
        if self.munge_works():
            return  # a munged already serves the default socket: reuse it, never stop it
        munge = pwd.getpwnam("munge")
        for d in (MUNGE_RUN_DIR, "/var/lib/munge", "/var/log/munge"):
            os.makedirs(d, exist_ok=True)
            os.chown(d, munge.pw_uid, munge.pw_gid)
            os.chmod(d, 0o755 if d == MUNGE_RUN_DIR else 0o700)
        # munged refuses to run as root: start it as user munge directly, so the PID we hold is munged's.
        self._spawn("munged", ["munged", "--foreground"], user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self._wait_for("munged", self.munge_works, 15)

    def _wait_for(self, name: str, ready, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise SlurmUnavailable(f"{name} did not become ready within {timeout:.0f}s; its log:\n{self._tail(name)}")

    def _tail(self, name: str, n: int = 4000) -> str:
        text = ""
        for path in (os.path.join(self.workdir, "log", f"{name}.stdout"), os.path.join(self.workdir, "log", f"{name}.log")):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f"--- {path}\n" + f.read()[-n:]
        return text or "(no log)"

    def daemon_logs(self, n: int = 4000) -> str:
        """The last `n` characters of slurmctld's and every slurmd's log: what explains a job's state."""
        return "\n".join(self._tail(name, n) for name in ["slurmctld"] + [f"slurmd-{x}" for x in self.nodes])

    def node_states(self) -> dict[str, str]:
        r = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, env=self.env,
                           timeout=10)
        recs = [parse_scontrol_record(line) for line in r.stdout.splitlines()] if r.returncode == 0 else []
        return {rec.get("NodeName"): rec.get("State", "") for rec in recs}

    def _nodes_up(self) -> bool:
        states = self.node_states()
        return all(states.get(n, "").split("+")[0] in ("IDLE", "MIXED", "ALLOCATED") for n in self.nodes)

    def start(self) -> "LocalSlurm":
        self.check_available()
        os.makedirs(self.workdir, exist_ok=True)
        self.write_config()
        self._start_munge()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf_path])
        self._wait_for("slurmctld", lambda: subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                                                           env=self.env, timeout=10).stdout.count("UP") > 0, 30)
        for node in self.nodes:
            os.makedirs(os.path.join(self.workdir, "spool", node), exist_ok=True)
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", self.conf_path])
        self._wait_for(f"slurmd-{self.nodes[-1]}", self._nodes_up, 30)
        return self

    def stop(self) -> None:
        """Cancel every job of this cluster, then stop the daemons we started, by PID."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name], env=self.env,
                           capture_output=True, timeout=20)
            deadline = time.time() + self.kill_wait_s + 10
            while time.time() < deadline and self.squeue():
                time.sleep(0.5)
        for name in [f"slurmd-{n}" for n in self.nodes] + ["slurmctld", "munged"]:
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- jobs
    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> str:
        """Submit a batch job; return its id. `env` is added to the submitting environment (sbatch exports
        the whole environment to the job by default)."""
        r = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd,
                           env={**self.env, **(env or {})}, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """The job's `scontrol show job` record ({} once it has aged out of slurmctld's memory)."""
        r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                           env=self.env, timeout=10)
        return parse_scontrol_record(r.stdout) if r.returncode == 0 else {}

    def job_steps_alive(self, job_id: str) -> list[str]:
        """The step daemons (slurmstepd sockets `<node>_<job>.<step>` in the spool dirs) still there for a job."""
        spool = os.path.join(self.workdir, "spool")
        return [f"{n}/{f}" for n in self.nodes if os.path.isdir(os.path.join(spool, n))
                for f in os.listdir(os.path.join(spool, n)) if f.startswith(f"{n}_{job_id}.")]

    def release_requeue_hold(self, job_id: str, timeout: float = 60) -> None:
        """SLURM holds a requeued batch job about two minutes (Reason=BeginTime, the credential lifetime)
        before it may start again; make it eligible as soon as that is safe (tests do not wait those
        minutes; clusters normally do). First wait until the previous run's step daemons are gone: slurmd
        refuses to launch a job id it still runs ("already running"), which fails the launch."""
        deadline = time.time() + timeout
        while self.job_steps_alive(job_id) and time.time() < deadline:
            time.sleep(0.2)
        while not self.kick_pending(job_id) and self.job(job_id).get("JobState") == "PENDING" \
                and time.time() < deadline:
            time.sleep(0.2)

    # Why the hold exists: the requeue revokes the job's launch credential on the nodes as of that second,
    # and slurmd rejects a credential created in or before the revocation's second ("Job credential
    # revoked"), which kills the relaunched job as non-startable: FAILED, exit 1, without running.
    # Timestamps have 1 s resolution, so a relaunch 2 s after the requeue (SubmitTime is reset to it) is safe.
    REQUEUE_SETTLE_S = 2

    def kick_pending(self, job_id: str) -> bool:
        """If the job is PENDING, its previous run's step daemons are gone and its requeue is at least
        REQUEUE_SETTLE_S old, make it start now; return whether it did. Call it while waiting for a
        requeued job: a launch that still raced the previous run's teardown leaves the job requeued *held*
        (Reason=launch_failed_requeued_held, Priority=0), and a requeue that finishes late resets its begin
        time; both would otherwise leave the job waiting far longer than any test does."""
        rec = self.job(job_id)
        if rec.get("JobState") != "PENDING" or self.job_steps_alive(job_id):
            return False
        requeued_at = _slurm_time(rec.get("SubmitTime", ""))
        if requeued_at is None or time.time() < requeued_at + self.REQUEUE_SETTLE_S:
            return False
        if "held" in rec.get("Reason", "").lower() or rec.get("Priority") == "0":
            subprocess.run(["scontrol", "release", str(job_id)], env=self.env, capture_output=True, timeout=10)
        r = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=self.env,
                           capture_output=True, timeout=10)
        return r.returncode == 0

    def squeue(self) -> list[str]:
        r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env, timeout=10)
        return r.stdout.split()

    def wait(self, job_id: str, timeout: float, states=TERMINAL_STATES, poll_s: float = 1.0, progress=None) -> dict:
        """Poll until the job reaches one of `states`; return its record. Raises TimeoutError (with the
        daemons' log tails) if it does not get there in time."""
        deadline = time.time() + timeout
        rec, last = {}, None
        while time.time() < deadline:
            rec = self.job(job_id)
            state = rec.get("JobState")
            if progress and state != last:
                progress(f"job {job_id}: {state} ({rec.get('Reason', '')}, restarts={rec.get('Restarts', '0')})")
                last = state
            if state in states:
                return rec
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f}s; last record {rec}\n"
                           + self.daemon_logs())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.local_slurm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster under DIR and print how to use it (daemons keep running)")
    up.add_argument("dir")
    up.add_argument("--nodes", type=int, default=1, help="emulated compute nodes (default 1)")
    down = sub.add_parser("down", help="stop the cluster started under DIR (by the PIDs it recorded)")
    down.add_argument("dir")
    args = p.parse_args(argv)
    workdir = os.path.abspath(args.dir)
    pids_path = os.path.join(workdir, "daemons.json")
    if args.cmd == "up":
        cluster = LocalSlurm(workdir, nodes=args.nodes).start()
        with open(pids_path, "w") as f:
            json.dump({name: proc.pid for name, proc in cluster._procs.items()}, f)
        print(f"local SLURM cluster up (daemons: {', '.join(f'{n}={p.pid}' for n, p in cluster._procs.items())})")
        print(f"export SLURM_CONF={cluster.conf_path}")
        print(f"stop it with: python -m tests.support.local_slurm down {workdir}")
        return 0
    conf = os.path.join(workdir, "slurm.conf")
    env = {**os.environ, "SLURM_CONF": conf}
    subprocess.run(["scancel", "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name], env=env, capture_output=True)
    time.sleep(1)
    with open(pids_path) as f:
        pids = json.load(f)
    for name in [n for n in pids if n.startswith("slurmd-")] + ["slurmctld", "munged"]:
        if name in pids:
            try:
                os.kill(pids[name], signal.SIGTERM)
                print(f"stopped {name} (pid {pids[name]})")
            except ProcessLookupError:
                print(f"{name} (pid {pids[name]}) was not running")
    os.remove(pids_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
