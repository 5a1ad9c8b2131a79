"""The trainer fails loudly, early and once, and says what it is doing while it waits:

* refusals (a --cache-dir that is a file, an empty cache, a cache whose every bucket is lost, a YAML syntax
  error, a --load that names no checkpoint, validation with nothing to validate, validation prompts not
  encoded, an encoders directory without a VAE) are one line `error: config key '...'` and exit code 2 from
  `python -m consumer.launch`, before torchrun starts any worker; under plain torchrun only rank 0 prints it;
* `--load` resolution (consumer.start_point): a typo or a file is refused, a missing --load that is also the
  --save root (the requeue idiom) starts fresh;
* the launcher's one line for workers that fail later, and the rank-prefixed logging of every rank;
* end to end (torchrun, 2 processes): a streaming trainer logs what it waits for, trains past a lost bucket,
  and reports the skipped shard in the JSONL stats and an end-of-run line.
"""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from consumer.config import load_config
from consumer.start_point import StartPoint, start_point
from megatron_qwen_image import checkpoint_format
from megatron_qwen_image.cache import CacheReader, CacheWriter, seal
from megatron_qwen_image.config import ConfigError
from megatron_qwen_image.encoders.text import QwenTextEncoder
from megatron_qwen_image.encoders.make_tiny import ensure_tiny
from megatron_qwen_image.prompts import encode_prompts, read_prompts_file, save_encoded
from tests.support.caches import write_unit
from tests.support.processes import kill_process_group
from tests.torchrun import REPO
from tests.waiting import wait_for

SMOKE = os.path.join(REPO, "configs", "smoke_tp2.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def lose_bucket(root, bucket: tuple[int, int]) -> None:
    for s in CacheReader(str(root)).shards():
        if s.bucket == bucket:
            os.remove(os.path.join(str(root), s.path))


def fake_checkpoint(path) -> str:
    """A directory that checkpoint_format counts as a complete checkpoint (its two marker files)."""
    path.mkdir(parents=True)
    for name in (checkpoint_format.COMPLETE_MARKER, checkpoint_format.MEGATRON_METADATA):
        (path / name).write_text("{}")
    return str(path)


# ---- --load / --pretrained ------------------------------------------------------------------------
def test_load_must_name_a_checkpoint_unless_it_is_the_save_root(tmp_path):
    root = tmp_path / "root"
    done = fake_checkpoint(root / "iter_0000002")
    checkpoint_format.write_latest(str(root), "iter_0000002")
    (tmp_path / "file").write_text("x")
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "half" / "iter_0000004")  # a save killed before complete.json
    missing = str(tmp_path / "typo")

    def start(**ck):
        return start_point(load_config(SMOKE, [f"checkpoint.{k}={v}" for k, v in ck.items()]).checkpoint)

    assert start(load=root) == StartPoint(resume=done) and start(load=done) == StartPoint(resume=done)
    assert start(load=root).describe() == f"resuming {done}"
    assert start(load=missing, save=missing) == StartPoint()  # the requeue idiom's first run
    assert start(load=missing, save=missing + "/").describe() == "from scratch (no checkpoint loaded)"
    assert start(load=tmp_path / "empty", save=tmp_path / "empty") == StartPoint()
    assert start(load=missing, save=missing, pretrained=root) == StartPoint(pretrained=done)
    for ck, key, words in (
        (dict(load=missing), "checkpoint.load", f"{missing} does not exist; give a checkpoint root"),
        (dict(load=missing, save=tmp_path / "other"), "checkpoint.load", "does not exist"),
        (dict(load=tmp_path / "file", save=tmp_path / "file"), "checkpoint.load",
         "is a file, not a checkpoint root or checkpoint directory"),
        (dict(load=tmp_path / "empty"), "checkpoint.load", "holds no complete checkpoint (no latest file"),
        (dict(load=tmp_path / "half"), "checkpoint.load", "holds no complete checkpoint"),
        (dict(load=tmp_path / "half" / "iter_0000004"), "checkpoint.load", "checkpoint is incomplete"),
        (dict(pretrained=missing), "checkpoint.pretrained", f"no checkpoint found at {missing}"),
    ):
        with pytest.raises(ConfigError) as e:
            start(**ck)
        assert e.value.key == key and words in str(e.value), (ck, str(e.value))
    checkpoint_format.write_latest(str(root), "iter_0000009")  # someone edited `latest`
    with pytest.raises(ConfigError, match="names 'iter_0000009', which is not a complete checkpoint"):
        start(load=root, save=root)


