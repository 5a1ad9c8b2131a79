"""The whole loop on one machine, in a few minutes on 2 CPU cores, with no downloads.

    python -m launch.demo [--out outputs/demo] [--steps 40] [--mixed-steps 20] [--edit-steps 20] [--samples 96]
                          [--edit-samples 64] [--clean] [--quiet]
    make demo                                   # the same, after installing what is missing

Eight stages, each the project's real command line run as a subprocess with this same Python (so a
failure names its stage, and Ray and torchrun stay isolated from each other and from this script); each
prints the commands it runs, and docs/demo.md lists them:

  1 encoders     tiny random Qwen2.5-VL text encoder + tokenizer + Qwen-Image VAE, in Hugging Face layout;
                 the validation prompts (configs/prompts/demo.yaml) encoded with them
  2 shards       synthetic text-rendering images with captions, as WebDataset tars (img2dataset layout): the
                 report's three strategies in turn (text on plain backgrounds, in scenes, in templates); and
                 synthetic edit triplets (source, instruction, target: the text, its colour or the background
                 changed) in the edit layout (KEY.src.png, KEY.jpg, KEY.txt)
  3 producer     a local Ray: filter, encode, bucket by aspect ratio into the latent cache, once for the 256p
                 and once for the 640p bucket family (one cache holds both), and once for the edit triplets (256p,
                 each source encoded into the instruction's prompt and as condition latents); then deduplicate
                 across shards,
                 seal the cache (declare it complete), inspect it and write its data report
                 (OUT/cache/reports/data/index.html)
  4 train_256p   curriculum stage 1: the tiny MMDiT at TP=2 on 2 CPU processes (torchrun, gloo) on the 256p
                 family, with checkpoints, validation images and a held-out validation loss half-way and at
                 the end
  5 train_mixed  curriculum stage 2, from stage 1's last checkpoint and optimizer state: both families, half
                 of the steps each, compute-balanced batches; a validation loss at the end
  6 train_edit   the editing stage (report §4.3), from stage 2's weights: the 256p family's text-to-image and edit
                 samples, half of the steps each (data.cache.task_weights); a validation loss per task at the end
  7 sample       images of the validation prompts and of the edit prompts (configs/prompts/demo_edit.yaml: an
                 instruction and a source image each) from the last checkpoint (python -m consumer.sample, TP=1)
  8 plot         the three stages' loss curves in one PNG

Everything lands under --out. A re-run reuses a stage whose outputs are there, as long as every stage
before it was reused too: the encoders' model_index.json (written last), the shards of this --samples,
a sealed cache, each stage's stats and the checkpoint of its last step (--steps, --mixed-steps, --edit-steps). A stage that runs
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
from megatron_qwen_image.cache import CacheReader
from megatron_qwen_image.cache.buckets import bucket_of_latent
from megatron_qwen_image.cache.exclusions import read_exclusions
from megatron_qwen_image.cache.format import bucket_name
from megatron_qwen_image.cache.manifest import sealed_count
from producer.report import table_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = "configs/tiny/stage_256p.yaml"                # curriculum stage 1
MIXED_CONFIG = "configs/tiny/stage_multiscale_256_640.yaml"  # stage 2: 256p + 640p, from stage 1's checkpoint
EDIT_CONFIG = "configs/tiny/stage_edit_256p.yaml"            # stage 3: text-to-image + editing, from stage 2's
EDIT_PROMPTS = "configs/prompts/demo_edit.yaml"              # instructions with a source image each
EDIT_FAMILY = 256
# Stages 1 and 2 train text-to-image only: the cache's 256p family also holds the edit triplets, which a stage
# without task_weights would mix in by their share of the samples
T2I_ONLY = "data.cache.task_weights={t2i: 1}"
EDIT_CONDITION_AREA = 256 * 256  # sources encoded at 256² (the released pipelines' 1024² is too slow for 2 cores)
PRODUCER_CONFIG = "configs/producer/default.yaml"
FAMILIES = (256, 640)  # the producer runs once for each, into one cache
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


class TrainPaths:
    """What one training stage writes, under its directory."""

    def __init__(self, root: str):
        self.root = root
        self.stats = os.path.join(root, "stats.jsonl")
        self.tensorboard = os.path.join(root, "tensorboard")
        self.checkpoints = os.path.join(root, "checkpoints")
        self.validation = os.path.join(root, "samples")  # the trainer's default: beside the stats


class DemoPaths:
    """Every path the demo writes, under one root."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.marker = os.path.join(self.root, MARKER_FILE)
        self.encoders = os.path.join(self.root, "encoders")
        self.prompts = os.path.join(self.root, "prompts.safetensors")
        self.shards = os.path.join(self.root, "shards")
        self.cache = os.path.join(self.root, "cache")
        self.train = os.path.join(self.root, "train")
        self.stage1 = TrainPaths(os.path.join(self.train, "256p"))
        self.stage2 = TrainPaths(os.path.join(self.train, "mixed"))
        self.stage3 = TrainPaths(os.path.join(self.train, "edit"))
        self.edit_shards = os.path.join(self.root, "shards_edit")
        self.edit_report = os.path.join(self.root, "producer_report_edit.json")
        self.samples = os.path.join(self.root, "samples")
        self.samples_edit = os.path.join(self.root, "samples_edit")
        self.loss_png = os.path.join(self.root, "loss.png")
        self.logs = os.path.join(self.root, "logs")
        self.summary = os.path.join(self.root, SUMMARY_FILE)

    def report(self, family: int) -> str:
        """The producer's report of one bucket family's run (its table beside it, .txt)."""
        return os.path.join(self.root, f"producer_report_{family}p.json")


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
    edit_shards, edit_per_shard = shard_plan(args.edit_samples)
    # All three of the report's text-synthesis strategies in turn: plain backgrounds, text in (procedural)
    # scenes, slides/posters/app screens; and edit triplets of plain samples.
    return Stage("shards", "Generate synthetic text-rendering WebDataset shards (plain, in scenes, templates) and "
                 "edit triplets", [
        py("-m", "producer.synthetic", L.shards, "--shards", str(shards), "--per-shard", str(per_shard),
           "--seed", str(SEED), "--strategy", "all"),
        py("-m", "producer.synthetic", L.edit_shards, "--task", "edit", "--shards", str(edit_shards),
           "--per-shard", str(edit_per_shard), "--seed", str(SEED)),
    ], outputs=[L.shards, L.edit_shards],
        done=shards_hold(L.shards, shards, per_shard) and shards_hold(L.edit_shards, edit_shards, edit_per_shard),
        timeout_s=600)


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
    # The same shards once per bucket family into one cache, as the joint stage's cache is made (the 640p run
    # upscales the 256-448 px synthetic images).
    reports = [L.report(f) for f in FAMILIES]
    runs = [(L.shards, family, report, []) for family, report in zip(FAMILIES, reports)]
    # The edit triplets into the same cache: their samples get the source's latents (cache format v2)
    runs.append((L.edit_shards, EDIT_FAMILY, L.edit_report, [f"edit.condition_area={EDIT_CONDITION_AREA}"]))
    reports.append(L.edit_report)
    return Stage("producer", "Producer on a local Ray: filter -> encode -> bucketed latent cache (256p and 640p; "
                 "edit triplets at 256p)", [
        *(py("-m", "producer", "--input", shards, "--cache-dir", L.cache, "--encoders", L.encoders,
             "--config", PRODUCER_CONFIG, f"base_resolution={family}", "pools.cpu_actors=1", "pools.encoder_actors=1",
             *extra, "--num-cpus", "2", "--report", report) for shards, family, report, extra in runs),
        # duplicates across input shards (each shard was deduplicated on its own while it was processed)
        py("-m", "producer.dedup", L.cache),
        # sealing comes after everything that writes the cache: a sealed cache means the stage is done
        py("-m", "megatron_qwen_image.cache", "seal", L.cache),
        py("-m", "megatron_qwen_image.cache", "inspect", L.cache),
        # what a person looks at: drops, score histograms, buckets, text lengths, decoded samples per bucket
        py("-m", "megatron_qwen_image.cache", "report", L.cache, "--encoders", L.encoders, "--per-bucket", "3",
           "--reports", *reports),
    ], outputs=[L.cache, *reports, *map(table_path, reports)],
        done=all(os.path.isfile(r) for r in reports) and sealed_count(L.cache) is not None, timeout_s=1200)


