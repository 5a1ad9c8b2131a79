"""The whole loop on one machine, in a few minutes on 2 CPU cores, with no downloads.

    python -m launch.demo [--out outputs/demo] [--steps 40] [--samples 96] [--clean] [--quiet]
    make demo                                   # the same, after installing what is missing

Six stages, each the project's real command line run as a subprocess with this same Python (so a
failure names its stage, and Ray and torchrun stay isolated from each other and from this script); each
prints the commands it runs, and docs/demo.md lists them:

  1 encoders  tiny random Qwen2.5-VL text encoder + tokenizer + Qwen-Image VAE, in Hugging Face layout;
              the validation prompts (configs/prompts/demo.yaml) encoded with them
  2 shards    synthetic text-rendering images with captions, as WebDataset tars (img2dataset layout)
  3 producer  a local Ray: filter, encode, bucket by aspect ratio into the latent cache; then
              deduplicate across shards, seal the cache (declare it complete) and inspect it
  4 train     the tiny MMDiT at TP=2 on 2 CPU processes (torchrun, gloo) from the cache, with checkpoints,
              validation images and a held-out validation loss half-way and at the end
  5 sample    images of the validation prompts from the last checkpoint (python -m consumer.sample, TP=1)
  6 plot      the loss curve

Everything lands under --out. A re-run reuses a stage whose outputs are there, as long as every stage
before it was reused too: the encoders' model_index.json (written last), the shards of this --samples,
a sealed cache, the stats and the checkpoint of the last step of this --steps. A stage that runs
deletes its old outputs first, and every stage after it runs too. The plot is always redrawn.
`--clean` deletes OUT first. The demo refuses to write into or clean a non-empty directory that it
did not make (one without OUT/demo_output.txt).

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
import tarfile
import threading
import time
from dataclasses import asdict, dataclass

from consumer.config import load_config
from launch.plot import read_stats, summarize
from megatron_qwen_image.cache.exclusions import read_exclusions
from megatron_qwen_image.cache.manifest import sealed_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = "configs/smoke_tp2.yaml"
PRODUCER_CONFIG = "configs/producer/default.yaml"
PROMPTS = "configs/prompts/demo.yaml"
HOLDOUT_FRACTION = 0.1  # of the cache's keys, for the validation loss
SAMPLE_STEPS = 20
MARKER_FILE = "demo_output.txt"  # says "the demo made this directory": only then may it write into or clean it
SUMMARY_FILE = "demo_summary.json"
MAX_PER_SHARD = 32  # samples per synthetic WebDataset shard (one producer work unit each)
MIN_SAMPLES = 16
SEED = 0


class DemoError(RuntimeError):
    """A stage failed; the message names the stage and where its full log is."""


class DemoPaths:
    """Every path the demo writes, under one root."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.marker = os.path.join(self.root, MARKER_FILE)
        self.encoders = os.path.join(self.root, "encoders")
        self.prompts = os.path.join(self.root, "prompts.safetensors")
        self.shards = os.path.join(self.root, "shards")
        self.cache = os.path.join(self.root, "cache")
        self.report = os.path.join(self.root, "producer_report.json")
        self.report_txt = os.path.join(self.root, "producer_report.txt")  # the producer writes it beside the JSON
        self.train = os.path.join(self.root, "train")
        self.stats = os.path.join(self.train, "stats.jsonl")
        self.tensorboard = os.path.join(self.train, "tensorboard")
        self.checkpoints = os.path.join(self.train, "checkpoints")
        self.validation = os.path.join(self.train, "samples")  # the trainer's default: beside the stats
        self.samples = os.path.join(self.root, "samples")
        self.loss_png = os.path.join(self.root, "loss.png")
        self.logs = os.path.join(self.root, "logs")
        self.summary = os.path.join(self.root, SUMMARY_FILE)


@dataclass
class Stage:
    name: str
    title: str
    commands: list[list[str]]  # run in order; the first failure stops the demo
    outputs: list[str]  # deleted before the stage runs, so no file of an earlier run passes for its output
    done: bool  # its outputs are all there: a re-run reuses them
    timeout_s: float  # per command: a hang ends with the stage named


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "reused"
    seconds: float


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
        finally:
            _kill_group(proc)  # leftovers of a finished stage (e.g. a Ray worker) die with it, also on Ctrl-C
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


