"""torchrun worker for tests/test_model_tp.py: QwenImageMMDiT at TP=world size (gloo, CPU) vs diffusers.

Every rank builds the same tiny random diffusers model (same seed), loads its own TP shard into our model and
runs the parity shapes; writes its measurements to OUT/rank{r}.json for the test to assert on.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.core import parallel_state  # noqa: E402

from consumer.activation_plan import FLASH, activation_plan  # noqa: E402
from consumer.config import load_config  # noqa: E402

from megatron_qwen_image.model.diffusers_mapping import (  # noqa: E402
    diffusers_to_megatron,
    megatron_shapes,
    megatron_to_diffusers,
    parameter_counts,
    tensor_mappings_for,
)
from tests.reference_models import (  # noqa: E402
    EDIT_PARITY_SHAPES,
    PARITY_SHAPES,
    build_tiny_diffusers_transformer,
    diffusers_forward,
    make_edit_inputs,
    make_inputs,
    megatron_from_diffusers,
    rel_max_err,
)
from tests.support.saved_tensors import measure_saved_bytes  # noqa: E402


def grads_of(model):
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def loss_of(out):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return (out * weight).sum()


def train_step(model, inputs):
    out = model(**inputs)
    loss_of(out).backward()
    sum_sequence_parallel_grads(model)
    return out.detach(), grads_of(model)


def sum_sequence_parallel_grads(model):
    """What megatron's finalize_model_grads does for parameters marked `sequence_parallel` (the row-parallel
    biases, added to token shards): all-reduce their gradients over TP. Nothing is marked without SP."""
    if not model.config.sequence_parallel:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def forward_errors(model, diff) -> dict:
    """max relative error of our forward against diffusers' on every parity shape."""
    errors = {}
    for batch, h, w, lens, frames in PARITY_SHAPES:
        inputs = make_inputs(batch, h, w, lens, seed=h * 10 + w, frames=frames)
        with torch.no_grad():
            errors[f"{batch}x{frames}x{h}x{w}-{lens}"] = rel_max_err(model(**inputs), diffusers_forward(diff, inputs))
    return errors


def edit_errors(tp, rank) -> dict:
    """Edit inputs (condition tokens after the target's), without and with zero_cond_t and sequence
    parallelism: the worst forward error over EDIT_PARITY_SHAPES and the worst gradient error on one shape."""
    errors = {}
    for zero_cond_t in (False, True):
        diff = build_tiny_diffusers_transformer(seed=4, zero_cond_t=zero_cond_t)
        ref_out = [diffusers_forward(diff, make_edit_inputs(*shape, seed=i)).detach()
                   for i, shape in enumerate(EDIT_PARITY_SHAPES)]
        inputs = make_edit_inputs(2, (3, 5), [(4, 3)], [7, 3], seed=9)  # 15 + 12 image tokens: SP pads
        diff.train()
        loss_of(diffusers_forward(diff, inputs)).backward()
        ref_grads = diffusers_to_megatron(
            {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in diff.named_parameters()}, tp, rank)
        for sp in (False, True):
            model = megatron_from_diffusers(diff, tp, rank, sequence_parallel=sp)
            with torch.no_grad():
                fwd = [rel_max_err(model.eval()(**make_edit_inputs(*shape, seed=i)), ref_out[i])
                       for i, shape in enumerate(EDIT_PARITY_SHAPES)]
            _, grads = train_step(model.train(), inputs)
            errors[f"zero_cond_t={zero_cond_t},sp={sp}"] = {
                "forward": max(fwd), "grad": max(rel_max_err(grads[n], ref_grads[n]) for n in ref_grads)}
    return errors


RECOMPUTE = {
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "selective-all": dict(recompute_granularity="selective", recompute_modules=["core_attn", "layernorm", "mlp"]),
}


