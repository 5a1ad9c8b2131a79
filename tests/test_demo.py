"""The one-command demo (launch/demo.py) end to end, and the loss-curve plotter (launch/plot.py).

The end-to-end test runs the real demo (tiny encoders -> synthetic shards -> producer on a local Ray ->
cache -> torchrun TP=2 training with validation -> sampling -> plot) with small numbers and checks its outputs against each other:
the cache holds exactly what the producer's report says it wrote, every training step's batch has the
latent size of a cache bucket (so training read the cache, not synthetic data), the stats have one record
per requested step, the checkpoint is the last step's, the PNG decodes. A second run must reuse every
stage but the plot.
"""
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from launch import demo
from launch.plot import StatsError, moving_average, plot_loss, read_stats, summarize
from tests.waiting import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAMPLES = 6, 32


def run_demo(out: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "launch.demo", "--out", out, "--steps", str(STEPS),
                           "--samples", str(SAMPLES), "--quiet", *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-8000:]}\n{proc.stderr[-8000:]}"
    return proc


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from megatron_qwen_image.cache import CacheReader

    out = str(tmp_path / "demo")
    proc = run_demo(out)
    with open(os.path.join(out, demo.SUMMARY_FILE)) as f:
        summary = json.load(f)
    o = summary["outputs"]
    assert [s["status"] for s in summary["stages"]] == ["ran"] * len(demo.STAGES)
    for label in ("encoders", "shards", "cache", "producer_report", "train_stats", "loss_png", "logs"):
        assert os.path.isabs(o[label]) and os.path.exists(o[label]), label
        assert o[label] in proc.stdout, f"the demo does not print where {label} is"

    # Producer report: every generated sample is accounted for (written or dropped for a named reason).
    with open(o["producer_report"]) as f:
        report = json.load(f)
    shards, per_shard = demo.shard_plan(SAMPLES)
    assert report["samples"]["seen"] == shards * per_shard
    assert report["samples"]["seen"] == report["samples"]["written"] + sum(report["drops"].values())
    assert report["samples"]["dropped"] == sum(report["drops"].values())
    assert isinstance(report["drops"], dict) and all(isinstance(v, int) and v > 0 for v in report["drops"].values())
    assert (report["shards"]["committed"], report["shards"]["failed"]) == (shards, 0)

    # The cache holds exactly what the report says was written, bucket by bucket, and is sealed.
    reader = CacheReader(o["cache"])
    cache_buckets = {f"{w}x{h}": b["samples"] for (w, h), b in reader.buckets().items()}
    assert cache_buckets == report["buckets"] and sum(cache_buckets.values()) == report["samples"]["written"]
    assert reader.sealed
    gbs = demo.global_batch_size()
    trainable = {(h // 8, w // 8) for (w, h), b in reader.buckets().items() if b["samples"] >= gbs}
    assert trainable, cache_buckets

    # Training: one record per step, finite losses, every batch from a cache bucket with a whole batch.
    records = read_stats(o["train_stats"])
    with open(o["train_stats"]) as f:
        assert sum(1 for line in f if line.strip()) == STEPS  # no duplicate or missing steps
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert {tuple(r["latent_hw"]) for r in records} <= trainable
    assert summary["loss"]["last_loss"] == records[-1]["loss"]

    # Checkpoint of the last step.
    ckpt = o["checkpoint_latest"]
    assert ckpt and os.path.isdir(ckpt) and os.path.basename(ckpt) == f"iter_{STEPS:07d}"
    with open(os.path.join(o["checkpoints"], "latest")) as f:
        assert f.read().strip() == os.path.basename(ckpt)
    assert os.listdir(ckpt)

    # The PNG is a real image.
    with Image.open(o["loss_png"]) as im:
        im.verify()
    with Image.open(o["loss_png"]) as im:
        assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300

    # Validation half-way and at the end (images and the held-out loss), and the sample command's images.
    assert [v["step"] for v in summary["validation"]] == [STEPS // 2, STEPS]
    assert all(math.isfinite(v["val_loss"]) and v["val_loss"] > 0 for v in summary["validation"])
    assert o["validation_grid"] == os.path.join(out, "train", "samples", f"step_{STEPS:06d}.png")
    assert f"Validation grid: {o['validation_grid']}" in proc.stdout
    prompts = len(open(os.path.join(REPO, demo.PROMPTS)).read().split("- prompt:")) - 1
    with open(os.path.join(out, "samples", "samples.jsonl")) as f:
        assert len(f.readlines()) == prompts
    for grid in (o["validation_grid"], o["samples_grid"]):
        with Image.open(grid) as im:
            assert im.format == "PNG" and im.size[0] >= 2 * 192

    # Re-running reuses every finished stage (only the plot is redrawn) and changes nothing.
    stats_before = open(o["train_stats"]).read()
    run_demo(out, timeout=120)
    with open(os.path.join(out, demo.SUMMARY_FILE)) as f:
        again = json.load(f)
    assert {s["name"]: s["status"] for s in again["stages"]} == {
        "encoders": "reused", "shards": "reused", "producer": "reused", "train": "reused", "sample": "reused",
        "plot": "ran"}
    assert open(o["train_stats"]).read() == stats_before


def test_demo_refuses_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("not a demo")
    with pytest.raises(demo.DemoError, match="not a demo output directory"):
        demo.prepare_out(demo.DemoPaths(str(tmp_path)), clean=True)
    assert (tmp_path / "precious.txt").read_text() == "not a demo"


def test_failing_stage_is_named_with_its_error(tmp_path):
    log = str(tmp_path / "logs" / "x.log")
    cmd = [sys.executable, "-c", "import sys; print('working'); sys.exit('error: widgets.count: must be > 0')"]
    with pytest.raises(demo.DemoError) as e:
        demo.run_command("widgets", cmd, log, quiet=True, timeout_s=120)
    msg = str(e.value)
    assert "stage 'widgets' failed" in msg and "status 1" in msg and log in msg
    assert "! error: widgets.count: must be > 0" in msg
    assert "working" in open(log).read()


def test_hanging_stage_times_out_and_is_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    # The stage starts a grandchild that would outlive it; the whole process group must die.
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    with pytest.raises(demo.DemoError, match="stage 'sleepy' timed out after 6 s"):
        demo.run_command("sleepy", [sys.executable, "-c", code], str(tmp_path / "s.log"), quiet=True, timeout_s=6)
    pid = int(pid_file.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
            return open(f"/proc/{pid}/stat").read().split()[2] == "Z"  # killed, not yet reaped by init
        except (ProcessLookupError, FileNotFoundError):
            return True

    wait_for(gone, 60, f"grandchild {pid} of the timed-out stage to die")


def test_demo_argument_checks(capsys):
    for argv, key in ((["--steps", "0"], "--steps"), (["--samples", "3"], "--samples")):
        with pytest.raises(SystemExit) as e:
            demo.parse_args(argv)
        assert e.value.code == 2 and key in capsys.readouterr().err


def test_shard_plan_covers_samples():
    for n in (16, 31, 32, 33, 96, 100, 1000):
        shards, per = demo.shard_plan(n)
        assert per <= demo.MAX_PER_SHARD and n <= shards * per < n + shards


def _write_stats(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_read_stats_last_record_of_a_step_wins_and_torn_tail(tmp_path):
    p = tmp_path / "stats.jsonl"
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "latent_hw": [32, 32]} for s in (1, 2, 3)]
    rows.append({"step": 2, "loss": 9.0, "lr": 1e-3, "latent_hw": [32, 32]})  # a resumed run re-did step 2
    _write_stats(p, rows)
    with open(p, "a") as f:
        f.write('{"step": 4, "lo')  # a crashed writer's torn last line
    recs = read_stats(str(p))
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[1]["loss"] == 9.0


def test_read_stats_refuses_wrong_files(tmp_path):
    with pytest.raises(StatsError, match="no such stats file"):
        read_stats(str(tmp_path / "missing.jsonl"))
    p = tmp_path / "bad.jsonl"
    p.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(StatsError, match=r"bad.jsonl:2"):
        read_stats(str(p))
    p.write_text('{"epoch": 1}\n')
    with pytest.raises(StatsError, match="'step' and 'loss'"):
        read_stats(str(p))


def test_moving_average_and_summary():
    vals = [4.0, 2.0, float("nan"), 6.0]
    assert moving_average(vals, 2) == [4.0, 3.0, 2.0, 6.0]
    recs = [{"step": i + 1, "loss": v} for i, v in enumerate([3.0, 2.0, 1.0])]
    s = summarize(recs, window=2)
    assert (s["first_loss"], s["last_loss"], s["mean_first_window"], s["mean_last_window"]) == (3.0, 1.0, 2.5, 1.5)


def test_plot_loss_writes_png(tmp_path):
    p = tmp_path / "stats.jsonl"
    _write_stats(p, [{"step": s, "loss": 2.0 / s, "lr": 1e-3 * s, "latent_hw": [32, 32] if s % 2 else [24, 42]}
                     for s in range(1, 11)])
    png = tmp_path / "plots" / "loss.png"
    s = plot_loss(str(p), str(png))
    assert s["steps"] == 10 and s["last_loss"] == 0.2
    with Image.open(png) as im:
        assert im.format == "PNG"
    assert not list((tmp_path / "plots").glob("*.tmp*"))