# Stages: what each one runs, what it writes, and how a re-run tells that it is done
def shard_plan(samples: int) -> tuple[int, int]:
    """(shards, samples per shard): at most MAX_PER_SHARD per shard, `samples` rounded up to fill them."""
    shards = max(1, math.ceil(samples / MAX_PER_SHARD))
    return shards, math.ceil(samples / shards)


def global_batch_size() -> int:
    return load_config(os.path.join(REPO, TRAIN_CONFIG)).train.global_batch_size


def encoders_stage(L: DemoPaths, args) -> Stage:
    # --no-clip: the demo's producer runs only the rule-based filters; the CLIP model filter is optional.
    # Without CLIP, make_tiny writes model_index.json last.
    return Stage("encoders", "Build tiny random encoders (Qwen2.5-VL text encoder, tokenizer, VAE) locally; "
                 "encode the validation prompts",
                 [py("-m", "megatron_qwen_image.encoders.make_tiny", L.encoders, "--seed", str(SEED), "--no-clip"),
                  py("-m", "megatron_qwen_image.prompts", "encode", PROMPTS, "--encoders", L.encoders, "--out",
                     L.prompts)],
                 outputs=[L.encoders, L.prompts],
                 done=os.path.isfile(os.path.join(L.encoders, "model_index.json")) and os.path.isfile(L.prompts),
                 timeout_s=600)


def shards_stage(L: DemoPaths, args) -> Stage:
    shards, per_shard = shard_plan(args.samples)
    return Stage("shards", "Generate synthetic text-rendering WebDataset shards",
                 [py("-m", "producer.synthetic", L.shards, "--shards", str(shards), "--per-shard", str(per_shard),
                     "--seed", str(SEED))],
                 outputs=[L.shards], done=shards_hold(L.shards, shards, per_shard), timeout_s=600)


def shards_hold(shard_dir: str, shards: int, per_shard: int) -> bool:
    """Whether `shard_dir` holds exactly these tars with these many samples (KEY.jpg each), so a new
    --samples regenerates them. The generator writes each tar under a temporary name and renames it."""
    names = [f"{i:05d}.tar" for i in range(shards)]
    if not os.path.isdir(shard_dir) or sorted(os.listdir(shard_dir)) != names:
        return False
    for name in names:
        with tarfile.open(os.path.join(shard_dir, name)) as tar:
            if sum(member.name.endswith(".jpg") for member in tar) != per_shard:
                return False
    return True


def producer_stage(L: DemoPaths, args) -> Stage:
    # One CPU (decode + filter) actor and one encoder actor on a 2-CPU local Ray: on 2 cores the default
    # 2 + 1 actors would not all fit, and idle actors holding CPUs starve the others.
    return Stage("producer", "Producer on a local Ray: filter -> encode -> bucketed latent cache", [
        py("-m", "producer", "--input", L.shards, "--cache-dir", L.cache, "--encoders", L.encoders,
           "--config", PRODUCER_CONFIG, "pools.cpu_actors=1", "pools.encoder_actors=1", "--num-cpus", "2",
           "--report", L.report),
        # duplicates across input shards (each shard was deduplicated on its own while it was processed)
        py("-m", "producer.dedup", L.cache),
        # sealing comes after everything that writes the cache: a sealed cache means the stage is done
        py("-m", "megatron_qwen_image.cache", "seal", L.cache),
        py("-m", "megatron_qwen_image.cache", "inspect", L.cache),
    ], outputs=[L.cache, L.report, L.report_txt], done=os.path.isfile(L.report) and sealed_count(L.cache) is not None,
        timeout_s=1200)


