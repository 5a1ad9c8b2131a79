"""The curriculum end to end with the tiny stage configs (configs/tiny/, docs/curriculum.md): 256p -> 640p -> 1328p
-> joint 640p + 1328p, each stage started from the previous stage's last checkpoint with its optimizer state, all on
one cache that holds the three bucket families (synthetic latents at the families' real bucket sizes), on 2 CPU
processes at TP=2. Every tiny stage config is the real stage config with the tiny model and small batches put over
it, so this runs the stages' own data selection, balanced batching and hand-off."""
import json

import pytest

from tests.support.caches import write_unit
from tests.torchrun import torchrun

pytestmark = pytest.mark.slow

# stage config, steps, the latent (h, w) its batches may have -> samples per step
STAGES = [
    ("stage_256p", 1, {(32, 32): 4}),
    ("stage_640p", 1, {(80, 80): 4}),
    ("stage_1328p", 1, {(166, 166): 1}),
    # one epoch: the 640 family's 2 batches of 4 and the 1328 family's 4 batches of 1 (compute-balanced) make 6
    # steps, of which 70 % = 4 come from the 640 family (its 2 batches, each twice) and 30 % = 2 from the 1328 family
    ("stage_multiscale_640_1328", 6, {(80, 80): 4, (166, 166): 1}),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum") / "cache"
    for unit, (side, n, family) in enumerate([(256, 8, 256), (640, 8, 640), (1328, 4, 1328)]):
        write_unit(root, unit, [side, side], n=n, base_resolution=family)
    return str(root)


def test_every_stage_trains_its_families_from_the_previous_stages_checkpoint(cache, tmp_path):
    previous = None
    for name, steps, batches in STAGES:
        save, jsonl = tmp_path / name, tmp_path / f"{name}.jsonl"
        args = ["-m", "consumer.train", "--config", f"configs/tiny/{name}.yaml", "--cache-dir", cache,
                f"train.train_iters={steps}", "schedule.lr_warmup_iters=0", "--save", str(save),
                "--log-jsonl", str(jsonl)]
        if previous:
            args += ["--pretrained", previous, "--pretrained-optimizer"]
        out = torchrun(2, args, timeout=300)
        started = (f"model weights and optimizer state from {previous} (schedule, step and data fresh)" if previous
                   else "from scratch")
        assert started in out, out[-3000:]
        records = [json.loads(line) for line in open(jsonl)]
        assert [r["step"] for r in records] == list(range(1, steps + 1)), name
        taken = {tuple(r["latent_hw"]): r["samples"] for r in records}
        assert taken == batches, (name, taken)
        if name.startswith("stage_multiscale"):
            assert [tuple(r["latent_hw"]) for r in records].count((80, 80)) == 4
        assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records), records  # finite
        previous = str(save / f"iter_{steps:07d}")
