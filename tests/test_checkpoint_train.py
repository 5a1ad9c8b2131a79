"""Checkpoints in the train loop, on CPU processes (gloo + CPU emulation), with the latent-cache loader:

* exact resume: 8 steps with saves at 2/4/6/8 (keep last 3) vs. load at step 4 + 4 steps: equal losses;
* a run killed in the middle of a save (tests/dist/ckpt_fault_worker.py) resumes from the previous complete
  checkpoint and reproduces the uninterrupted losses;
* SIGTERM (SLURM preemption) during training: a complete checkpoint of the current step, then exit;
* resharding TP=2 -> TP=1, TP=1 -> TP=2 and TP=2xDP=1 -> TP=2xDP=2 (distributed optimizer state included):
  equal model outputs after load, and the continued losses match the uninterrupted TP=2 run (<= 1e-5);
* export-diffusers of a training checkpoint gives a diffusers model with the trained model's outputs.
"""
import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from megatron_qwen_image import checkpoint_format
from tests.support.caches import small_cache
from tests.support.processes import kill_process_group
from tests.torchrun import REPO, torchrun
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

STEPS = 8


def _losses(jsonl):
    return {r["step"]: r["loss"] for r in map(json.loads, open(jsonl))}


def _worker_results(prefix):
    ranks = sorted((json.load(open(p)) for p in glob.glob(f"{prefix}.rank*.json")), key=lambda r: r["rank"])
    probes = None
    if os.path.exists(f"{prefix}.probes.safetensors"):
        from safetensors.torch import load_file

        probes = load_file(f"{prefix}.probes.safetensors")
    return ranks, probes


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The uninterrupted reference: TP=2 (2 processes), 8 steps, saves every 2 steps, keeps the last 3; with
    --load of the --save root, which does not exist yet (the requeue idiom's first run)."""
    tmp = tmp_path_factory.mktemp("ckpt_train")
    cache = small_cache(tmp / "cache")
    common = [f"train.train_iters={STEPS}", "data.source=cache", f"data.cache_dir={cache}", "train.seed=21"]
    root, jsonl = tmp / "ref", tmp / "ref.jsonl"
    out = torchrun(2, ["-m", "consumer.train", "--config", "configs/smoke_tp2.yaml", *common, "--save", str(root),
                       "--save-interval", "2", "--keep-last", "3", "--load", str(root), "--log-jsonl", str(jsonl)],
                   timeout=300)
    return {"tmp": tmp, "common": common, "root": root, "losses": _losses(jsonl), "out": out}


def _worker(run, name, nproc, *args, stop_at=None):
    prefix = str(run["tmp"] / name)
    extra = ["--stop-at", str(stop_at)] if stop_at else []
    torchrun(nproc, ["tests/dist/ckpt_worker.py", "--out", prefix, *extra, *run["common"],
                     f"logging.log_jsonl={run['tmp'] / (name + '.jsonl')}", *args], timeout=400)
    return _worker_results(prefix)


def test_saves_keep_last_and_move_latest(run):
    root = run["root"]
    assert [s for s, _ in checkpoint_format.complete_iterations(str(root))] == [4, 6, 8]  # keep_last=3 pruned step 2
    assert open(root / "latest").read().strip() == "iter_0000008"
    assert checkpoint_format.resolve(str(root)) == str(root / "iter_0000008")
    marker = checkpoint_format.read_marker(str(root / "iter_0000004"))
    assert marker["step"] == 4 and marker["tp"] == 2 and marker["dp"] == 1 and marker["consumed_samples"] == 16
    assert sorted(run["losses"]) == list(range(1, STEPS + 1))
    assert "| from scratch (no checkpoint loaded)" in run["out"]  # the start-up banner


@pytest.fixture(scope="module")
def exact(run):
    """Resume the reference's step-4 checkpoint at the same layout (TP=2) through the worker, which also
    records the model's output on fixed inputs right after the load (the reference for the other layouts)."""
    ranks, probes = _worker(run, "exact", 2, f"checkpoint.load={run['root'] / 'iter_0000004'}")
    return {"ranks": ranks, "probe_step4": probes["load"]}


def test_resume_reproduces_the_uninterrupted_losses(run, exact):
    """Load step 4 (model, distributed optimizer, LR schedule, RNG, cache-loader position) and train 4 more."""
    r0, r1 = exact["ranks"]
    assert r0["loaded_step"] == 4 and (r0["tp"], r0["dp"]) == (2, 1)
    resumed = {int(k): v for k, v in r0["losses"].items()}
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, loss in resumed.items():
        assert abs(loss - run["losses"][step]) <= 1e-6, (step, loss, run["losses"][step])
    assert r0["losses"] == r1["losses"]


def test_kill_during_save_resumes_from_previous_checkpoint(run):
    root = run["tmp"] / "killed"
    args = ["--config", "configs/smoke_tp2.yaml", *run["common"], "--save", str(root), "--save-interval", "2",
            "--load", str(root)]
    with pytest.raises(AssertionError) as err:  # every rank SIGKILLs itself after writing its shard files
        torchrun(2, ["tests/dist/ckpt_fault_worker.py", "--fault", "shards-written@4", *args,
                     "--log-jsonl", str(run["tmp"] / "killed1.jsonl")], timeout=300)
    assert "killing itself during the save" in str(err.value)
    assert open(root / "latest").read().strip() == "iter_0000002"
    partial = root / "iter_0000004"
    assert glob.glob(str(partial / "*.distcp")) and not checkpoint_format.is_complete(str(partial))
    assert checkpoint_format.resolve(str(root)) == str(root / "iter_0000002")

    out = torchrun(2, ["-m", "consumer.train", *args, "--log-jsonl", str(run["tmp"] / "killed2.jsonl")], timeout=300)
    assert f"| resuming {root / 'iter_0000002'}" in out and "resumed from" in out  # the banner, then the load
    resumed = _losses(run["tmp"] / "killed2.jsonl")
    assert sorted(resumed) == list(range(3, STEPS + 1))
    for step, loss in resumed.items():
        assert abs(loss - run["losses"][step]) <= 1e-6, (step, loss, run["losses"][step])
    assert [s for s, _ in checkpoint_format.complete_iterations(str(root))] == [2, 4, 6, 8]
    assert not checkpoint_format.incomplete_iterations(str(root))


def test_sigterm_saves_a_checkpoint_and_exits(run):
    """SLURM preemption: SIGTERM to every process of the job step (torchrun and its workers)."""
    root, jsonl = run["tmp"] / "preempted", run["tmp"] / "preempted.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "consumer.train", "--config", "configs/smoke_tp2.yaml",
           *[c for c in run["common"] if not c.startswith("train.train_iters")], "train.train_iters=1000",
           "--save", str(root), "--log-jsonl", str(jsonl)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    log = run["tmp"] / "preempted.log"
    with open(log, "w") as log_file:  # a file, not a pipe: readable while it runs, and nothing blocks on it
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def trained_three_steps():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before 3 steps:\n{log.read_text()[-5000:]}"
        return jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3

    try:
        wait_for(trained_three_steps, 240, "3 logged training steps", lambda: log.read_text()[-5000:])
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        kill_process_group(proc)
    out = log.read_text()
    steps = sorted(_losses(jsonl))
    assert "SIGTERM received" in out and "stopping after step" in out, out[-5000:]
    saved = checkpoint_format.resolve(str(root))
    assert saved is not None, out[-5000:]
    assert checkpoint_format.read_marker(saved)["step"] == steps[-1] < 1000
    # the workers exited cleanly (torchrun itself reports the SIGTERM it got with a traceback of its own)
    assert "checkpointing.py\", line" not in out and "consumer/train.py\", line" not in out, out[-5000:]


def test_reshard_tp2_to_tp1_and_back_to_tp2(run, exact):
    """TP=2 step-4 checkpoint -> TP=1 (1 process): same outputs, steps 5-6, save at 6 -> TP=2: steps 7-8.
    The reference saves with sequence parallelism (configs/smoke_tp2.yaml), TP=1 runs without it, and the
    TP=2 run loads the TP=1 checkpoint with it again: SP changes no parameter and no checkpoint."""
    tp1_root = run["tmp"] / "tp1"
    (r,), probes = _worker(run, "tp1", 1, "parallelism.tensor_model_parallel_size=1", "parallelism.sequence_parallel=false",
                           f"checkpoint.load={run['root'] / 'iter_0000004'}",
                           f"checkpoint.save={tp1_root}", "checkpoint.save_interval=2", stop_at=6)
    assert r["loaded_step"] == 4 and (r["tp"], r["dp"]) == (1, 1)
    assert _rel(probes["load"], exact["probe_step4"]) <= 1e-5
    for step, loss in r["losses"].items():
        assert abs(loss - run["losses"][int(step)]) <= 1e-5 * abs(run["losses"][int(step)]), step
    assert sorted(int(s) for s in r["losses"]) == [5, 6]

    (r0, _), probes2 = _worker(run, "tp1to2", 2, f"checkpoint.load={tp1_root}")
    assert r0["loaded_step"] == 6 and (r0["tp"], r0["dp"]) == (2, 1)
    assert _rel(probes2["load"], probes["save@6"]) <= 1e-5
    assert sorted(int(s) for s in r0["losses"]) == [7, 8]
    for step, loss in r0["losses"].items():
        assert abs(loss - run["losses"][int(step)]) <= 1e-5 * abs(run["losses"][int(step)]), step


def test_reshard_tp2dp1_to_tp2dp2_with_distributed_optimizer(run, exact):
    """And TP=2 without sequence parallelism from the SP checkpoint. At DP=2 both communication overlaps are
    on (automatic); with overlap_param_gather each DP rank holds only its shard of a step's update until the
    next forward, so the step-6 save must all-gather first: its model tensors equal those of the reference's
    step-6 checkpoint (DP=1, no overlap)."""
    from megatron_qwen_image.convert.streaming import DcpTensorReader

    dp2_root = run["tmp"] / "dp2_saved"
    ranks, probes = _worker(run, "dp2", 4, "parallelism.sequence_parallel=false", f"checkpoint.load={run['root'] / 'iter_0000004'}",
                            f"checkpoint.save={dp2_root}", "checkpoint.save_interval=2", stop_at=6)
    assert len(ranks) == 4 and all((r["tp"], r["dp"]) == (2, 2) and r["loaded_step"] == 4 for r in ranks)
    assert all(r["overlap"] == [True, True] for r in ranks)
    assert _rel(probes["load"], exact["probe_step4"]) <= 1e-5
    for step, loss in ranks[0]["losses"].items():
        assert abs(loss - run["losses"][int(step)]) <= 1e-5 * abs(run["losses"][int(step)]), step
    assert sorted(int(s) for s in ranks[0]["losses"]) == [5, 6]

    saved, ref = DcpTensorReader(str(dp2_root / "iter_0000006")), DcpTensorReader(str(run["root"] / "iter_0000006"))
    names = [k for k in ref.tensor_keys() if not k.startswith(("optimizer", "rng"))]
    assert len(names) > 20 and set(names) <= set(saved.tensor_keys())
    worst = max(_rel(saved.read(k), ref.read(k)) for k in names)
    print(f"step-6 model tensors, TP2xDP2 with overlap vs TP2xDP1 reference: max relative difference {worst:.1e}")
    assert worst <= 1e-5, worst


def test_export_of_a_training_checkpoint_loads_in_diffusers(run, exact):
    """export-diffusers of the TP=2 step-4 checkpoint: diffusers' model gives the probe output of our model."""
    from diffusers import QwenImageTransformer2DModel

    from megatron_qwen_image.convert.exporter import export_diffusers
    from tests.reference_models import diffusers_forward, make_inputs

    out = run["tmp"] / "exported"
    export_diffusers(str(run["root"] / "iter_0000004"), str(out), progress=False)
    model = QwenImageTransformer2DModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        ref = diffusers_forward(model, make_inputs(2, 4, 6, [7, 3], seed=11))
    assert _rel(exact["probe_step4"], ref) <= 1e-5
