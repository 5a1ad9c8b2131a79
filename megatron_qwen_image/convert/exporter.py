"""export-diffusers: a megatron-qwen-image checkpoint (trained or imported) -> a diffusers directory that
`QwenImageTransformer2DModel.from_pretrained` loads (config.json + sharded safetensors + index).

Reads the checkpoint's model tensors one at a time (global tensors: the TP/DP layout the checkpoint was
saved at does not matter), turns each into its diffusers tensor(s) (renames; fused q/k/v split per head)
and streams them into safetensors shards whose headers are planned from the shapes first. The optimizer
state in a training checkpoint is not read.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

import torch

from megatron_qwen_image import checkpoint_format
from megatron_qwen_image.model.diffusers_mapping import (DIFFUSERS_CLASS_NAME, config_from_diffusers,
                                                         megatron_shapes, tensor_mappings_for)

from .diffusers_dir import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, ConversionError, shard_file_name
from .streaming import (DcpTensorReader, SafetensorsEntry, keep_freed_tensors_out_of_the_heap, nbytes,
                        write_safetensors)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _load_common(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "common.pt")
    if not os.path.isfile(path):
        raise ConversionError(f"{ckpt_dir}: no common.pt (not a megatron dist checkpoint)")
    common = torch.load(path, map_location="cpu", weights_only=True)
    if common.get("format") != checkpoint_format.FORMAT:
        raise ConversionError(f"{ckpt_dir}: not a megatron-qwen-image checkpoint (format={common.get('format')!r})")
    return common


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes (powers of 1024, like diffusers' max_shard_size)."""
    t = text.strip().upper()
    for suffix, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 2**30), ("MB", 2**20),
                         ("KB", 2**10), ("B", 1)):
        if t.endswith(suffix):
            return int(float(t[:-len(suffix)]) * mult)
    return int(t)


def export_diffusers(src: str, dst: str, dtype: Optional[torch.dtype] = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> str:
    """Write the diffusers directory `dst` from the checkpoint `src` (a checkpoint directory, or a root
    whose `latest` names one). `dtype`: cast (default: the stored dtype). Returns `dst`."""
    keep_freed_tensors_out_of_the_heap()
    t0 = time.perf_counter()
    ckpt = checkpoint_format.resolve(src) if os.path.isdir(src) else None
    if ckpt is None:
        raise ConversionError(f"--src {src}: no complete checkpoint there")
    common = _load_common(ckpt)
    dconfig = common.get("diffusers_config")
    if not dconfig:
        raise ConversionError(f"{ckpt}: the checkpoint does not record its diffusers config (model shape)")
    config = config_from_diffusers(dconfig, perform_initialization=False, use_cpu_initialization=True)
    reader = DcpTensorReader(ckpt)
    stored = reader.tensor_keys()
    shapes = megatron_shapes(config)
    mappings = tensor_mappings_for(config)
    missing = [mp.megatron for mp in mappings if mp.megatron not in stored]
    wrong = [f"{mp.megatron}: {stored[mp.megatron][0]} vs {tuple(shapes[mp.megatron])}" for mp in mappings
             if mp.megatron in stored and tuple(stored[mp.megatron][0]) != tuple(shapes[mp.megatron])]
    if missing or wrong:
        raise ConversionError(f"{ckpt}: model tensors do not match its config: missing {missing[:8]}, "
                              f"mismatched shapes {wrong[:8]}")

    # Plan: diffusers tensors in diffusers' order, grouped into shards of at most max_shard_bytes.
    plan: List[SafetensorsEntry] = []
    source_of: Dict[str, object] = {}
    for mp in mappings:
        out_dtype = dtype or stored[mp.megatron][1]
        for name, t in mp.to_diffusers(torch.empty(shapes[mp.megatron], device="meta")).items():
            plan.append(SafetensorsEntry(name, tuple(t.shape), out_dtype))
            source_of[name] = mp
    shards: List[List[SafetensorsEntry]] = [[]]
    size = 0
    for e in plan:
        n = nbytes(e.shape, e.dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n

    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ConversionError(f"--dst {dst} exists and is not an empty directory; choose a new path")
    os.makedirs(dst, exist_ok=True)

    cache = {"mp": None, "tensors": {}}

    def produce(name: str) -> torch.Tensor:
        mp = source_of[name]
        if cache["mp"] is not mp:  # one megatron tensor -> its 1 or 3 diffusers tensors, consumed in order
            cache["tensors"] = {}
            full = reader.read(mp.megatron)
            cache["mp"], cache["tensors"] = mp, mp.to_diffusers(full)
            del full
        t = cache["tensors"].pop(name)
        return t.to(dtype) if dtype is not None else t

    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        file = WEIGHTS_NAME if len(shards) == 1 else shard_file_name(i, len(shards))
        total += write_safetensors(os.path.join(dst, file), shard, produce, metadata={"format": "pt"})
        weight_map.update({e.name: file for e in shard})
        if progress:
            print(f"[convert] export wrote {file} ({i}/{len(shards)}) | {time.perf_counter() - t0:.0f}s", flush=True)
    if len(shards) > 1:
        with open(os.path.join(dst, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": sum(nbytes(e.shape, e.dtype) for e in plan)},
                       "weight_map": weight_map}, f, indent=2)
    out_config = {"_class_name": DIFFUSERS_CLASS_NAME, **_diffusers_version(),
                  **{k: v for k, v in dconfig.items() if not k.startswith("_")}}
    with open(os.path.join(dst, CONFIG_NAME), "w") as f:
        json.dump(out_config, f, indent=2)
    if progress:
        print(f"[convert] exported {ckpt} -> {dst} ({len(plan)} tensors, {total / 2**20:.1f} MiB, "
              f"{len(shards)} file(s)) in {time.perf_counter() - t0:.1f}s", flush=True)
    return dst


def _diffusers_version() -> dict:
    try:
        import diffusers

        return {"_diffusers_version": diffusers.__version__}
    except ImportError:
        return {}
