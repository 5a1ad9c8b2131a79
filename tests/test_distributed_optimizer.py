"""TP=2 x DP=2 with megatron's distributed optimizer and full recompute, on 4 CPU processes (gloo + the CPU
emulation layer), against a plain single-process run of the same model, weights, seeds and global data:
no distributed optimizer, no recompute, TP=1, DP=1 (4 micro-batches of accumulation instead of 2)."""
import glob
import json

import pytest

from consumer.planner import plan_memory
from consumer.config import load_config
from tests.torchrun import torchrun

STEPS = 5
COMMON = ["train.micro_batch_size=1", "train.global_batch_size=4", f"train.train_iters={STEPS}", "optimizer.lr=3e-3", "schedule.lr_warmup_iters=1",
          "schedule.lr_decay_style=cosine", "optimizer.min_lr=3e-4", "optimizer.clip_grad=0.5", "optimizer.weight_decay=0.01", "train.seed=7",
          "data.synthetic.resolutions=[[32, 48]]", "data.synthetic.text_len=[3, 9]", "logging.log_interval=5"]


def _results(prefix):
    return sorted((json.load(open(p)) for p in glob.glob(f"{prefix}.rank*.json")), key=lambda r: r["rank"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run (TP=1, DP=1, no distributed optimizer, no recompute) and its initial weights."""
    tmp = tmp_path_factory.mktemp("reference")
    init, out = str(tmp / "init.safetensors"), str(tmp / "ref")
    torchrun(1, ["tests/dist/train_parity.py", "--out", out, "--save-init", init, *COMMON,
                 "parallelism.tensor_model_parallel_size=1", "optimizer.use_distributed_optimizer=false",
                 f"logging.log_jsonl={tmp / 'ref.jsonl'}"], timeout=300)
    (ref,) = _results(out)
    return init, ref


def _tp2_dp2(tmp_path, init, extra):
    out = str(tmp_path / "par")
    par = ["parallelism.tensor_model_parallel_size=2", "optimizer.use_distributed_optimizer=true", *extra]
    torchrun(4, ["tests/dist/train_parity.py", "--out", out, "--load-init", init, *COMMON, *par,
                 f"logging.log_jsonl={tmp_path / 'par.jsonl'}"], timeout=600)
    return _results(out)


def _assert_same_losses(ranks, ref):
    for r in ranks:
        assert len(r["losses"]) == STEPS
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5, (r["rank"], r["losses"], ref["losses"])
        for a, b in zip(r["grad_norms"], ref["grad_norms"]):
            assert abs(a - b) <= 1e-5 * max(1.0, b), (r["grad_norms"], ref["grad_norms"])
    assert ref["losses"][-1] != ref["losses"][0]  # it trained
    return max(abs(a - b) for r in ranks for a, b in zip(r["losses"], ref["losses"]))


@pytest.mark.slow
def test_tp2_dp2_sequence_parallel_selective_recompute_matches_single_process(tmp_path, reference):
    """Sequence parallelism (tokens split over TP, odd stream lengths padded) with the distributed optimizer and
    selective recompute of every supported part, step for step against the same single-process reference."""
    init, ref = reference
    ranks = _tp2_dp2(tmp_path, init, ["parallelism.sequence_parallel=true", "recompute.recompute_granularity=selective",
                                      "recompute.recompute_modules=[core_attn,layernorm,mlp]"])
    assert len(ranks) == 4
    worst = _assert_same_losses(ranks, ref)
    print(f"reference losses {ref['losses']}; max |TP2xDP2+SP - reference| = {worst:.2e}")


@pytest.mark.slow
def test_tp2_dp2_distributed_optimizer_full_recompute_matches_single_process(tmp_path, reference):
    init, ref = reference
    ranks = _tp2_dp2(tmp_path, init, ["recompute.recompute_granularity=full", "recompute.recompute_method=uniform",
                                      "recompute.recompute_num_layers=1"])
    assert len(ranks) == 4

    # the same global batches, split: TP peers identical, DP ranks disjoint halves of the reference's batch
    for step, ref_keys in enumerate(ref["keys"]):
        by_dp = {r["dp_rank"]: r["keys"][step] for r in ranks}
        assert [r["keys"][step] for r in ranks if r["dp_rank"] == 0] == [by_dp[0]] * 2
        assert [r["keys"][step] for r in ranks if r["dp_rank"] == 1] == [by_dp[1]] * 2
        assert by_dp[0] + by_dp[1] == ref_keys

    # step-for-step equal losses (and grad norms) on every rank
    worst = _assert_same_losses(ranks, ref)
    print(f"reference losses {ref['losses']}; max |TP2xDP2 - reference| = {worst:.2e}")

    # parameters per rank are exactly the dry-run planner's TP split
    cfg = load_config("configs/model/tiny.yaml", COMMON + ["parallelism.tensor_model_parallel_size=2"])
    p = plan_memory(cfg, dp=2, bf16=False)
    assert ref["local_params"] == p.total_params
    assert all(r["local_params"] == p.params_per_rank for r in ranks)

    # optimizer state: the reference holds Adam m+v (8 B) for every parameter; with the distributed optimizer
    # the DP ranks of a TP group hold disjoint shards that add up to exactly their TP shard's m+v, ~1/DP each
    assert ref["optimizer_state_bytes"] == 8 * p.total_params
    for tp_rank in (0, 1):
        group = [r["optimizer_state_bytes"] for r in ranks if r["tp_rank"] == tp_rank]
        assert sum(group) == 8 * p.params_per_rank
        for b in group:
            assert abs(b - 8 * p.params_per_rank / 2) <= 0.05 * 8 * p.params_per_rank / 2, group
        print(f"TP rank {tp_rank}: optimizer state bytes per DP rank {group}, reference {ref['optimizer_state_bytes']}")