def train_stage(L: DemoPaths, args) -> Stage:
    # Checked before torchrun starts, where the fix can be named: more samples fill more buckets.
    producer = producer_summary(L)
    if not producer["trainable_buckets"]:
        raise DemoError(f"stage 'producer': no cache bucket holds a whole global batch ({global_batch_size()} "
                        f"samples, {TRAIN_CONFIG}): {producer['buckets']}; raise --samples (got {args.samples})")
    # A checkpoint and a validation half-way and at the end (the last step is always saved; validation runs
    # at multiples of the interval).
    interval = max(1, args.steps // 2)
    final_checkpoint = os.path.join(L.checkpoints, f"iter_{args.steps:07d}")
    return Stage("train", "Consumer: tiny MMDiT, TP=2 on 2 CPU processes (torchrun, gloo) from the cache", [
        py("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "consumer.train", "--config", TRAIN_CONFIG, "--data", "cache", "--cache-dir", L.cache,
           "--log-jsonl", L.stats, "--tensorboard-dir", L.tensorboard,
           "--save", L.checkpoints, "--save-interval", str(interval), "--eval-interval", str(interval),
           f"validation.prompts={L.prompts}", f"validation.encoders={L.encoders}",
           f"validation.steps={SAMPLE_STEPS}", f"data.cache.holdout_fraction={HOLDOUT_FRACTION}",
           f"train.train_iters={args.steps}", "logging.log_interval=5"),
    ], outputs=[L.train], done=os.path.isfile(L.stats) and latest_checkpoint(L.checkpoints) == final_checkpoint,
        timeout_s=1800)


def sample_stage(L: DemoPaths, args) -> Stage:
    # One process: the TP=2 checkpoint loads at TP=1 (dist_checkpointing reshards on load).
    return Stage("sample", "Images of the validation prompts from the last checkpoint", [
        py("-m", "consumer.sample", "--load", L.checkpoints, "--encoders", L.encoders, "--prompts", PROMPTS,
           "--steps", str(SAMPLE_STEPS), "--out", L.samples),
    ], outputs=[L.samples], done=os.path.isfile(os.path.join(L.samples, "grid.png")), timeout_s=600)


def plot_stage(L: DemoPaths, args) -> Stage:
    # Never reused: it takes seconds, and redrawing shows the plotting command on every run.
    return Stage("plot", "Loss curve", [py("-m", "launch.plot", L.stats, "--out", L.loss_png)],
                 outputs=[L.loss_png], done=False, timeout_s=300)


# Built one at a time, when the stages before have finished: a stage's done-check and the train stage's
# bucket check read what the earlier stages wrote.
STAGES = [encoders_stage, shards_stage, producer_stage, train_stage, sample_stage, plot_stage]


def latest_checkpoint(checkpoints: str) -> str | None:
    """The checkpoint `latest` names; the trainer moves `latest` only after a checkpoint is complete."""
    try:
        with open(os.path.join(checkpoints, "latest")) as f:
            return os.path.join(checkpoints, f.read().strip())
    except FileNotFoundError:
        return None


def producer_summary(L: DemoPaths) -> dict:
    """The producer's report, with the samples producer.dedup excluded (loaders skip them) taken out of
    the bucket counts."""
    with open(L.report) as f:
        report = json.load(f)
    excluded = read_exclusions(L.cache)
    excluded_per_bucket = excluded.by_bucket()
    buckets = {b: n - excluded_per_bucket.get(b, 0) for b, n in report["buckets"].items()}
    gbs = global_batch_size()
    return {"samples_seen": report["samples"]["seen"], "samples_written": report["samples"]["written"],
            "cross_shard_duplicates": excluded.num_samples, "drops": report["drops"], "buckets": buckets,
            "trainable_buckets": {b: n for b, n in buckets.items() if n >= gbs}}


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def prepare_out(L: DemoPaths, clean: bool) -> None:
    """Create the output directory, or check that an existing one is the demo's (deleting it for --clean)."""
    if os.path.exists(L.root) and not os.path.isdir(L.root):
        raise DemoError(f"--out {L.root}: exists and is not a directory")
    if os.path.isdir(L.root) and os.listdir(L.root) and not os.path.isfile(L.marker):
        raise DemoError(f"--out {L.root}: a non-empty directory that is not a demo output directory (no "
                        f"{MARKER_FILE}); the demo will not write into or clean it: choose another --out")
    if clean and os.path.isdir(L.root):
        print(f"--clean: deleting {L.root}", flush=True)
        shutil.rmtree(L.root)
    os.makedirs(L.logs, exist_ok=True)
    with open(L.marker, "w") as f:
        f.write("Made by `python -m launch.demo`, which reuses, replaces and (with --clean) deletes what is here.\n")


def run_demo(args) -> dict:
    L = DemoPaths(args.out)
    prepare_out(L, args.clean)
    started = time.perf_counter()
    print(f"megatron-qwen-image demo -> {L.root}\n  steps {args.steps}, samples {args.samples}, "
          f"python {sys.executable}", flush=True)
    results: list[StageResult] = []
    for number, make_stage in enumerate(STAGES, 1):
        stage = make_stage(L, args)
        print(f"\n=== [{number}/{len(STAGES)}] {stage.name}: {stage.title} ===", flush=True)
        if stage.done and all(r.status == "reused" for r in results):
            print("  reused: its outputs are there (--clean to redo)", flush=True)
            results.append(StageResult(stage.name, "reused", 0.0))
            continue
        log = os.path.join(L.logs, f"{number}_{stage.name}.log")
        for path in [*stage.outputs, log, L.summary]:
            _remove(path)
        t0 = time.perf_counter()
        for cmd in stage.commands:
            run_command(stage.name, cmd, log, args.quiet, stage.timeout_s)
        seconds = round(time.perf_counter() - t0, 2)
        results.append(StageResult(stage.name, "ran", seconds))
        print(f"  done in {seconds:.1f} s (log: {log})", flush=True)
    summary = build_summary(L, args, results, time.perf_counter() - started)
    with open(L.summary, "w") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary)
    return summary


