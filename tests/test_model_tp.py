"""QwenImageMMDiT at TP=2 (torchrun, 2 CPU processes, gloo) against diffusers' QwenImageTransformer2DModel.

Each rank loads its TP shard of the same tiny random diffusers weights (tests/dist/model_tp_worker.py) and
reports what it measured; the assertions are here."""
import json

import pytest

from tests.reference_models import PARITY_SHAPES, TINY_DIFFUSERS_CONFIG, build_tiny_diffusers_transformer
from tests.torchrun import torchrun

pytestmark = pytest.mark.slow  # ~30 s on 2 busy cores: two processes importing diffusers + megatron

TP = 2
TOL = 1e-5  # max |ours - diffusers| relative to max |diffusers|, fp32


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_tp")
    torchrun(TP, ["tests/dist/model_tp_worker.py", "--out", str(out)], timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(TP)]


def _replicated_diffusers_params(model) -> int:
    """Parameters every TP rank holds whole (written out here independently of our mapping): everything outside
    the blocks except norm_out, the per-head q/k RMSNorms, and the biases of the row-parallel projections."""
    replicated = ("time_text_embed.", "txt_norm.", "img_in.", "txt_in.", "proj_out.",
                  ".norm_q.", ".norm_k.", ".norm_added_q.", ".norm_added_k.",
                  "attn.to_out.0.bias", "attn.to_add_out.bias", "mlp.net.2.bias")
    return sum(p.numel() for n, p in model.named_parameters() if any(r in n for r in replicated))


def test_tp2_forward_matches_diffusers(ranks):
    for result in ranks:
        assert result["tp"] == TP
        assert len(result["forward_rel_err"]) == len(PARITY_SHAPES)
        for shape, err in result["forward_rel_err"].items():
            assert err <= TOL, (result["rank"], shape, err)


def test_tp2_gradients_match_diffusers(ranks):
    for result in ranks:
        for name, err in result["grad_rel_err"].items():
            assert err <= 1e-4, (result["rank"], name, err)


def test_tp2_sequence_parallel_forward_and_gradients_match_diffusers(ranks):
    """Tokens split over the 2 ranks between the TP regions (odd stream lengths exercise the padding)."""
    for result in ranks:
        assert len(result["sp_forward_rel_err"]) == len(PARITY_SHAPES)
        for shape, err in result["sp_forward_rel_err"].items():
            assert err <= TOL, (result["rank"], shape, err)
        assert len(result["sp_grad_rel_err"]) == len(result["grad_rel_err"])
        for name, err in result["sp_grad_rel_err"].items():
            assert err <= 1e-4, (result["rank"], name, err)
        # the row-parallel biases (attention out-projections, MLP fc2) of every block and nothing else
        layers = TINY_DIFFUSERS_CONFIG["num_layers"]
        expected = sorted(f"layers.{i}.{m}.bias" for i in range(layers)
                          for m in ("attention.img_proj", "attention.txt_proj", "img_mlp.linear_fc2", "txt_mlp.linear_fc2"))
        assert result["sp_marked_params"] == expected


def test_tp2_edit_forward_and_gradients_match_diffusers(ranks):
    """Condition tokens after the target's at TP=2, without and with zero_cond_t (Edit-2511) and sequence
    parallelism (the target/condition boundary then falls inside a rank's token shard)."""
    for result in ranks:
        assert set(result["edit_rel_err"]) == {f"zero_cond_t={zc},sp={sp}" for zc in (False, True)
                                               for sp in (False, True)}
        for case, err in result["edit_rel_err"].items():
            assert err["forward"] <= TOL, (result["rank"], case, err)
            assert err["grad"] <= 1e-4, (result["rank"], case, err)


def test_tp2_activation_plan_matches_what_autograd_saves_with_and_without_sp(ranks):
    """The dry-run planner's per-block activation bytes (consumer.activation_plan) within 10 % of the bytes
    autograd keeps on each TP rank; sequence parallelism keeps less."""
    for result in ranks:
        acts = result["activations"]
        for key in ("sp=False", "sp=True"):
            measured, planned = acts[key]["measured"], acts[key]["planned"]
            assert len(measured) == TINY_DIFFUSERS_CONFIG["num_layers"]
            for got in measured:
                assert abs(planned - got) <= 0.10 * got, (result["rank"], key, planned, measured)
        assert max(acts["sp=True"]["measured"]) < min(acts["sp=False"]["measured"])


def test_tp2_modulation_is_sharded_and_parameter_count(ranks):
    diff = build_tiny_diffusers_transformer(seed=0)
    total = sum(p.numel() for p in diff.parameters())
    replicated = _replicated_diffusers_params(diff)
    hidden = TINY_DIFFUSERS_CONFIG["num_attention_heads"] * TINY_DIFFUSERS_CONFIG["attention_head_dim"]
    for result in ranks:
        assert result["img_mod_weight_shape"] == [6 * hidden // TP, hidden]
        assert result["txt_mod_weight_shape"] == [6 * hidden // TP, hidden]
        assert result["mod_params"] * TP == result["diffusers_mod_params"]
        assert result["params"] == (total - replicated) // TP + replicated
        assert result["params"] == result["params_expected_by_parameter_counts"]


@pytest.mark.parametrize("key,bound", [("recompute_rel_err", 1e-6), ("sp_recompute_rel_err", 1e-5)],
                         ids=["tensor-parallel", "sequence-parallel"])
def test_tp2_recompute_matches_no_recompute(ranks, key, bound):
    for result in ranks:
        assert set(result[key]) == {"full-uniform-1", "selective-all"}
        for name, err in result[key].items():
            assert err <= bound, (result["rank"], name, err)


def test_tp2_state_dicts_round_trip_to_diffusers(ranks):
    assert all(r["round_trip_bit_exact"] for r in ranks)


def test_tp2_sharded_state_dict_for_dist_checkpointing(ranks):
    for result in ranks:
        assert result["sharded_state_dict_mismatches"] == []
        assert result["sharded_state_dict_tensors"] == result["n_tensors"]
