"""The one-command demo (launch/demo.py) end to end, and the loss-curve plotter (launch/plot.py).

The end-to-end test runs the real demo (tiny encoders -> synthetic shards -> producer on a local Ray, for the
256p and the 640p family -> cache -> torchrun TP=2 training, stage 1 on 256p with validation, stage 2 on both
families from stage 1's checkpoint -> sampling -> plot) with small numbers and checks its outputs against each
other: the cache holds exactly what the producers' reports say they wrote, every training step's batch has the
latent size of a cache bucket of the stage's families (so training read the cache, not synthetic data), the stats
have one record per requested step, the checkpoints are the last steps', the PNG decodes. A second run must reuse
every stage but the plot.
"""
import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from launch import demo
from megatron_qwen_image.cache.buckets import latent_size
from megatron_qwen_image.cache.format import parse_bucket_name
from launch.plot import StatsError, moving_average, plot_loss, read_stats, summarize
from tests.waiting import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, MIXED_STEPS, EDIT_STEPS, SAMPLES, EDIT_SAMPLES = 6, 4, 4, 32, 32


def run_demo(out: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "launch.demo", "--out", out, "--steps", str(STEPS),
                           "--mixed-steps", str(MIXED_STEPS), "--edit-steps", str(EDIT_STEPS), "--samples", str(SAMPLES),
                           "--edit-samples", str(EDIT_SAMPLES), "--quiet", *extra], cwd=REPO, env=env,
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
    for label in ("encoders", "shards", "cache", "data_report", "producer_report_256p", "producer_report_640p",
                  "train_256p_stats", "train_mixed_stats", "train_edit_stats", "loss_png", "logs", "edit_shards",
                  "producer_report_edit", "edit_samples_grid"):
        assert os.path.isabs(o[label]) and os.path.exists(o[label]), label
        assert o[label] in proc.stdout, f"the demo does not print where {label} is"
    # The data report decoded samples of every bucket the cache holds.
    page = open(o["data_report"]).read()
    for bucket in os.listdir(o["cache"]):
        if bucket.startswith("bucket="):
            assert f'src="samples_{bucket[len("bucket="):]}.png"' in page, bucket

    # Producer reports, one per bucket family: every generated sample is accounted for (written or dropped for a
    # named reason), in each family.
    shards, per_shard = demo.shard_plan(SAMPLES)
    reports = {}
    for family in demo.FAMILIES:
        with open(o[f"producer_report_{family}p"]) as f:
            report = reports[family] = json.load(f)
        assert report["samples"]["seen"] == shards * per_shard
        assert report["samples"]["seen"] == report["samples"]["written"] + sum(report["drops"].values())
        assert report["samples"]["dropped"] == sum(report["drops"].values())
        assert all(isinstance(v, int) and v > 0 for v in report["drops"].values())
        assert (report["shards"]["committed"], report["shards"]["failed"]) == (shards, 0)

    # The cache holds exactly what the reports say was written, bucket by bucket (the families' buckets differ),
    # and is sealed.
    reader = CacheReader(o["cache"])
    with open(o["producer_report_edit"]) as f:
        edit_report = json.load(f)
    edit_shards, edit_per_shard = demo.shard_plan(EDIT_SAMPLES)
    assert edit_report["samples"]["seen"] == edit_shards * edit_per_shard
    assert edit_report["samples"]["seen"] == edit_report["samples"]["written"] + sum(edit_report["drops"].values())
    assert edit_report["tasks"] == {"ti2i": edit_report["samples"]["written"]}
    cache_buckets = {f"{w}x{h}": b["samples"] for (w, h), b in reader.buckets().items()}
    want = {**reports[256]["buckets"], **reports[640]["buckets"]}
    for b, n in edit_report["buckets"].items():  # the edit triplets share the 256p buckets
        want[b] = want.get(b, 0) + n
    assert cache_buckets == want
    assert sum(cache_buckets.values()) == sum(r["samples"]["written"] for r in [*reports.values(), edit_report])
    assert sum(s.num_samples for s in reader.shards() if s.cond_shapes) == edit_report["samples"]["written"]
    assert reader.sealed
    gbs = demo.global_batch_size()
    latent = {name: {latent_size(parse_bucket_name(b)) for b in r["buckets"]} for name, r in reports.items()}
    trainable = {latent_size(wh) for wh, b in reader.buckets().items() if b["samples"] >= gbs}
    assert trainable & latent[256], cache_buckets

    # Training, both stages: one record per step, finite losses, every batch from a bucket of the stage's families
    # (stage 1: 4 samples of a 256p bucket with a whole batch; stage 2 also 640p steps of 1 sample, compute-balanced).
    stage_records = {}
    for stage, steps in (("256p", STEPS), ("mixed", MIXED_STEPS), ("edit", EDIT_STEPS)):
        records = stage_records[stage] = read_stats(o[f"train_{stage}_stats"])
        with open(o[f"train_{stage}_stats"]) as f:
            assert sum(1 for line in f if line.strip()) == steps  # no duplicate or missing steps
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
        assert summary["loss"][stage]["last_loss"] == records[-1]["loss"]
    assert {tuple(r["latent_hw"]) for r in stage_records["256p"]} <= trainable & latent[256]
    assert all(r["samples"] == (4 if tuple(r["latent_hw"]) in latent[256] else 1) for r in stage_records["mixed"])
    assert {tuple(r["latent_hw"]) for r in stage_records["mixed"]} <= latent[256] | latent[640]
    assert "model weights and optimizer state from " + os.path.join(o["checkpoints_256p"], f"iter_{STEPS:07d}") \
        in open(os.path.join(o["logs"], "5_train_mixed.log")).read()
    # Stage 3: the 256p buckets, text-to-image and edit steps (the task per global batch), a source's tokens in each
    # edit step; the held-out loss per task at its end.
    edits = [r for r in stage_records["edit"] if r["task"] == "ti2i"]
    assert {tuple(r["latent_hw"]) for r in stage_records["edit"]} <= latent[256]
    assert all(r["cond_tokens"] > 0 for r in edits) and all(r["cond_tokens"] == 0 for r in stage_records["edit"]
                                                            if r["task"] == "t2i")
    assert "data: tasks: t2i" in open(os.path.join(o["logs"], "6_train_edit.log")).read()
    [last] = summary["validation"]["edit"]
    assert last["step"] == EDIT_STEPS and all(math.isfinite(last[k]) for k in ("val_loss_t2i", "val_loss_ti2i"))

    # Checkpoints of the last steps.
    for stage, steps in (("256p", STEPS), ("mixed", MIXED_STEPS), ("edit", EDIT_STEPS)):
        with open(os.path.join(o[f"checkpoints_{stage}"], "latest")) as f:
            assert f.read().strip() == f"iter_{steps:07d}"
    ckpt = o["checkpoint_latest"]
    assert ckpt == os.path.join(o["checkpoints_edit"], f"iter_{EDIT_STEPS:07d}") and os.listdir(ckpt)

    # The PNG is a real image.
    with Image.open(o["loss_png"]) as im:
        im.verify()
    with Image.open(o["loss_png"]) as im:
        assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300

    # Validation: stage 1 half-way and at the end (images and the held-out loss), stage 2 at its end (the loss);
    # and the sample command's images.
    assert [v["step"] for v in summary["validation"]["256p"]] == [STEPS // 2, STEPS]
    assert [v["step"] for v in summary["validation"]["mixed"]] == [MIXED_STEPS]
    assert all(math.isfinite(v["val_loss"]) and v["val_loss"] > 0 for vs in summary["validation"].values() for v in vs)
    assert o["validation_grid"] == os.path.join(out, "train", "256p", "samples", f"step_{STEPS:06d}.png")
    assert f"Validation grid (stage 1): {o['validation_grid']}" in proc.stdout
    prompts = len(open(os.path.join(REPO, demo.PROMPTS)).read().split("- prompt:")) - 1
    with open(os.path.join(out, "samples", "samples.jsonl")) as f:
        assert len(f.readlines()) == prompts
    with open(os.path.join(out, "samples_edit", "samples.jsonl")) as f:
        assert len(f.readlines()) == len(open(os.path.join(REPO, demo.EDIT_PROMPTS)).read().split("- prompt:")) - 1
    for grid in (o["validation_grid"], o["samples_grid"], o["edit_samples_grid"]):
        with Image.open(grid) as im:
            assert im.format == "PNG" and im.size[0] >= 2 * 192

    # Re-running reuses every finished stage (only the plot is redrawn) and changes nothing.
    stats_before = [open(o[f"train_{stage}_stats"]).read() for stage in ("256p", "mixed", "edit")]
    run_demo(out, timeout=120)
    with open(os.path.join(out, demo.SUMMARY_FILE)) as f:
        again = json.load(f)
    assert {s["name"]: s["status"] for s in again["stages"]} == {
        "encoders": "reused", "shards": "reused", "producer": "reused", "train_256p": "reused",
        "train_mixed": "reused", "train_edit": "reused", "sample": "reused", "plot": "ran"}
    assert [open(o[f"train_{stage}_stats"]).read() for stage in ("256p", "mixed", "edit")] == stats_before


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
    for argv, key in ((["--steps", "0"], "--steps"), (["--mixed-steps", "0"], "--mixed-steps"),
                      (["--samples", "3"], "--samples")):
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
    [s] = plot_loss(str(p), str(png))
    assert s["steps"] == 10 and s["last_loss"] == 0.2
    with Image.open(png) as im:
        assert im.format == "PNG"
    assert not list((tmp_path / "plots").glob("*.tmp*"))


def test_plot_loss_draws_the_stages_of_a_curriculum_in_one_png(tmp_path):
    paths = []
    for name, hw, steps in (("256p", [32, 32], 6), ("mixed", [80, 80], 4)):
        (tmp_path / name).mkdir()
        paths.append(str(tmp_path / name / "stats.jsonl"))
        _write_stats(paths[-1], [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "latent_hw": hw} for s in range(1, steps + 1)])
    png = str(tmp_path / "loss.png")
    first, second = plot_loss(paths, png)
    assert (first["steps"], second["steps"], second["last_loss"]) == (6, 4, 0.25)
    with Image.open(png) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="1 labels for 2 stats files"):
        plot_loss(paths, png, labels=["one"])
    from launch.plot import main
    assert main([*paths, "--out", png, "--labels", "stage 1", "stage 2"]) == 0