# ---- refusals from consumer.launch -----------------------------------------------------------------
@pytest.fixture
def launch_main(monkeypatch):
    """consumer.launch.main in this process, with torchrun replaced by a failure: a refusal must come first.
    Restores the log level the launcher lowers for its checks."""
    from consumer import launch

    def no_torchrun(args):
        raise AssertionError("torchrun was started")

    monkeypatch.setattr(launch.torchrun, "run", no_torchrun)
    quieted = logging.getLogger("megatron_qwen_image")
    level = quieted.level
    yield launch.main
    quieted.setLevel(level)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caches")
    subprocess.run([sys.executable, "-m", "megatron_qwen_image.cache", "init", str(tmp / "empty")], check=True,
                   env=ENV, capture_output=True)
    write_unit(tmp / "lost", 0, [64, 64])
    lose_bucket(tmp / "lost", (64, 64))
    write_unit(tmp / "one", 0, [64, 64])
    (tmp / "file").write_text("not a cache")
    (tmp / "bad.yaml").write_text("optimizer:\n  lr: [1e-3\n")
    # validation inputs: a prompts file, the same encoded, and an encoders directory without a VAE
    (tmp / "prompts.yaml").write_text("- a cat\n")
    tiny = ensure_tiny()
    save_encoded(str(tmp / "prompts.safetensors"), encode_prompts(read_prompts_file(str(tmp / "prompts.yaml"), 64, 64),
                                                                   QwenTextEncoder.from_pretrained(tiny)))
    (tmp / "novae").mkdir()
    for part in ("tokenizer", "text_encoder"):
        os.symlink(os.path.join(tiny, part), tmp / "novae" / part)
    (tmp / "tiny").symlink_to(tiny)
    return tmp


