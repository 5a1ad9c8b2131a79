"""The whole loop on one machine, in a few minutes on 2 CPU cores, with no downloads.

    python -m launch.demo [--out outputs/demo] [--steps 40] [--samples 96] [--clean] [--quiet]
    make demo                                   # the same, after installing what is missing

Stages (each one is a subprocess running the project's real command line with this same Python, so a
failure names its stage, and Ray and torchrun stay isolated from each other and from this script):

  1 encoders  python -m megatron_qwen_image.encoders.make_tiny OUT/encoders --no-clip
              tiny random Qwen2.5-VL text encoder + tokenizer + Qwen-Image VAE, in Hugging Face layout
  2 shards    python -m producer.synthetic OUT/shards --shards S --per-shard P
              synthetic text-rendering images with captions, as WebDataset tars (img2dataset layout)
  3 producer  python -m producer --input OUT/shards --cache-dir OUT/cache --encoders OUT/encoders ...
              a local Ray: filter, encode, bucket by aspect ratio into the latent cache; then
              python -m megatron_qwen_image.cache seal OUT/cache   (the cache is complete)
              python -m megatron_qwen_image.cache inspect OUT/cache
  4 train     torchrun --nproc-per-node 2 -m consumer.train --config configs/smoke_tp2.yaml \\
                  --data cache --cache-dir OUT/cache --save OUT/train/checkpoints ... train_iters=STEPS
              the tiny MMDiT at TP=2 on 2 CPU processes (gloo), distributed optimizer, full recompute
  5 plot      python -m launch.plot OUT/train/stats.jsonl --out OUT/loss.png

Everything lands under --out. Re-running reuses what is done: a stage is skipped when it finished
before with the same parameters (recorded in OUT/demo_state.json) and every stage before it was skipped
too; a stage whose parameters changed (e.g. a new --samples or --steps) has its outputs deleted and runs
again, and so does every stage after it. `--clean` deletes OUT first and starts over. The demo refuses
to clean or write into a non-empty directory that is not a demo output directory.

The demo is a CPU demo by design (it hides GPUs from its stages, CUDA_VISIBLE_DEVICES=""): the same
commands without the demo's small sizes are how the producer and consumer run on GPU clusters
(launch/slurm, launch/ray).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = "configs/smoke_tp2.yaml"
STATE_FILE = "demo_state.json"
SUMMARY_FILE = "demo_summary.json"
MAX_PER_SHARD = 32  # samples per synthetic WebDataset shard (one producer work unit each)
MIN_SAMPLES = 16
SEED = 0
ALWAYS_RUN = {"plot"}  # cheap, and redrawing shows the plotting command on every run
STAGE_TIMEOUT_S = {"encoders": 600, "shards": 600, "producer": 1200, "train": 1800, "plot": 300}


class DemoError(RuntimeError):
    """A stage failed; the message names the stage and where its full log is."""


@dataclass
class Layout:
    """Every path the demo writes, under one root."""

    root: str

    def __post_init__(self):
        self.root = os.path.abspath(self.root)

    def p(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    @property
    def encoders(self): return self.p("encoders")
    @property
    def shards(self): return self.p("shards")
    @property
    def cache(self): return self.p("cache")
    @property
    def report(self): return self.p("producer_report.json")
    @property
    def report_txt(self): return self.p("producer_report.txt")
    @property
    def train(self): return self.p("train")
    @property
    def stats(self): return self.p("train", "stats.jsonl")
    @property
    def tensorboard(self): return self.p("train", "tensorboard")
    @property
    def checkpoints(self): return self.p("train", "checkpoints")
    @property
    def loss_png(self): return self.p("loss.png")
    @property
    def logs(self): return self.p("logs")
    @property
    def state(self): return self.p(STATE_FILE)
    @property
    def summary(self): return self.p(SUMMARY_FILE)

    def outputs_of(self, stage: str) -> list[str]:
        """What a stage writes: deleted before it runs again, so no stale file survives a re-run."""
        return {"encoders": [self.encoders], "shards": [self.shards],
                "producer": [self.cache, self.report, self.report_txt],
                "train": [self.train], "plot": [self.loss_png]}[stage]


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "reused"
    seconds: float
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------------
def stage_env() -> dict:
    """Environment of every stage: the repo importable, one BLAS thread per process (2 cores are shared by
    Ray actors / torchrun ranks), no GPUs (a CPU demo), no Ray usage-stats reporting (no network)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local Ray needs no token (Ray 2.60 default: on)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(stage: str, cmd: list[str], log_path: str, quiet: bool, timeout_s: float) -> None:
    """Run `cmd` from the repo root in its own process group; stream its output (indented) to the console
    and append it to `log_path`. Raises DemoError naming the stage on a non-zero exit or a timeout; the
    process group is always killed afterwards, so no Ray worker or torchrun rank outlives its stage."""
    shown = " ".join(["python" if cmd[0] == sys.executable else cmd[0], *cmd[1:]])
    print(f"  $ {shown}", flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if not quiet:
                    sys.stdout.write("  | " + line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            raise DemoError(f"stage '{stage}' timed out after {timeout_s:.0f} s running: {shown}\n"
                            f"full log: {log_path}")
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
        finally:
            _kill_group(proc)  # leftovers of a finished stage (e.g. a Ray worker) die with it
            reader.join(timeout=10)
        if rc != 0:
            causes = _error_lines(log_path)
            raise DemoError(f"stage '{stage}' failed: `{shown}` exited with status {rc}\n"
                            + (f"errors reported:\n{causes}\n" if causes else "")
                            + f"last lines:\n{_tail(log_path, 15)}\nfull log: {log_path}")


# The lines that say what went wrong: the tools' own "error: ..." messages and Python exceptions (not
# torchrun's ChildFailedError wrapper, which only says that a rank failed).
_ERROR_LINE = re.compile(r"^(\S+\s+)?(config )?error: |^[\w.]*(Error|Exception): ")


def _error_lines(path: str, limit: int = 6) -> str:
    seen: list[str] = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if _ERROR_LINE.search(line) and "ChildFailedError" not in line and line not in seen:
                seen.append(line)
    return "\n".join("  ! " + line for line in seen[:limit])


def _tail(path: str, n: int) -> str:
    with open(path, errors="replace") as f:
        lines = f.readlines()[-n:]
    return "".join("  > " + line for line in lines).rstrip("\n")


def py(*args) -> list[str]:
    return [sys.executable, *args]


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
def shard_plan(samples: int) -> tuple[int, int]:
    """(shards, samples per shard): at most MAX_PER_SHARD per shard, `samples` rounded up to fill them."""
    shards = max(1, math.ceil(samples / MAX_PER_SHARD))
    return shards, math.ceil(samples / shards)


def global_batch_size() -> int:
    import yaml

    with open(os.path.join(REPO, TRAIN_CONFIG)) as f:
        return int(yaml.safe_load(f)["train"]["global_batch_size"])


def stage_encoders(L: Layout, args, log: str) -> dict:
    # --no-clip: the demo's producer runs only the rule-based filters; the CLIP model filter is optional.
    run_command("encoders", py("-m", "megatron_qwen_image.encoders.make_tiny", L.encoders, "--seed", str(SEED),
                               "--no-clip"), log, args.quiet, STAGE_TIMEOUT_S["encoders"])
    return {"dir": L.encoders, "parts": sorted(os.listdir(L.encoders))}


def stage_shards(L: Layout, args, log: str) -> dict:
    shards, per_shard = shard_plan(args.samples)
    run_command("shards", py("-m", "producer.synthetic", L.shards, "--shards", str(shards), "--per-shard",
                             str(per_shard), "--seed", str(SEED)), log, args.quiet, STAGE_TIMEOUT_S["shards"])
    tars = sorted(f for f in os.listdir(L.shards) if f.endswith(".tar"))
    return {"dir": L.shards, "tars": tars, "samples": shards * per_shard, "per_shard": per_shard}


def stage_producer(L: Layout, args, log: str) -> dict:
    from megatron_qwen_image.cache.exclusions import read_exclusions

    # One CPU (decode + filter) actor and one encoder actor on a 2-CPU local Ray: on 2 cores the default
    # 2 + 1 actors would not all fit, and idle actors holding CPUs starve the others.
    run_command("producer", py("-m", "producer", "--input", L.shards, "--cache-dir", L.cache,
                               "--encoders", L.encoders, "--config", "configs/producer/default.yaml",
                               "pools.cpu_actors=1", "pools.encoder_actors=1",
                               "--num-cpus", "2", "--report", L.report),
                log, args.quiet, STAGE_TIMEOUT_S["producer"])
    run_command("producer", py("-m", "megatron_qwen_image.cache", "seal", L.cache), log, args.quiet, 120)
    # duplicates across input shards (each shard was deduplicated on its own while it was processed)
    run_command("producer", py("-m", "producer.dedup", L.cache), log, args.quiet, 120)
    run_command("producer", py("-m", "megatron_qwen_image.cache", "inspect", L.cache), log, args.quiet, 120)
    with open(L.report) as f:
        report = json.load(f)
    excluded = read_exclusions(L.cache)  # what producer.dedup listed: loaders skip it
    per_bucket = excluded.by_bucket()
    buckets = {b: n - per_bucket.get(b, 0) for b, n in report["buckets"].items()}
    gbs = global_batch_size()
    full = {b: n for b, n in buckets.items() if n >= gbs}
    if not full:
        raise DemoError(f"stage 'producer': no cache bucket holds a whole global batch ({gbs} samples, "
                        f"{TRAIN_CONFIG}): {buckets}; raise --samples (got {args.samples})")
    return {"samples_written": report["samples"]["written"], "samples_seen": report["samples"]["seen"],
            "cross_shard_duplicates": excluded.num_samples, "drops": report["drops"], "buckets": buckets,
            "trainable_buckets": full}


def stage_train(L: Layout, args, log: str) -> dict:
    save_interval = max(1, args.steps // 2)  # a checkpoint half-way and one at the end (saved at the last step)
    cmd = py("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "consumer.train", "--config", TRAIN_CONFIG, "--data", "cache", "--cache-dir", L.cache,
             "--log-jsonl", L.stats, "--tensorboard-dir", L.tensorboard)
    if checkpointing_available():
        cmd += ["--save", L.checkpoints, "--save-interval", str(save_interval)]
    else:
        print("  ! this build has no consumer/checkpointing.py: training runs without checkpoints", flush=True)
    cmd += [f"train.train_iters={args.steps}", "logging.log_interval=5"]
    run_command("train", cmd, log, args.quiet, STAGE_TIMEOUT_S["train"])
    with open(L.stats) as f:
        steps = sum(1 for line in f if line.strip())
    latest = None
    latest_file = os.path.join(L.checkpoints, "latest")
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            latest = os.path.join(L.checkpoints, f.read().strip())
    return {"steps": steps, "checkpoint": latest}


def stage_plot(L: Layout, args, log: str) -> dict:
    run_command("plot", py("-m", "launch.plot", L.stats, "--out", L.loss_png), log, args.quiet,
                STAGE_TIMEOUT_S["plot"])
    from launch.plot import read_stats, summarize

    return summarize(read_stats(L.stats))


STAGES = [
    ("encoders", "Build tiny random encoders (Qwen2.5-VL text encoder, tokenizer, VAE) locally", stage_encoders),
    ("shards", "Generate synthetic text-rendering WebDataset shards", stage_shards),
    ("producer", "Producer on a local Ray: filter -> encode -> bucketed latent cache", stage_producer),
    ("train", "Consumer: tiny MMDiT, TP=2 on 2 CPU processes (torchrun, gloo) from the cache", stage_train),
    ("plot", "Loss curve", stage_plot),
]


def stage_keys(args) -> dict:
    """What each stage's output depends on; a change re-runs that stage and all after it."""
    shards, per_shard = shard_plan(args.samples)
    return {"encoders": {"seed": SEED, "clip": False},
            "shards": {"shards": shards, "per_shard": per_shard, "seed": SEED},
            "producer": {"config": "configs/producer/default.yaml", "cpu_actors": 1, "encoder_actors": 1},
            "train": {"steps": args.steps, "config": TRAIN_CONFIG, "checkpoints": checkpointing_available()},
            "plot": {"stats": "train/stats.jsonl"}}


def checkpointing_available() -> bool:
    """Whether this build of the consumer has checkpoints (consumer/checkpointing.py, added separately)."""
    return os.path.isfile(os.path.join(REPO, "consumer", "checkpointing.py"))


# --------------------------------------------------------------------------------------------------
# Output directory handling
# --------------------------------------------------------------------------------------------------
def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def prepare_out(L: Layout, clean: bool) -> dict:
    """Create or check the output directory; return the recorded stage state ({} when fresh)."""
    if os.path.exists(L.root) and not os.path.isdir(L.root):
        raise DemoError(f"--out {L.root}: exists and is not a directory")
    is_demo = os.path.isfile(L.state)
    if os.path.isdir(L.root) and os.listdir(L.root) and not is_demo:
        raise DemoError(f"--out {L.root}: a non-empty directory that is not a demo output directory (no "
                        f"{STATE_FILE}); the demo will not write into or clean it: choose another --out")
    if clean and is_demo:
        print(f"--clean: deleting {L.root}", flush=True)
        shutil.rmtree(L.root)
    os.makedirs(L.logs, exist_ok=True)
    if not os.path.isfile(L.state):
        _write_json(L.state, {"stages": {}})
        return {}
    with open(L.state) as f:
        return json.load(f).get("stages", {})


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def run_demo(args) -> dict:
    L = Layout(args.out)
    recorded = prepare_out(L, args.clean)
    keys = stage_keys(args)
    results: list[StageResult] = []
    t_start = time.perf_counter()
    upstream_ran = False
    print(f"megatron-qwen-image demo -> {L.root}\n  steps {args.steps}, samples {args.samples}, "
          f"python {sys.executable}", flush=True)
    for i, (name, title, fn) in enumerate(STAGES, 1):
        print(f"\n=== [{i}/{len(STAGES)}] {name}: {title} ===", flush=True)
        prev = recorded.get(name)
        if name not in ALWAYS_RUN and not upstream_ran and prev and prev.get("key") == keys[name] and all(
                os.path.exists(p) for p in L.outputs_of(name)):
            print(f"  reused: done in an earlier run with the same parameters ({prev['seconds']:.1f} s then); "
                  f"--clean to redo", flush=True)
            results.append(StageResult(name, "reused", prev["seconds"], prev.get("info", {})))
            continue
        upstream_ran = True
        for later, *_ in STAGES[i - 1:]:  # this stage's and every later stage's outputs are now stale
            for path in L.outputs_of(later):
                _remove(path)
        _remove(L.summary)
        log = os.path.join(L.logs, f"{i}_{name}.log")
        _remove(log)
        t0 = time.perf_counter()
        try:
            info = fn(L, args, log)
        finally:
            # A failed or interrupted stage leaves no record, so the next run redoes it from scratch.
            for later, *_ in STAGES[i - 1:]:
                recorded.pop(later, None)
            _write_json(L.state, {"stages": recorded})
        dt = time.perf_counter() - t0
        recorded[name] = {"key": keys[name], "seconds": round(dt, 2), "info": info,
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_json(L.state, {"stages": recorded})
        results.append(StageResult(name, "ran", dt, info))
        print(f"  done in {dt:.1f} s (log: {log})", flush=True)
    total = time.perf_counter() - t_start
    summary = build_summary(L, args, results, total)
    _write_json(L.summary, summary)
    print_summary(summary)
    return summary


def build_summary(L: Layout, args, results: list[StageResult], total: float) -> dict:
    info = {r.name: r.info for r in results}
    return {
        "out": L.root, "steps": args.steps, "samples": args.samples, "wall_s": round(total, 2),
        "stages": [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 2)} for r in results],
        "outputs": {
            "encoders": L.encoders, "shards": L.shards, "cache": L.cache,
            "producer_report": L.report, "producer_report_txt": L.report_txt, "train_stats": L.stats,
            "tensorboard": L.tensorboard, "checkpoints": L.checkpoints if info["train"].get("checkpoint") else None,
            "checkpoint_latest": info["train"].get("checkpoint"), "loss_png": L.loss_png, "logs": L.logs,
        },
        "shards": info["shards"], "producer": info["producer"], "train": info["train"], "loss": info["plot"],
    }


def print_summary(s: dict) -> None:
    o, p, sh, loss = s["outputs"], s["producer"], s["shards"], s["loss"]
    print(f"\n=== Demo finished in {s['wall_s']:.1f} s ===")
    for st in s["stages"]:
        when = f"{st['seconds']:6.1f} s" + ("" if st["status"] == "ran" else " (reused: its time in the run that made it)")
        print(f"  {st['name']:<10}{when}")
    drops = ", ".join(f"{k}={v}" for k, v in p["drops"].items()) or "none"
    ckpt = o["checkpoint_latest"] or "none (checkpointing not in this build)"
    rows = [
        ("tiny random encoders", o["encoders"], ""),
        ("synthetic shards", o["shards"], f"{len(sh['tars'])} WebDataset tars x {sh['per_shard']} samples"),
        ("latent cache", o["cache"], f"{p['samples_written']} samples in {len(p['buckets'])} buckets; "
                                     f"python -m megatron_qwen_image.cache inspect {o['cache']}"),
        ("producer report", o["producer_report"], f"(+ .txt) {p['samples_seen']} seen, {p['samples_written']} "
                                                  f"written; drops: {drops}; "
                                                  f"{p.get('cross_shard_duplicates', 0)} duplicates across shards"),
        ("training stats", o["train_stats"], f"{s['train']['steps']} steps; TensorBoard: {o['tensorboard']}"),
        ("checkpoint", ckpt, ""),
        ("loss curve", o["loss_png"], f"loss {loss['first_loss']:.3f} -> {loss['last_loss']:.3f} (mean of first/"
                                      f"last {loss['window']} steps {loss['mean_first_window']:.3f} -> "
                                      f"{loss['mean_last_window']:.3f})"),
        ("stage logs", o["logs"], ""),
        ("this summary", os.path.join(s["out"], SUMMARY_FILE), ""),
    ]
    print("\nOutputs:")
    for label, path, note in rows:
        print(f"  {label:<21}{path}" + (f"\n  {'':<21}{note}" if note else ""))
    buckets = "  ".join(f"{k}:{v}" for k, v in p["buckets"].items())
    print(f"\nBuckets written (w x h: samples): {buckets}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output directory (default: outputs/demo)")
    p.add_argument("--steps", type=int, default=40, help="training steps (default: 40)")
    p.add_argument("--samples", type=int, default=96,
                   help=f"synthetic samples, in shards of at most {MAX_PER_SHARD} (rounded up to fill them; "
                        f"default: 96)")
    p.add_argument("--clean", action="store_true", help="delete --out first and run every stage")
    p.add_argument("--quiet", action="store_true", help="only headings and the summary (stage output still "
                                                        "goes to OUT/logs/)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: must be >= 1, got {args.steps}")
    if args.samples < MIN_SAMPLES:
        p.error(f"--samples: must be >= {MIN_SAMPLES} (a resolution bucket needs a whole global batch), "
                f"got {args.samples}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run_demo(args)
    except DemoError as e:
        print(f"\nDEMO FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; the stage that was running will be redone next time", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
