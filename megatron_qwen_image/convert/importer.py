"""import-diffusers: a diffusers QwenImageTransformer2DModel directory -> a megatron-qwen-image checkpoint.

The output is one checkpoint directory in megatron-core's torch_dist format holding the model only
(content 'model'): the trainer takes it with `--pretrained DIR` (or `--load DIR`) at any TP that divides
the heads. Tensors are named and laid out as QwenImageMMDiT's sharded_state_dict expects
(megatron_qwen_image.model.diffusers_mapping: renames, and q/k/v fused per head); the tensors split over
TP are stored as `tp` chunks, as a save from `tp` ranks would store them.

Streaming: each of our tensors is produced from its 1 (or 3, for q/k/v) diffusers tensors read from the
safetensors files just before it is written, and released right after; nothing else is held.
"""
from __future__ import annotations

import io
import os
import time
from typing import Optional

import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

from megatron_qwen_image import checkpoint_format
from megatron_qwen_image.model.diffusers_mapping import (DIFFUSERS_CLASS_NAME, EXTRA_STATE_SUFFIX,
                                                         config_from_diffusers, megatron_shapes,
                                                         tensor_mappings_for)

from .diffusers_dir import ConversionError, DiffusersTransformerDir
from .streaming import ObjectEntry, TensorEntry, keep_freed_tensors_out_of_the_heap, write_torch_dist


def expected_diffusers_shapes(config) -> dict:
    """{diffusers name: shape} implied by a QwenImageConfig (computed on the meta device)."""
    shapes = megatron_shapes(config)
    out = {}
    for mp in tensor_mappings_for(config):
        for name, t in mp.to_diffusers(torch.empty(shapes[mp.megatron], device="meta")).items():
            out[name] = tuple(t.shape)
    return out


def extra_state_keys(config) -> list:
    """Keys of the `_extra_state` objects megatron-core's parallel linears add to the sharded state dict:
    one per tensor-parallel linear, i.e. per weight that is split over TP."""
    return [f"{mp.megatron[:-len('.weight')]}.{EXTRA_STATE_SUFFIX}" for mp in tensor_mappings_for(config)
            if mp.megatron.endswith(".weight") and mp.tp_axis is not None]


def _extra_state_payload() -> bytes:
    """What torch_dist stores for a ShardedObject holding None (megatron's linears' empty extra state):
    torch.save of the list of the objects' data, as megatron's strategies/torch.py does."""
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf.getvalue()


def sharded_object_key(key: str) -> str:
    """megatron ShardedObject.unique_key of a replicated object (global shape (1,), offset (0,))."""
    return f"{key}/shard_0_1"


def import_diffusers(src: str, dst: str, tp: int = 1, dtype: Optional[torch.dtype] = None,
                     progress: bool = True) -> str:
    """Convert the diffusers transformer directory `src` into the checkpoint directory `dst` (must not
    exist or be empty). `tp`: the tensor-parallel size to lay the chunks out for (must divide the heads;
    the checkpoint still loads at any valid TP). `dtype`: cast (default: keep the stored dtype).
    Returns `dst`."""
    keep_freed_tensors_out_of_the_heap()
    t0 = time.perf_counter()
    src_dir = DiffusersTransformerDir(src)
    try:
        config = config_from_diffusers(src_dir.config, tensor_model_parallel_size=1, perform_initialization=False,
                                       use_cpu_initialization=True)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{src_dir.path}/config.json: {e}") from None
    heads = config.num_attention_heads
    if tp < 1 or heads % tp:
        raise ConversionError(f"--tp {tp} does not divide num_attention_heads={heads} (heads are split across TP "
                              f"ranks); choose one of {[d for d in range(1, heads + 1) if heads % d == 0]}")
    if config.ffn_hidden_size % tp:
        raise ConversionError(f"--tp {tp} does not divide the MLP width {config.ffn_hidden_size}")
    src_dir.check_shapes(expected_diffusers_shapes(config))

    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ConversionError(f"--dst {dst} exists and is not an empty directory; choose a new path")
    os.makedirs(dst, exist_ok=True)

    shapes = megatron_shapes(config)
    entries = []
    for mp in tensor_mappings_for(config):
        src_dtypes = {src_dir.tensors[n][1] for n in mp.diffusers}
        if len(src_dtypes) != 1:
            raise ConversionError(f"{mp.diffusers}: the fused tensors have different dtypes {src_dtypes}")
        out_dtype = dtype or src_dtypes.pop()

        def produce(mp=mp, out_dtype=out_dtype):
            full = mp.to_megatron([src_dir.read(n) for n in mp.diffusers])
            return full.to(out_dtype)

        entries.append(TensorEntry(mp.megatron, tuple(shapes[mp.megatron]), out_dtype, produce,
                                   split_axis=mp.tp_axis, num_chunks=tp if mp.tp_axis is not None else 1))
    payload = _extra_state_payload()
    objects = [ObjectEntry(sharded_object_key(k), payload) for k in extra_state_keys(config)]

    total_bytes = src_dir.total_bytes
    last = [0.0]

    def report(done, total, key):
        now = time.perf_counter()
        if progress and (now - last[0] > 5 or done == total):
            last[0] = now
            print(f"[convert] import {done}/{total} pieces ({key}) | {now - t0:.0f}s", flush=True)

    write_torch_dist(dst, entries, objects, progress=report)
    _write_common(dst, {
        "format": checkpoint_format.FORMAT, "format_version": checkpoint_format.FORMAT_VERSION, "content": "model",
        "diffusers_config": {"_class_name": DIFFUSERS_CLASS_NAME,
                             **{k: v for k, v in src_dir.config.items() if not k.startswith("_")}},
        "layout": {"tp": tp},
        "source": {"kind": "diffusers", "path": src_dir.path},
    })
    _write_megatron_metadata(dst)
    checkpoint_format.mark_complete(dst, {"content": "model", "source": src_dir.path, "tp": tp,
                                          "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if progress:
        print(f"[convert] imported {src_dir.path} ({len(src_dir.tensors)} tensors, {total_bytes / 2**20:.1f} MiB) "
              f"-> {dst} (torch_dist, chunked for TP={tp}) in {time.perf_counter() - t0:.1f}s", flush=True)
    return dst


def _write_common(dst: str, common: dict) -> None:
    """common.pt as megatron's TorchCommonSaveStrategy writes it (torch.save of a plain dict)."""
    torch.save(common, os.path.join(dst, "common.pt"))


def _write_megatron_metadata(dst: str) -> None:
    save_config(CheckpointingConfig("torch_dist", 1), dst)