def build_summary(L: DemoPaths, args, results: list[StageResult], wall_s: float) -> dict:
    shards, per_shard = shard_plan(args.samples)
    records = read_stats(L.stats)
    return {
        "out": L.root, "steps": args.steps, "samples": args.samples, "wall_s": round(wall_s, 2),
        "stages": [asdict(r) for r in results],
        "outputs": {
            "encoders": L.encoders, "shards": L.shards, "cache": L.cache,
            "producer_report": L.report, "producer_report_txt": L.report_txt, "train_stats": L.stats,
            "tensorboard": L.tensorboard, "checkpoints": L.checkpoints,
            "checkpoint_latest": latest_checkpoint(L.checkpoints),
            "validation_grid": last_validation_grid(L.validation), "samples_grid": os.path.join(L.samples, "grid.png"),
            "loss_png": L.loss_png, "logs": L.logs,
            "summary": L.summary,
        },
        "shards": {"tars": shards, "per_shard": per_shard},
        "producer": producer_summary(L),
        "loss": summarize(records),
        "validation": validation_summary(records),
    }


def last_validation_grid(directory: str) -> str | None:
    """The newest step_NNNNNN.png the trainer's validation wrote."""
    grids = sorted(n for n in os.listdir(directory) if re.fullmatch(r"step_\d+\.png", n)) if os.path.isdir(directory) else []
    return os.path.join(directory, grids[-1]) if grids else None


def validation_summary(records: list[dict]) -> list[dict]:
    """Step, validation loss and seconds of every validation the run made (records: launch.plot.read_stats)."""
    return [{"step": r["step"], "val_loss": r.get("val_loss"), "val_s": r["val_s"]} for r in records if "val_s" in r]


def print_summary(s: dict) -> None:
    p, loss = s["producer"], s["loss"]
    print(f"\n=== Demo finished in {s['wall_s']:.1f} s ===")
    for st in s["stages"]:
        print(f"  {st['name']:<10}" + (f"{st['seconds']:6.1f} s" if st["status"] == "ran" else "reused"))
    print("\nOutputs:")
    for label, path in s["outputs"].items():
        print(f"  {label:<21}{path}")
    drops = ", ".join(f"{k}={v}" for k, v in p["drops"].items()) or "none"
    print(f"\nProducer: {p['samples_seen']} samples seen, {p['samples_written']} written; drops: {drops}; "
          f"{p['cross_shard_duplicates']} duplicates across shards")
    print("Buckets (w x h: samples): " + "  ".join(f"{k}:{v}" for k, v in p["buckets"].items()))
    print(f"Loss over {loss['steps']} steps: {loss['first_loss']:.3f} -> {loss['last_loss']:.3f} (mean of the "
          f"first/last {loss['window']} steps: {loss['mean_first_window']:.3f} -> {loss['mean_last_window']:.3f})")
    print("Validation loss (held-out keys, fixed sigmas and noise): " + ", ".join(
        f"step {v['step']}: {v['val_loss']:.3f} ({v['val_s']:.1f} s)" for v in s["validation"]))
    print(f"Validation grid: {s['outputs']['validation_grid']}", flush=True)


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
