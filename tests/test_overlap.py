"""ddp.overlap_grad_reduce / ddp.overlap_param_gather: their automatic (null) values and refusals, and that
training with both overlaps on gives the same losses and grad norms as with both off (TP=1 x DP=2 on 2 CPU
processes, distributed optimizer, 2 micro-batches of accumulation so the no_sync path runs, buckets small
enough that the tiny model has many: bucket-by-bucket reduce-scatter in backward and chained all-gathers in
the next forward)."""
import glob
import json

import pytest

from consumer.config import load_config, resolve_overlap
from megatron_qwen_image.config import ConfigError
from tests.torchrun import torchrun

TINY = "configs/model/tiny.yaml"
STEPS = 3
COMMON = ["parallelism.tensor_model_parallel_size=1", "optimizer.use_distributed_optimizer=true",
          "train.micro_batch_size=1", "train.global_batch_size=4", f"train.train_iters={STEPS}", "optimizer.lr=3e-3",
          "optimizer.clip_grad=0.5", "optimizer.weight_decay=0.01", "train.seed=7", "ddp.bucket_size=20000",
          "data.synthetic.resolutions=[[32, 48]]", "data.synthetic.text_len=[3, 9]", "logging.log_interval=5"]


def _overlap(overrides, dp):
    cfg = load_config(TINY, overrides)
    ddp = cfg.ddp_config(dp)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather) == resolve_overlap(
        cfg.ddp, cfg.optimizer.use_distributed_optimizer, dp)
    return ddp.overlap_grad_reduce, ddp.overlap_param_gather


def test_automatic_overlap_is_on_with_data_parallelism():
    assert _overlap([], 1) == (False, False)
    assert _overlap([], 2) == (True, True)  # the distributed optimizer is the default
    assert _overlap(["optimizer.use_distributed_optimizer=false"], 2) == (True, False)  # no all-gather to overlap
    assert _overlap(["ddp.overlap_grad_reduce=false"], 4) == (False, False)  # param gather follows megatron's rule
    assert _overlap(["ddp.overlap_param_gather=false"], 2) == (True, False)
    assert _overlap(["ddp.overlap_grad_reduce=true", "ddp.overlap_param_gather=true"], 1) == (True, True)
    assert _overlap(["ddp.overlap_param_gather=true"], 1) == (True, True)  # it needs the grad-reduce overlap


@pytest.mark.parametrize("overrides, message", [
    (["ddp.overlap_param_gather=true", "optimizer.use_distributed_optimizer=false"],
     "true needs optimizer.use_distributed_optimizer=true"),
    (["ddp.overlap_param_gather=true", "ddp.overlap_grad_reduce=false"], "true needs ddp.overlap_grad_reduce"),
])
def test_param_gather_overlap_without_what_it_needs_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(TINY, overrides)
    assert err.value.key == "ddp.overlap_param_gather"


def _run(tmp_path, name, overlap: bool):
    out = str(tmp_path / name)
    flag = "true" if overlap else "false"
    log = torchrun(2, ["tests/dist/train_parity.py", "--out", out, *COMMON, f"ddp.overlap_grad_reduce={flag}",
                       f"ddp.overlap_param_gather={flag}", f"logging.log_jsonl={tmp_path / (name + '.jsonl')}"],
                   timeout=300)
    state = "on" if overlap else "off"
    assert f"overlap grad-reduce {state}, param-gather {state}" in log  # the start-up banner
    ranks = sorted((json.load(open(p)) for p in glob.glob(f"{out}.rank*.json")), key=lambda r: r["rank"])
    assert len(ranks) == 2 and all(len(r["losses"]) == STEPS for r in ranks)
    return ranks


@pytest.mark.slow  # two torchrun launches: ~25 s each on 2 cores
def test_overlapped_communication_trains_exactly_like_the_synchronous_one(tmp_path):
    on, off = _run(tmp_path, "on", True), _run(tmp_path, "off", False)
    assert on[0]["bucket_groups"] >= 8 and off[0]["bucket_groups"] == 1  # without overlap: one bucket
    for a, b in zip(on, off):
        for x, y in zip(a["losses"], b["losses"]):
            assert abs(x - y) <= 1e-6, (a["losses"], b["losses"])
        for x, y in zip(a["grad_norms"], b["grad_norms"]):
            assert abs(x - y) <= 1e-6 * max(1.0, y), (a["grad_norms"], b["grad_norms"])
    assert on[0]["losses"] == on[1]["losses"] and on[0]["losses"][-1] != on[0]["losses"][0]
    worst = max(abs(x - y) for a, b in zip(on, off) for x, y in zip(a["losses"], b["losses"]))
    print(f"losses {off[0]['losses']}; max |overlap on - off| = {worst:.1e}")