@pytest.mark.parametrize("args, key, words", [
    (["--data", "cache", "--cache-dir", "{tmp}/file"], "data.cache_dir", "{tmp}/file is a file, not a latent cache directory"),
    (["--data", "cache", "--cache-dir", "{tmp}/empty"], "data.cache_dir",
     "no bucket of {tmp}/empty has global_batch_size=4 readable samples (first 0 manifest entries): no samples at all"),
    (["--data", "cache", "--cache-dir", "{tmp}/lost"], "data.cache_dir",
     "no bucket of {tmp}/lost has global_batch_size=4 readable samples (first 1 manifest entries): no samples at "
     "all; 1 shards are unreadable"),
    (["--load", "{tmp}/typo"], "checkpoint.load", "{tmp}/typo does not exist"),
    (["--load", "{tmp}/file"], "checkpoint.load", "{tmp}/file is a file, not a checkpoint root"),
    (["--load", "{tmp}/empty"], "checkpoint.load", "{tmp}/empty holds no complete checkpoint"),
    (["--eval-interval", "5"], "validation.eval_interval", "is 5 but there is nothing to validate: give "
     "validation.prompts"),
    (["--eval-interval", "5", "validation.prompts={tmp}/prompts.safetensors"], "validation.encoders",
     "is required with validation.prompts"),
    (["--eval-interval", "5", "validation.prompts={tmp}/prompts.yaml", "validation.encoders={tmp}/tiny"],
     "validation.prompts", "encoded prompts {tmp}/prompts.yaml: not a readable safetensors file: it looks like a "
     "prompts file; encode it first"),
    (["--eval-interval", "5", "validation.prompts={tmp}/prompts.safetensors", "validation.encoders={tmp}/novae"],
     "validation.encoders", "no Qwen-Image VAE"),
    (["--eval-interval", "5", "validation.loss_cache_dir={tmp}/file"], "validation.loss_cache_dir",
     "{tmp}/file is not a directory"),
    (["--data", "cache", "--cache-dir", "{tmp}/one", "--eval-interval", "5", "data.cache.holdout_fraction=1e-9"],
     "data.cache.holdout_fraction", "no held-out samples in {tmp}/one (holdout_fraction=1e-09 of 16 samples selects "
     "none): raise the fraction or give validation.loss_cache_dir"),
    (["--data", "cache", "--cache-dir", "{tmp}/one", "data.cache.family_weights={{640: 1}}"],
     "data.cache.family_weights", "family_weights names bucket families [640] that {tmp}/one holds no readable "
     "sample of"),
    (["data.cache.family_weights={{640: 0}}"], "data.cache.family_weights", "family_weights={{640: 0}}: the weights "
     "must sum to a positive number"),
    (["data.cache.holdout_fraction=0.1"], "data.cache.holdout_fraction", "holds out keys of the latent cache: "
     "needs data.source=cache"),
    (["--data", "cache", "--cache-dir", "{tmp}/one", "data.cache.category_weights={{portrait: 1, '*': 1}}"],
     "data.cache.category_weights", "category_weights names categories ['portrait'] that no readable sample of "
     "{tmp}/one has"),
    (["--data", "cache", "data.cache.category_weights={{portrait: -1}}"], "data.cache.category_weights",
     "category_weights[portrait]=-1 must be a number >= 0"),
])
def test_launch_refuses_in_one_line_before_any_worker_starts(launch_main, caches, capsys, args, key, words):
    args = [a.format(tmp=caches) for a in args]
    assert launch_main(["--standalone", "--nproc-per-node", "2", "--", "--config", SMOKE, *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: config key '{key}': {words.format(tmp=caches)}"), err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # one line


def test_launch_checks_the_world_torchrun_would_start(launch_main, caches, capsys):
    """--check-only (train.sbatch's batch node) checks the layout of --nnodes x --nproc-per-node and starts
    nothing; a node other than node rank 0 refuses silently (node 0 says it); an elastic range is refused."""
    assert launch_main(["--check-only", "--nnodes", "2", "--nproc-per-node", "1", "--", "--config", SMOKE]) == 0
    assert launch_main(["--check-only", "--nproc-per-node", "3", "--", "--config", SMOKE]) == 2
    assert capsys.readouterr().err == ("error: config key 'parallelism.tensor_model_parallel_size': world size 3 is "
                                       "not divisible by tensor_model_parallel_size=2\n")
    assert launch_main(["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "1", "--",
                        "--config", str(caches / "bad.yaml")]) == 2
    assert capsys.readouterr().err == ""
    assert launch_main(["--nnodes", "1:2", "--nproc-per-node", "2", "--", "--config", SMOKE]) == 2
    assert "give a fixed node count" in capsys.readouterr().err


def test_launch_refuses_a_yaml_syntax_error_with_exit_2_and_one_line(caches):
    """The real program: exit code 2, one line on stderr, nothing on stdout, in seconds (no worker starts)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "consumer.launch", "--standalone", "--nproc-per-node", "2", "--",
                           "--config", str(caches / "bad.yaml")], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert re.fullmatch(r"error: config key 'config': YAML syntax error at .*bad\.yaml:3:1: .*\n", proc.stderr), proc.stderr
    assert time.monotonic() - t0 < 60


def test_plain_torchrun_prints_a_refusal_once(caches):
    """Without the launcher every worker finds the error, rank 0 prints it (torchrun adds its own report)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "consumer.train", "--config", str(caches / "bad.yaml")], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120, start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count("error: config key 'config': YAML syntax error at") == 1, out
    assert "consumer/train.py\", line" not in out, out  # no traceback of the trainer


def test_launch_reports_failed_workers_in_one_line():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from consumer.launch import failure_line

    def failed(**codes):
        return ChildFailedError("consumer.train", {int(r[1:]): ProcessFailure(int(r[1:]), 100 + int(r[1:]), code,
                                                                              "<N/A>") for r, code in codes.items()})

    assert failure_line(failed(r0=2, r1=2)) == (
        "consumer.launch: training failed: exit code 2 on ranks 0, 1 (the workers' output is above)", 2)
    line, code = failure_line(failed(r0=1, r1=-signal.SIGTERM))
    assert line.endswith("exit code 1 on rank 0; killed by SIGTERM on rank 1 (the workers' output is above)")
    assert code == 1
    assert failure_line(failed(r3=-signal.SIGKILL))[1] == 128 + signal.SIGKILL
    assert "0, 1, 2, 3, 4, 5, 6, 7, ... (9 ranks)" in failure_line(failed(**{f"r{r}": 2 for r in range(9)}))[0]


def test_every_rank_logs_with_its_rank_and_only_rank_0_at_info():
    code = ("import logging\n"
            "from consumer.rank_logging import configure_logging\n"
            "configure_logging('rank 1', verbose=False)\n"
            "logging.getLogger('megatron_qwen_image.cache.loader').info('not shown')\n"
            "logging.getLogger('megatron_qwen_image.cache.loader').warning('a warning')\n"
            "configure_logging('rank 0', verbose=True)\n"
            "logging.getLogger('consumer.train').info('an info line')\n"
            "logging.getLogger('megatron.core').info('megatron-core INFO stays quiet')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.stderr == ("[rank 1] WARNING megatron_qwen_image.cache.loader: a warning\n"
                           "[rank 0] INFO consumer.train: an info line\n"), proc.stderr


# ---- end to end ---------------------------------------------------------------------------------------
def test_streaming_trainer_says_what_it_waits_for_and_trains_past_a_lost_bucket(tmp_path):
    """consumer.launch, TP=2 on 2 processes, streaming from an open cache of two work units whose second
    bucket's shard is gone: rank 0 logs the wait (committed shards, what the round needs, seconds waited)
    until the cache is sealed; the lost bucket is left out; every step's stats count the skipped shard and
    one end-of-run line sums up. --save D --load D with D missing starts fresh and says so."""
    cache, jsonl, ckpt, log = tmp_path / "cache", tmp_path / "stats.jsonl", tmp_path / "ckpt", tmp_path / "train.log"
    write_unit(cache, 0, [64, 64])
    write_unit(cache, 1, [48, 80])
    lose_bucket(cache, (80, 48))
    cmd = [sys.executable, "-m", "consumer.launch", "--standalone", "--nproc-per-node", "2", "--", "--config", SMOKE,
           "--data", "cache", "--cache-dir", str(cache), "data.cache.streaming=true", "data.cache.poll_interval_s=0.2",
           "data.cache.wait_log_interval_s=1", "train.train_iters=6", "--log-jsonl", str(jsonl),
           "--save", str(ckpt), "--load", str(ckpt)]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def waiting_line_logged():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before waiting:\n{log.read_text()[-5000:]}"
        return "waiting for producers" in log.read_text()

    try:
        wait_for(waiting_line_logged, 240, "the streaming loader's waiting line", lambda: log.read_text()[-5000:])
        seal(str(cache))  # the last round takes what is left, then epoch mode
        assert proc.wait(timeout=240) == 0, log.read_text()[-5000:]
    finally:
        kill_process_group(proc)
    out = log.read_text()
    assert re.search(rf"^\[rank 0\] INFO megatron_qwen_image\.cache\.loader: waiting for producers: 2 shards \(32 samples\) "
                     rf"committed to {re.escape(str(cache))} so far; round 0 has 16 of the 32 new samples it takes, and 16 "
                     rf"of global_batch_size=4 in its fullest bucket; waited \d+ s$", out, re.M), out[-5000:]
    assert "[rank 1] INFO" not in out  # other ranks log warnings only
    for rank in (0, 1):
        assert f"[rank {rank}] WARNING megatron_qwen_image.cache.loader: 1 of 1 shards of manifest entries 1..1 are " \
               f"unreadable and left out of the plan" in out
    assert "has no readable shard (all are missing or truncated): training without it" in out
    assert "from scratch (no checkpoint loaded)" in out and "Traceback" not in out and "training failed" not in out

    records = [json.loads(line) for line in open(jsonl)]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(r["skipped_shards"] == 1 and r["skipped_samples"] == 0 and r["latent_hw"] == [8, 8] for r in records)
    assert records[-1]["data_wait_s"] >= 1
    summary = [line for line in out.splitlines() if line.startswith("data: ")]
    assert summary == [f"data: shards skipped 1 (unreadable when planned, or corrupt), samples skipped 0 (each "
                       f"replaced by another of its bucket), waited for producers {records[-1]['data_wait_s']:.0f} s"]
    assert checkpoint_format.resolve(str(ckpt)).endswith("iter_0000006")
