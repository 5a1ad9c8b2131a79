"""Submit the producer to a running Ray cluster as a Ray job (the `ray job submit` of this project).

    python -m launch.ray.submit_producer --address http://HEAD:8265 \\
        --cpu-actors 16:256 --encoder-actors 64 [--python /opt/venv/bin/python] [--no-wait] \\
        -- --input /shared/raw/shards --cache-dir /shared/cache --encoders /models/Qwen-Image

Everything after `--` goes to `python -m producer` unchanged; the two pool sizes are named options here
because they are what an operator turns (N for a fixed pool, MIN:MAX to autoscale; see
docs/operations.md for sizing). The job joins the cluster it runs on (`--address auto`), uploads the
repository as its working directory (launch/ray/runtime_env.yaml: excludes, environment variables),
streams the job's log, and exits with 0 only if the job SUCCEEDED. The equivalent plain CLI is

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env launch/ray/runtime_env.yaml \\
        -- python -m producer --address auto --cpu-actors 16:256 --encoder-actors 64 --input ... --cache-dir ...

Paths given to the producer are paths on the cluster's nodes (a shared filesystem), and must be absolute:
the job runs in a temporary copy of the working directory. Token authentication (Ray 2.60's default):
the client sends RAY_AUTH_TOKEN (or ~/.ray/auth_token); set RAY_AUTH_MODE=token to match the cluster.

Python API: `submit_producer(address, producer_args, ...) -> job_id`, `wait_for_job(client, job_id, ...)`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import yaml

from launch.passthrough import split_at_separator
from megatron_qwen_image.config import split_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_RUNTIME_ENV = os.path.join(REPO, "launch", "ray", "runtime_env.yaml")
# Producer options whose values are filesystem paths on the cluster (a relative one would point into the
# job's temporary working directory, which vanishes with the job).
PATH_OPTIONS = ("--input", "--cache-dir", "--encoders", "--report")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """A bad submission argument; the message names it."""


def load_runtime_env(path: str = DEFAULT_RUNTIME_ENV, extra_env: dict | None = None) -> dict:
    """The runtime env YAML as a dict, with working_dir made absolute (relative to the repository root)."""
    with open(path) as f:
        env = yaml.safe_load(f) or {}
    if not isinstance(env, dict):
        raise SubmitError(f"{path}: a runtime env must be a mapping, got {type(env).__name__}")
    wd = env.get("working_dir")
    if wd and "://" not in wd and not os.path.isabs(wd):
        env["working_dir"] = os.path.normpath(os.path.join(REPO, wd))
    env["env_vars"] = {str(k): str(v) for k, v in {**(env.get("env_vars") or {}), **(extra_env or {})}.items()}
    return env


def _check_pool(name: str, value: str | None) -> None:
    if value is None:
        return
    parts = value.split(":")
    ok = len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts)
    if not ok or (len(parts) == 2 and int(parts[0]) > int(parts[1])):
        raise SubmitError(f"{name}={value!r}: give N or MIN:MAX with 1 <= MIN <= MAX")


def check_producer_args(producer_args: list[str]) -> None:
    """Refuse relative cluster paths and a user-given --address (the job always joins its own cluster)."""
    opt = None
    _, producer_args = split_overrides(producer_args)  # key=value config overrides are not paths
    for a in producer_args:
        if a.startswith("--"):
            key, _, val = a.partition("=")
            if key == "--address":
                raise SubmitError("--address: the job joins the cluster it is submitted to; do not pass one")
            opt = key if key in PATH_OPTIONS else None
            if opt and val:
                _check_abs(opt, val)
                opt = None
            continue
        if opt:
            _check_abs(opt, a)
            if opt != "--input":  # --input takes several values
                opt = None


def _check_abs(opt: str, value: str) -> None:
    if not os.path.isabs(value):
        raise SubmitError(f"{opt} {value!r}: give an absolute path on the cluster's (shared) filesystem; the job "
                          "runs in a temporary copy of the working directory")


def producer_entrypoint(producer_args: list[str], python: str = "python", cpu_actors: str | None = None,
                        encoder_actors: str | None = None) -> str:
    """The shell command the Ray job runs."""
    _check_pool("--cpu-actors", cpu_actors)
    _check_pool("--encoder-actors", encoder_actors)
    check_producer_args(producer_args)
    cmd = [python, "-m", "producer", "--address", "auto"]
    # Passed as config overrides with an explicit {min, max} mapping: unambiguous for both N and MIN:MAX
    # to any YAML reader (a bare "1:8" in YAML 1.1 is the sexagesimal integer 68).
    for key, value in (("pools.cpu_actors", cpu_actors), ("pools.encoder_actors", encoder_actors)):
        if value:
            lo, _, hi = value.partition(":")
            cmd.append(f"{key}={{min: {int(lo)}, max: {int(hi or lo)}}}")
    return shlex.join(cmd + list(producer_args))


def submit_producer(address: str, producer_args: list[str], python: str = "python", cpu_actors: str | None = None,
                    encoder_actors: str | None = None, runtime_env_path: str = DEFAULT_RUNTIME_ENV,
                    extra_env: dict | None = None, job_id: str | None = None, client=None) -> str:
    """Submit `python -m producer ...` to the cluster at `address` (its dashboard, http://HEAD:8265); return the
    job id."""
    from ray.job_submission import JobSubmissionClient

    entrypoint = producer_entrypoint(producer_args, python, cpu_actors, encoder_actors)
    client = client or JobSubmissionClient(address)
    return client.submit_job(entrypoint=entrypoint, runtime_env=load_runtime_env(runtime_env_path, extra_env),
                             submission_id=job_id, metadata={"app": "megatron-qwen-image producer"})


def wait_for_job(client, job_id: str, timeout: float | None = None, follow=print, poll_s: float = 1.0) -> str:
    """Poll the job until it ends (streaming new log lines to `follow`); return its final status name."""
    deadline = None if timeout is None else time.time() + timeout
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if follow and len(logs) > shown:
            follow(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
        if deadline is not None and time.time() > deadline:
            raise TimeoutError(f"Ray job {job_id} still {status} after {timeout:.0f}s")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    argv, producer_args = split_at_separator(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m launch.ray.submit_producer", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                   help="the cluster's dashboard/job API, e.g. http://head:8265 (default $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--cpu-actors", help="decode+filter pool: N or MIN:MAX (autoscale); default: the producer config")
    p.add_argument("--encoder-actors", help="encoder (VAE + Qwen2.5-VL) pool: N or MIN:MAX; default: the config")
    p.add_argument("--python", default="python",
                   help="interpreter on the cluster that has the dependencies (default: `python` on its PATH)")
    p.add_argument("--runtime-env", default=DEFAULT_RUNTIME_ENV, help="runtime env YAML (default launch/ray/runtime_env.yaml)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable")
    p.add_argument("--job-id", help="submission id (default: Ray generates one)")
    p.add_argument("--no-wait", action="store_true", help="submit and print the job id; do not follow the job")
    p.add_argument("--timeout", type=float, default=None, help="give up following after this many seconds")
    args = p.parse_args(argv)
    if not args.address:
        p.error("--address is required (or set RAY_API_SERVER_ADDRESS), e.g. http://head:8265")
    if not producer_args:
        p.error("give the producer's arguments after `--`, e.g. -- --input /data/shards --cache-dir /data/cache")
    extra_env = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            p.error(f"--env {kv!r}: expected KEY=VALUE")
        extra_env[k] = v
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        job_id = submit_producer(args.address, producer_args, args.python, args.cpu_actors, args.encoder_actors,
                                 args.runtime_env, extra_env, args.job_id, client=client)
    except SubmitError as e:
        print(f"submit_producer: {e}", file=sys.stderr)
        return 2
    print(f"submitted Ray job {job_id} to {args.address}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --address {args.address} -f {job_id}")
        return 0
    status = wait_for_job(client, job_id, timeout=args.timeout)
    print(f"Ray job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
