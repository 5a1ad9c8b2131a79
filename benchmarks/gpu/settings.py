"""What the GPU benchmark measures: shapes, iteration counts, recompute modes; full-size and --tiny.

Text length (phases d and e): the trainer pads each micro-batch's text to its longest caption (consumer.train
drops columns that are padding for every sample), so a micro-batch of 2 with one 512-token caption and one of
256 gets 512 text columns and a bool key-padding mask. That is the default here: realistic caption lengths
for Qwen-Image prompts (well under the 1,024 maximum), and the mask path SDPA takes whenever captions differ.
FLOPs count the valid tokens only (image + 512, image + 256).

Attention (phase c) uses the sequence lengths the issue names, image + 1,024 text tokens (5,120 at 1024^2,
7,913 at 1328^2); the masked case marks 256 of the 1,024 text tokens valid.

--tiny: the same phases at toy sizes (configs/model/tiny.yaml, 64x64 / 96x96 pixels). It checks the code
(on a GPU in seconds, or with --device cpu where no GPU is), never the figures.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from megatron_qwen_image.flops import VAE_FACTOR, ModelDims, image_tokens

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FULL_MODEL_YAML = os.path.join(REPO, "configs", "model", "qwen_image_20b.yaml")
TINY_MODEL_YAML = os.path.join(REPO, "configs", "model", "tiny.yaml")

# Dense bf16 peak of an H100 / H200 SXM (no sparsity): the MFU denominator unless --peak-tflops says otherwise.
H100_H200_BF16_TFLOPS = 989.0


@dataclass(frozen=True)
class RecomputeMode:
    """One activation-recompute setting, as trainer config overrides."""
    name: str
    granularity: str | None
    modules: tuple[str, ...] = ()

    def overrides(self) -> list[str]:
        if self.granularity == "full":  # whole blocks, one per checkpoint (the 20B config's setting)
            return ["recompute.recompute_granularity=full", "recompute.recompute_method=uniform",
                    "recompute.recompute_num_layers=1", "recompute.recompute_modules=null"]
        base = ["recompute.recompute_method=null", "recompute.recompute_num_layers=null"]
        if self.granularity == "selective":
            return base + ["recompute.recompute_granularity=selective",
                           f"recompute.recompute_modules=[{', '.join(self.modules)}]"]
        return base + ["recompute.recompute_granularity=null", "recompute.recompute_modules=null"]


# selective = megatron's default module list (core_attn: softmax(QK^T)V only)
RECOMPUTE_MODES = (RecomputeMode("none", None), RecomputeMode("selective", "selective", ("core_attn",)),
                   RecomputeMode("full", "full"))
NO_RECOMPUTE = RECOMPUTE_MODES[0]

PHASES = ("smoke", "gemm", "attention", "blocks", "step")


@dataclass(frozen=True)
class Settings:
    """Everything one benchmark run measures."""
    tiny: bool = False
    device: str = "cuda"
    model_yaml: str = FULL_MODEL_YAML
    num_layers: int = 4                      # phases d and e: full-width blocks, not the 60 of the model
    resolutions: tuple = ((1024, 1024), (1328, 1328))
    micro_batch: int = 2
    text_len: int = 512                      # text columns after the trainer's trim (longest caption)
    text_valid: tuple = (512, 256)           # valid text tokens per sample
    attn_text: int = 1024                    # phase c: text columns (the model's maximum)
    attn_text_valid: int = 256               # phase c, masked case: valid text tokens per sample
    step_resolution: tuple = (1328, 1328)    # phase e
    step_recompute: RecomputeMode = NO_RECOMPUTE
    recompute_modes: tuple = RECOMPUTE_MODES
    smoke_steps: int = 3
    warmup: int = 2
    iters: int = 5
    peak_tflops: float = H100_H200_BF16_TFLOPS
    budget_s: float = 280.0
    seed: int = 1234
    phases: tuple = PHASES
    dims: ModelDims = field(default_factory=ModelDims)  # set from model_yaml by the command line (cli.py)

    def model_overrides(self, recompute: RecomputeMode = NO_RECOMPUTE) -> list[str]:
        """Trainer config overrides of phases d and e: num_layers blocks at TP=1, this recompute mode."""
        return [f"model.num_layers={self.num_layers}", "parallelism.tensor_model_parallel_size=1",
                *recompute.overrides()]

    @property
    def bf16(self) -> bool:
        return self.device == "cuda"  # CPU runs are fp32, as the trainer's

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def image_tokens(self, resolution) -> int:
        return image_tokens(*resolution, self.dims)

    def samples(self, resolution) -> list[tuple[int, int]]:
        """(image tokens, valid text tokens) of each sample of a phase d/e micro-batch."""
        return [(self.image_tokens(resolution), v) for v in self.text_valid]

    @property
    def text_lengths(self) -> list[int] | None:
        """Valid text tokens per sample as the model takes them: None when nothing is padded."""
        return None if all(v == self.text_len for v in self.text_valid) else list(self.text_valid)

    def check(self) -> None:
        if len(self.text_valid) != self.micro_batch:
            raise ValueError(f"--text-valid gives {len(self.text_valid)} lengths for a micro-batch of "
                             f"{self.micro_batch}")
        if not all(1 <= v <= self.text_len for v in self.text_valid):
            raise ValueError(f"--text-valid {list(self.text_valid)}: each must be in [1, --text-len={self.text_len}]")
        if not 1 <= self.attn_text_valid <= self.attn_text:
            raise ValueError(f"attention text: {self.attn_text_valid} valid of {self.attn_text}")
        f = VAE_FACTOR * self.dims.patch
        bad = [r for r in (*self.resolutions, self.step_resolution) if len(r) != 2 or r[0] % f or r[1] % f]
        if bad:
            raise ValueError(f"resolutions {bad}: pixel sizes must be HxW, each a multiple of {f}")
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown:
            raise ValueError(f"--phases: unknown {unknown}; choose from {list(PHASES)}")


def tiny_settings(base: Settings) -> Settings:
    """Toy shapes for checking the code: the tiny model (hidden 64, 4 heads, MLP 256) with 4 blocks."""
    return replace(base, tiny=True, model_yaml=TINY_MODEL_YAML, resolutions=((64, 64), (96, 96)),
                   text_len=16, text_valid=tuple(16 if i == 0 else 8 for i in range(base.micro_batch)),
                   attn_text=16, attn_text_valid=4, step_resolution=(96, 96), warmup=1, iters=2)
