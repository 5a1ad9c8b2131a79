"""A diffusers QwenImageTransformer2DModel directory, as released: config.json + safetensors weights
(one `diffusion_pytorch_model.safetensors`, or shards listed by `diffusion_pytorch_model.safetensors.index.json`).

`DiffusersTransformerDir(path)` reads the config and every tensor's name/shape/dtype from the safetensors
headers (no tensor data), and checks them against the shapes the config implies, so that a wrong directory
fails at once with a message naming the file, key or shape. `read(name)` then loads one tensor.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from megatron_qwen_image.model.diffusers_mapping import DIFFUSERS_CLASS_NAME

from .streaming import read_safetensors_header, read_safetensors_tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class ConversionError(ValueError):
    """The input or the request cannot be converted; the message names the file/key/value at fault."""


def shard_file_name(i: int, n: int) -> str:
    return f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"


class DiffusersTransformerDir:
    def __init__(self, path: str):
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise ConversionError(f"{path}: no such directory")
        # a whole pipeline directory (model_index.json + transformer/): use its transformer
        if (not os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(path, "model_index.json"))
                and os.path.isfile(os.path.join(path, "transformer", CONFIG_NAME))):
            print(f"[convert] {path} is a pipeline directory; using its transformer/ subdirectory", flush=True)
            path = os.path.join(path, "transformer")
        self.path = path
        config_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ConversionError(f"{path} is not a diffusers model directory: no {CONFIG_NAME}")
        try:
            with open(config_path) as f:
                self.config: dict = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{config_path}: not valid JSON ({e})") from None
        cls = self.config.get("_class_name")
        if cls != DIFFUSERS_CLASS_NAME:
            raise ConversionError(f"{path} is not a Qwen-Image transformer: {CONFIG_NAME} has _class_name={cls!r}, "
                                  f"expected {DIFFUSERS_CLASS_NAME!r}")
        self.files = self._weight_files()
        self.tensors: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        self.file_of: Dict[str, str] = {}
        for file in self.files:
            for name, meta in read_safetensors_header(file).items():
                if name in self.tensors:
                    raise ConversionError(f"tensor {name} appears in two weight files ({self.file_of[name]}, {file})")
                self.tensors[name] = meta
                self.file_of[name] = file

    def _weight_files(self) -> List[str]:
        index = os.path.join(self.path, INDEX_NAME)
        single = os.path.join(self.path, WEIGHTS_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index}: no 'weight_map'")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(self.path, f))]
            if missing:
                raise ConversionError(f"{index} lists weight files that do not exist: {missing[:5]}")
            return [os.path.join(self.path, f) for f in files]
        if os.path.isfile(single):
            return [single]
        others = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".ckpt", ".gguf"))]
        raise ConversionError(f"{self.path}: no {WEIGHTS_NAME} or {INDEX_NAME}"
                              + (f" (found {others[:3]}: only safetensors weights are read)" if others else ""))

    def check_shapes(self, expected: Dict[str, Tuple[int, ...]]) -> None:
        """Refuse missing, unexpected or wrongly shaped tensors (listing them)."""
        missing = sorted(set(expected) - set(self.tensors))
        unexpected = sorted(set(self.tensors) - set(expected))
        wrong = [f"{k}: {self.tensors[k][0]} in {os.path.basename(self.file_of[k])}, config implies {expected[k]}"
                 for k in expected if k in self.tensors and tuple(self.tensors[k][0]) != tuple(expected[k])]
        problems = []
        if missing:
            problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            problems.append("mismatched shapes: " + "; ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else ""))
        if problems:
            raise ConversionError(f"{self.path}: weights do not match {CONFIG_NAME} ({len(expected)} tensors "
                                  f"expected): " + " | ".join(problems))

    def read(self, name: str) -> torch.Tensor:
        return read_safetensors_tensor(self.file_of[name], name)

    @property
    def total_bytes(self) -> int:
        from .streaming import nbytes

        return sum(nbytes(s, d) for s, d in self.tensors.values())

    def largest_tensor(self) -> Optional[Tuple[str, int]]:
        from .streaming import nbytes

        if not self.tensors:
            return None
        name = max(self.tensors, key=lambda k: nbytes(*self.tensors[k]))
        return name, nbytes(*self.tensors[name])