def train_stage(L: DemoPaths, args) -> Stage:
    # Checked before torchrun starts, where the fix can be named: more samples fill more buckets.
    producer = producer_summary(L, FAMILIES[0])
    if not producer["trainable_buckets"]:
        raise DemoError(f"stage 'producer': no {FAMILIES[0]}p bucket holds a whole global batch ({global_batch_size()} "
                        f"samples, {TRAIN_CONFIG}): {producer['buckets']}; raise --samples (got {args.samples})")
    # A checkpoint and a validation half-way and at the end (the last step is always saved; validation runs
    # at multiples of the interval).
    interval = max(1, args.steps // 2)
    T = L.stage1
    return Stage("train_256p", "Curriculum stage 1: tiny MMDiT on the 256p family, TP=2 on 2 CPU processes "
                 "(torchrun, gloo)", [
        py("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "consumer.train", "--config", TRAIN_CONFIG, "--cache-dir", L.cache,
           "--log-jsonl", T.stats, "--tensorboard-dir", T.tensorboard,
           "--save", T.checkpoints, "--save-interval", str(interval), "--eval-interval", str(interval),
           f"validation.prompts={L.prompts}", f"validation.encoders={L.encoders}",
           f"validation.steps={SAMPLE_STEPS}", f"data.cache.holdout_fraction={HOLDOUT_FRACTION}", T2I_ONLY,
           f"train.train_iters={args.steps}", "logging.log_interval=5"),
    ], outputs=[T.root], done=trained(T, args.steps), timeout_s=1800)


def mixed_stage(L: DemoPaths, args) -> Stage:
    # Weights and optimizer state from stage 1; its own schedule, step count and data position. A held-out loss
    # at the end (over both families' held-out keys); no images: the stage-1 grids show the prompts.
    T = L.stage2
    return Stage("train_mixed", "Curriculum stage 2: 256p + 640p, compute-balanced, from stage 1's checkpoint", [
        py("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "consumer.train", "--config", MIXED_CONFIG, "--cache-dir", L.cache,
           "--pretrained", checkpoint_of(L.stage1, args.steps), "--pretrained-optimizer",
           "--log-jsonl", T.stats, "--tensorboard-dir", T.tensorboard, "--save", T.checkpoints,
           "--eval-interval", str(args.mixed_steps), f"data.cache.holdout_fraction={HOLDOUT_FRACTION}", T2I_ONLY,
           f"train.train_iters={args.mixed_steps}", "logging.log_interval=5"),
    ], outputs=[T.root], done=trained(T, args.mixed_steps), timeout_s=1800)


def edit_stage(L: DemoPaths, args) -> Stage:
    # Checked before torchrun starts: an edit group (bucket x source size) must hold a whole global batch.
    # (by bucket: a synthetic source has its target's size, so a bucket's edit samples are one batch group)
    edits = producer_summary(L, EDIT_FAMILY, L.edit_report)
    if not edits["trainable_buckets"]:
        raise DemoError(f"stage 'producer': no bucket of the edit triplets holds a whole global batch "
                        f"({global_batch_size()} samples): {edits['buckets']}; raise --edit-samples "
                        f"(got {args.edit_samples})")
    # Weights from stage 2, a fresh optimizer and schedule (a fine-tune, as of a released checkpoint); the held-out
    # loss at the end, per task.
    T = L.stage3
    return Stage("train_edit", "Editing stage: text-to-image and edit samples (256p), half of the steps each, "
                 "from stage 2's weights", [
        py("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "consumer.train", "--config", EDIT_CONFIG, "--cache-dir", L.cache,
           "--pretrained", checkpoint_of(L.stage2, args.mixed_steps),
           "--log-jsonl", T.stats, "--tensorboard-dir", T.tensorboard, "--save", T.checkpoints,
           "--eval-interval", str(args.edit_steps), f"data.cache.holdout_fraction={HOLDOUT_FRACTION}",
           f"train.train_iters={args.edit_steps}", "logging.log_interval=5"),
    ], outputs=[T.root], done=trained(T, args.edit_steps), timeout_s=1800)


def checkpoint_of(T: TrainPaths, step: int) -> str:
    return os.path.join(T.checkpoints, f"iter_{step:07d}")


def trained(T: TrainPaths, steps: int) -> bool:
    """Whether a training stage is done: its stats, and `latest` naming the checkpoint of its last step."""
    return os.path.isfile(T.stats) and latest_checkpoint(T.checkpoints) == checkpoint_of(T, steps)


def sample_stage(L: DemoPaths, args) -> Stage:
    # One process: the TP=2 checkpoint loads at TP=1 (dist_checkpointing reshards on load).
    return Stage("sample", "Images of the validation prompts and of the edit prompts from the last checkpoint", [
        py("-m", "consumer.sample", "--load", L.stage3.checkpoints, "--encoders", L.encoders, "--prompts", PROMPTS,
           "--steps", str(SAMPLE_STEPS), "--out", L.samples),
        # each instruction edits its source image, encoded as the producer encoded the training sources
        py("-m", "consumer.sample", "--load", L.stage3.checkpoints, "--encoders", L.encoders, "--prompts",
           EDIT_PROMPTS, "--condition-area", str(EDIT_CONDITION_AREA), "--steps", str(SAMPLE_STEPS),
           "--out", L.samples_edit),
    ], outputs=[L.samples, L.samples_edit],
        done=all(os.path.isfile(os.path.join(d, "grid.png")) for d in (L.samples, L.samples_edit)), timeout_s=600)


def plot_stage(L: DemoPaths, args) -> Stage:
    # Never reused: it takes seconds, and redrawing shows the plotting command on every run.
    return Stage("plot", "The three stages' loss curves", [
        py("-m", "launch.plot", L.stage1.stats, L.stage2.stats, L.stage3.stats, "--labels", "stage 1: 256p",
           "stage 2: 256p + 640p", "stage 3: 256p + editing", "--out", L.loss_png)],
        outputs=[L.loss_png], done=False, timeout_s=300)


# Built one at a time, when the stages before have finished: a stage's done-check and the train stage's
# bucket check read what the earlier stages wrote.
STAGES = [encoders_stage, shards_stage, producer_stage, train_stage, mixed_stage, edit_stage, sample_stage, plot_stage]


def latest_checkpoint(checkpoints: str) -> str | None:
    """The checkpoint `latest` names; the trainer moves `latest` only after a checkpoint is complete."""
    try:
        with open(os.path.join(checkpoints, "latest")) as f:
            return os.path.join(checkpoints, f.read().strip())
    except FileNotFoundError:
        return None


def producer_summary(L: DemoPaths, family: int, path: str | None = None) -> dict:
    """One producer run's report (by default the family's text-to-image run), with the samples producer.dedup
    excluded (loaders skip them) taken out of the bucket counts."""
    with open(path or L.report(family)) as f:
        report = json.load(f)
    excluded = read_exclusions(L.cache)
    # This run's part of the exclusions: the text-to-image and the edit runs share buckets, not shards
    edits = path is not None and path == L.edit_report
    shards = {s.path: s for s in CacheReader(L.cache).shards()}
    excluded_per_bucket: dict = {}
    for shard_path, rows in excluded.rows.items():
        info = shards.get(shard_path)
        if info is not None and bool(info.cond_shapes) == edits:
            name = bucket_name(*info.bucket)
            excluded_per_bucket[name] = excluded_per_bucket.get(name, 0) + len(rows)
    buckets = {b: n - excluded_per_bucket.get(b, 0) for b, n in report["buckets"].items()}
    gbs = global_batch_size()
    return {"samples_seen": report["samples"]["seen"], "samples_written": report["samples"]["written"],
            "cross_shard_duplicates": sum(excluded_per_bucket.get(b, 0) for b in report["buckets"]), "drops": report["drops"], "buckets": buckets,
            "tasks": report.get("tasks", {}),
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
    print(f"megatron-qwen-image demo -> {L.root}\n  steps {args.steps} + {args.mixed_steps} + {args.edit_steps}, "
          f"samples {args.samples} + {args.edit_samples} edit triplets, "
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
    stages = {"256p": L.stage1, "mixed": L.stage2, "edit": L.stage3}
    records = {name: read_stats(T.stats) for name, T in stages.items()}
    return {
        "out": L.root, "steps": args.steps, "mixed_steps": args.mixed_steps, "edit_steps": args.edit_steps,
        "samples": args.samples, "edit_samples": args.edit_samples,
        "wall_s": round(wall_s, 2), "stages": [asdict(r) for r in results],
        "outputs": {
            "encoders": L.encoders, "shards": L.shards, "edit_shards": L.edit_shards, "cache": L.cache,
            "data_report": os.path.join(L.cache, "reports", "data", "index.html"),
            **{f"producer_report_{f}p": L.report(f) for f in FAMILIES}, "producer_report_edit": L.edit_report,
            **{f"train_{name}_stats": T.stats for name, T in stages.items()},
            **{f"tensorboard_{name}": T.tensorboard for name, T in stages.items()},
            "checkpoints_256p": L.stage1.checkpoints, "checkpoints_mixed": L.stage2.checkpoints,
            "checkpoints_edit": L.stage3.checkpoints, "checkpoint_latest": latest_checkpoint(L.stage3.checkpoints),
            "validation_grid": last_validation_grid(L.stage1.validation),
            "samples_grid": os.path.join(L.samples, "grid.png"),
            "edit_samples_grid": os.path.join(L.samples_edit, "grid.png"), "loss_png": L.loss_png, "logs": L.logs,
            "summary": L.summary,
        },
        "shards": {"tars": shards, "per_shard": per_shard},
        "producer": {**{str(f): producer_summary(L, f) for f in FAMILIES},
                     "edit": producer_summary(L, EDIT_FAMILY, L.edit_report)},
        "loss": {name: summarize(r) for name, r in records.items()},
        "loss_by_task": {task: summarize(rs) for task in ("t2i", "ti2i")
                         if (rs := [r for r in records["edit"] if r.get("task", "t2i") == task])},
        "buckets_trained": {name: bucket_steps(r) for name, r in records.items()},
        "validation": {name: validation_summary(r) for name, r in records.items()},
    }


def bucket_steps(records: list[dict]) -> dict:
    """Pixel bucket ("+edit" for edit steps) -> [steps, samples per step] of a stage's records (compute-balanced:
    per bucket)."""
    out: dict = {}
    for r in records:
        name = bucket_name(*bucket_of_latent(r["latent_hw"])) + (" +edit" if r.get("task") == "ti2i" else "")
        entry = out.setdefault(name, [0, r["samples"]])
        entry[0] += 1
    return dict(sorted(out.items()))


def last_validation_grid(directory: str) -> str | None:
    """The newest step_NNNNNN.png the trainer's validation wrote."""
    grids = sorted(n for n in os.listdir(directory) if re.fullmatch(r"step_\d+\.png", n)) if os.path.isdir(directory) else []
    return os.path.join(directory, grids[-1]) if grids else None


def validation_summary(records: list[dict]) -> list[dict]:
    """Step, validation loss (and per task, where both are held out) and seconds of every validation the run made
    (records: launch.plot.read_stats)."""
    return [{"step": r["step"], "val_loss": r.get("val_loss"), "val_s": r["val_s"],
             **{k: r[k] for k in ("val_loss_t2i", "val_loss_ti2i") if k in r}} for r in records if "val_s" in r]


def print_summary(s: dict) -> None:
    print(f"\n=== Demo finished in {s['wall_s']:.1f} s ===")
    for st in s["stages"]:
        print(f"  {st['name']:<12}" + (f"{st['seconds']:6.1f} s" if st["status"] == "ran" else "reused"))
    print("\nOutputs:")
    for label, path in s["outputs"].items():
        print(f"  {label:<22}{path}")
    for family, p in s["producer"].items():
        drops = ", ".join(f"{k}={v}" for k, v in p["drops"].items()) or "none"
        run = "edit triplets (256p)" if family == "edit" else f"{family}p family"
        print(f"\nProducer, {run}: {p['samples_seen']} samples seen, {p['samples_written']} written; drops: "
              f"{drops}; {p['cross_shard_duplicates']} duplicates across shards")
        print("  buckets (w x h: samples): " + "  ".join(f"{k}:{v}" for k, v in p["buckets"].items()))
    names = {"256p": "Stage 1 (256p)", "mixed": "Stage 2 (256p + 640p, from stage 1)",
             "edit": "Stage 3 (256p text-to-image + editing, from stage 2)"}
    for stage, loss in s["loss"].items():
        print(f"\n{names[stage]}: loss over {loss['steps']} steps {loss['first_loss']:.3f} -> {loss['last_loss']:.3f} "
              f"(mean of the first/last {loss['window']} steps: {loss['mean_first_window']:.3f} -> "
              f"{loss['mean_last_window']:.3f})")
        print("  steps per bucket (bucket: steps x samples): " + "  ".join(
            f"{b}: {n} x {m}" for b, (n, m) in s["buckets_trained"][stage].items()))
        print("  validation loss (held-out keys, fixed sigmas and noise): " + ", ".join(
            f"step {v['step']}: {v['val_loss']:.3f}"
            + "".join(f", {k[len('val_loss_'):]} {v[k]:.3f}" for k in ("val_loss_t2i", "val_loss_ti2i") if k in v)
            + f" ({v['val_s']:.1f} s)" for v in s["validation"][stage]))
    for task, loss in s["loss_by_task"].items():
        print(f"  stage 3, {task} steps: loss {loss['first_loss']:.3f} -> {loss['last_loss']:.3f} over {loss['steps']} "
              f"steps (mean of the first/last {loss['window']}: {loss['mean_first_window']:.3f} -> "
              f"{loss['mean_last_window']:.3f})")
    print(f"\nValidation grid (stage 1): {s['outputs']['validation_grid']}")
    print(f"Edits of the edit prompts' sources (last checkpoint): {s['outputs']['edit_samples_grid']}")
    print(f"Data report of the cache: {s['outputs']['data_report']}")
    print(f"Loss curves of the three stages: {s['outputs']['loss_png']}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output directory (default: outputs/demo)")
    p.add_argument("--steps", type=int, default=40, help="training steps of stage 1, 256p (default: 40)")
    p.add_argument("--mixed-steps", type=int, default=20,
                   help="training steps of stage 2, 256p + 640p from stage 1's checkpoint (default: 20)")
    p.add_argument("--edit-steps", type=int, default=20,
                   help="training steps of stage 3, 256p text-to-image + editing from stage 2's weights (default: 20)")
    p.add_argument("--edit-samples", type=int, default=64,
                   help=f"synthetic edit triplets, in shards of at most {MAX_PER_SHARD} (default: 64)")
    p.add_argument("--samples", type=int, default=96,
                   help=f"synthetic samples, in shards of at most {MAX_PER_SHARD} (rounded up to fill them; "
                        f"default: 96)")
    p.add_argument("--clean", action="store_true", help="delete --out first and run every stage")
    p.add_argument("--quiet", action="store_true", help="only headings and the summary (stage output still "
                                                        "goes to OUT/logs/)")
    args = p.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--mixed-steps", args.mixed_steps), ("--edit-steps", args.edit_steps)):
        if value < 1:
            p.error(f"{flag}: must be >= 1, got {value}")
    for flag, value in (("--samples", args.samples), ("--edit-samples", args.edit_samples)):
        if value < MIN_SAMPLES:
            p.error(f"{flag}: must be >= {MIN_SAMPLES} (a resolution bucket needs a whole global batch), got {value}")
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