def recompute_errors(diff, tp, rank, inputs, base_out, base_grads, **overrides) -> dict:
    """Per recompute setting, the worst relative difference of output and gradients from the no-recompute run."""
    errors = {}
    for name, recompute in RECOMPUTE.items():
        out, grads = train_step(megatron_from_diffusers(diff, tp, rank, **overrides, **recompute).train(), inputs)
        errors[name] = max([rel_max_err(out, base_out)] + [rel_max_err(grads[n], base_grads[n]) for n in base_grads])
    return errors


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    from megatron_qwen_image import cpu_emulation

    cpu_emulation.apply_if_needed()  # megatron's recompute checkpoint saves CUDA RNG state
    torch.manual_seed(0)
    result = {"rank": rank, "tp": tp}

    # -- forward parity on every shape
    diff = build_tiny_diffusers_transformer(seed=0)
    model = megatron_from_diffusers(diff, tp, rank).eval()
    result["forward_rel_err"] = forward_errors(model, diff)

    # -- sharding of the modulation projections and parameter count of this rank
    hidden = model.config.hidden_size
    result["img_mod_weight_shape"] = list(model.layers[0].img_mod.linear.weight.shape)
    result["txt_mod_weight_shape"] = list(model.layers[0].txt_mod.linear.weight.shape)
    result["mod_params"] = sum(p.numel() for n, p in model.named_parameters() if "_mod." in n)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["params_expected_by_parameter_counts"] = parameter_counts(model.config)["per_rank"]
    result["diffusers_params"] = sum(p.numel() for p in diff.parameters())
    result["diffusers_mod_params"] = sum(p.numel() for n, p in diff.named_parameters() if "_mod." in n)
    result["hidden"] = hidden

    # -- gradients against diffusers' (sharded the same way)
    diff_train = build_tiny_diffusers_transformer(seed=1).train()
    ours_train = megatron_from_diffusers(diff_train, tp, rank).train()
    inputs = make_inputs(2, 4, 6, [7, 3], seed=5)
    loss_of(diffusers_forward(diff_train, inputs)).backward()
    ref_grads = diffusers_to_megatron(
        {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in diff_train.named_parameters()}, tp, rank)
    _, grads = train_step(ours_train, inputs)
    result["grad_rel_err"] = {n: rel_max_err(grads[n], ref_grads[n]) for n in ref_grads}

    # -- recompute at TP>1: same outputs and grads as without
    base_out, base_grads = train_step(megatron_from_diffusers(diff_train, tp, rank).train(), inputs)
    result["recompute_rel_err"] = recompute_errors(diff_train, tp, rank, inputs, base_out, base_grads)

    # -- sequence parallelism: the same outputs (every parity shape) and gradients, with and without recompute
    sp = dict(sequence_parallel=True)
    sp_model = megatron_from_diffusers(diff, tp, rank, **sp).eval()
    result["sp_forward_rel_err"] = forward_errors(sp_model, diff)
    result["sp_marked_params"] = sorted(n for n, p in sp_model.named_parameters() if getattr(p, "sequence_parallel", False))
    _, sp_grads = train_step(megatron_from_diffusers(diff_train, tp, rank, **sp).train(), inputs)
    result["sp_grad_rel_err"] = {n: rel_max_err(sp_grads[n], ref_grads[n]) for n in ref_grads}
    result["sp_recompute_rel_err"] = recompute_errors(diff_train, tp, rank, inputs, base_out, base_grads, **sp)

    # -- editing: condition tokens (and Edit-2511's zero_cond_t) at TP, with and without SP
    result["edit_rel_err"] = edit_errors(tp, rank)

    # -- activation memory: what autograd saves per block, with and without SP, against the planner
    result["activations"] = {}
    h, w, lens = 5, 3, [7, 4]  # 15 image and 7 text tokens: SP pads both streams
    for sp_on in (False, True):
        act_model = megatron_from_diffusers(diff_train, tp, rank, sequence_parallel=sp_on).train()
        act_inputs = {**make_inputs(2, h, w, lens, seed=3), "text_lengths": lens}
        measured = measure_saved_bytes(act_model, lambda: loss_of(act_model(**act_inputs)))
        cfg = load_config(os.path.join("configs", "model", "tiny.yaml"),
                          ["precision.bf16=false", f"parallelism.tensor_model_parallel_size={tp}",
                           f"parallelism.sequence_parallel={str(sp_on).lower()}"])
        plan = activation_plan(cfg, 16 * h, 16 * w, 2, max(lens), tp=tp, sequence_parallel=sp_on, bf16=False,
                               attention_kernel=FLASH, text_lengths=lens)
        result["activations"][f"sp={sp_on}"] = {
            "measured": [measured.per_block[i] for i in sorted(measured.per_block)],
            "planned": plan.per_layer_bytes}

    # -- mapping round trip through every rank's state dict
    rank_sds = [None] * tp
    dist.all_gather_object(rank_sds, {k: v for k, v in model.state_dict().items()})
    back = megatron_to_diffusers(rank_sds)
    ref_sd = diff.state_dict()
    result["round_trip_bit_exact"] = back.keys() == ref_sd.keys() and all(torch.equal(back[k], ref_sd[k])
                                                                          for k in ref_sd)

    # -- what dist_checkpointing will see: every tensor's global shape is the full shape, split over TP
    #    exactly along the mapping's tp_axis (replicated tensors not split)
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    full = megatron_shapes(model.config)
    sharded_sd = model.sharded_state_dict()
    bad = []
    for mp in tensor_mappings_for(model.config):
        st = sharded_sd.get(mp.megatron)
        expected_frag = tuple(tp if a == mp.tp_axis else 1 for a in range(len(full[mp.megatron])))
        if not isinstance(st, ShardedTensor) or tuple(st.global_shape) != full[mp.megatron] \
                or tuple(st.axis_fragmentations) != expected_frag:
            bad.append([mp.megatron, repr(st)])
    result["sharded_state_dict_mismatches"] = bad
    result["sharded_state_dict_tensors"] = sum(isinstance(v, ShardedTensor) for v in sharded_sd.values())
    result["n_tensors"] = len(full)

    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
