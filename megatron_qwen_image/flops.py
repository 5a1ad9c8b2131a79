"""FLOP counts of the Qwen-Image MMDiT: what MFU and HFU divide by. Pure arithmetic, no torch.

Model FLOPs count the matrix multiplications the model needs, on valid tokens only:
  per block and sample, forward
    linear     2 * S * (3h*h + h*h + 2*h*ffn)   q/k/v, attention out, MLP up and down; each token passes its own
                                                stream's weights only, so S counts image + valid text once
                                                (= 2 * S * 12h^2 at ffn = 4h)
    attention  4 * S^2 * h                      Q K^T and P V over the joint [text, image] sequence
    modulation 2 streams * 2 * h * 6h           img_mod / txt_mod act on one vector per sample, not per token
  training = 3 x forward (backward = 2 x forward: gradients w.r.t. activations and w.r.t. weights).
Hardware FLOPs (HFU) add the forward work that activation recompute repeats: a whole block's forward for full
recompute; for selective, the recomputed modules' matmuls (core_attn: attention, mlp: the MLPs; layernorm has
no matmul). Padding tokens and elementwise work (norms, RoPE, GELU, softmax) count in neither.

6 * params * tokens is NOT used: the modulation weights (a third of the parameters) see one vector per sample,
and attention's S^2 term has no parameters, so it misstates this model's work (`six_p_t_ratio` says by how much).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

TRAIN_FACTOR = 3            # forward + backward (2 x forward)
TIMESTEP_FREQ_DIM = 256     # the sinusoidal timestep embedding's width (TimestepEmbedding.FREQ_DIM)
MODULATION_CHUNKS = 6       # shift, scale, gate for the attention half and the MLP half
VAE_FACTOR = 8              # pixels per latent


@dataclass(frozen=True)
class ModelDims:
    """The shapes FLOPs depend on (the released model's by default)."""
    hidden: int = 3072
    ffn: int = 12288
    heads: int = 24
    text_dim: int = 3584        # joint_attention_dim: Qwen2.5-VL features
    in_channels: int = 64       # 16 latent channels packed 2x2
    patch: int = 2

    @classmethod
    def from_model_section(cls, model) -> "ModelDims":
        """From a TrainConfig's `model` section (consumer.config.ModelSection)."""
        return cls(hidden=model.hidden_size, ffn=model.ffn_hidden_size or 4 * model.hidden_size,
                   heads=model.num_attention_heads, text_dim=model.joint_attention_dim,
                   in_channels=model.in_channels, patch=model.patch_size)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def image_tokens(height: int, width: int, dims: ModelDims = ModelDims()) -> int:
    """Image tokens of an H x W picture: (H / 16) * (W / 16) with the VAE's 8 and 2x2 packing."""
    f = VAE_FACTOR * dims.patch
    if height % f or width % f:
        raise ValueError(f"{height}x{width} is not divisible by {f}")
    return (height // f) * (width // f)


@dataclass(frozen=True)
class BlockForwardFlops:
    """One block's forward FLOPs for one sample."""
    linear: int
    attention: int
    modulation: int

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.modulation


def linear_flops(tokens: int, dims: ModelDims) -> int:
    """q/k/v (h -> 3h), attention out (h -> h), MLP up (h -> ffn) and down (ffn -> h) for `tokens` tokens."""
    h = dims.hidden
    return 2 * tokens * (3 * h * h + h * h + 2 * h * dims.ffn)


def mlp_flops(tokens: int, dims: ModelDims) -> int:
    return 2 * tokens * 2 * dims.hidden * dims.ffn


def attention_flops(seq: int, dims: ModelDims, batch: int = 1) -> int:
    """Q K^T and P V (2 * S^2 * h each) over a joint sequence of `seq` tokens, `batch` samples."""
    return batch * 4 * seq * seq * dims.hidden


def modulation_flops(dims: ModelDims) -> int:
    """img_mod + txt_mod of one block, once per sample: 2 streams x 2 * h * 6h."""
    h = dims.hidden
    return 2 * 2 * h * MODULATION_CHUNKS * h


def block_forward_flops(seq: int, dims: ModelDims) -> BlockForwardFlops:
    """One block's forward for one sample of `seq` valid tokens (image + valid text)."""
    return BlockForwardFlops(linear=linear_flops(seq, dims), attention=attention_flops(seq, dims),
                             modulation=modulation_flops(dims))


def recompute_forward_flops(seq: int, dims: ModelDims, granularity: str | None,
                            modules: Sequence[str] = ()) -> int:
    """Forward FLOPs that activation recompute repeats in backward, per block and sample."""
    if granularity is None:
        return 0
    if granularity == "full":
        return block_forward_flops(seq, dims).total
    if granularity == "selective":
        extra = 0
        if "core_attn" in modules:
            extra += attention_flops(seq, dims)
        if "mlp" in modules:
            extra += mlp_flops(seq, dims)
        return extra  # 'layernorm' recomputes no matmul
    raise ValueError(f"recompute granularity {granularity!r}: expected None, 'selective' or 'full'")


def outside_forward_flops(n_img: int, text_valid: int, dims: ModelDims) -> int:
    """The layers outside the blocks, one sample: img_in, txt_in, proj_out per token; the timestep MLP and
    norm_out's modulation once per sample."""
    h = dims.hidden
    per_token = 2 * n_img * dims.in_channels * h + 2 * text_valid * dims.text_dim * h + 2 * n_img * h * dims.in_channels
    per_sample = 2 * (TIMESTEP_FREQ_DIM * h + h * h) + 2 * h * 2 * h
    return per_token + per_sample


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step (forward + backward) over a micro-batch."""
    forward: int    # model forward FLOPs
    model: int      # TRAIN_FACTOR x forward: what MFU divides
    hardware: int   # model + recomputed forward: what HFU divides

    @property
    def recompute(self) -> int:
        return self.hardware - self.model


def training_step_flops(samples: Sequence[tuple[int, int]], num_layers: int, dims: ModelDims,
                        recompute: str | None = None, recompute_modules: Sequence[str] = (),
                        include_outside: bool = False) -> StepFlops:
    """One forward + backward over `samples`, each (image tokens, valid text tokens), through `num_layers`
    blocks (plus the layers outside the blocks when `include_outside`)."""
    forward = extra = 0
    for n_img, text_valid in samples:
        seq = n_img + text_valid
        forward += num_layers * block_forward_flops(seq, dims).total
        extra += num_layers * recompute_forward_flops(seq, dims, recompute, recompute_modules)
        if include_outside:
            forward += outside_forward_flops(n_img, text_valid, dims)
    model = TRAIN_FACTOR * forward
    return StepFlops(forward=forward, model=model, hardware=model + extra)


def utilisation(flops: float, seconds: float, peak_tflops: float) -> float:
    """Fraction of peak: flops / seconds / peak (MFU for model FLOPs, HFU for hardware FLOPs)."""
    return flops / seconds / (peak_tflops * 1e12)


def gemm_flops(m: int, k: int, n: int) -> int:
    """[m, k] @ [k, n]."""
    return 2 * m * k * n


def parameter_count(dims: ModelDims, num_layers: int) -> int:
    """Parameters of the MMDiT (weights and biases; equals consumer.planner's count of the built model)."""
    h, f, c = dims.hidden, dims.ffn, dims.in_channels
    block = (2 * (h * MODULATION_CHUNKS * h + MODULATION_CHUNKS * h)   # img_mod, txt_mod
             + 2 * (h * 3 * h + 3 * h)                                  # img_qkv, txt_qkv
             + 4 * dims.head_dim                                        # q/k RMSNorm weights, both streams
             + 2 * (h * h + h)                                          # img_proj, txt_proj
             + 2 * (h * f + f + f * h + h))                             # img_mlp, txt_mlp
    outside = ((TIMESTEP_FREQ_DIM * h + h) + (h * h + h)               # time_embed linear_1, linear_2
               + dims.text_dim                                          # txt_norm
               + (c * h + h) + (dims.text_dim * h + h)                  # img_in, txt_in
               + (h * 2 * h + 2 * h)                                    # norm_out
               + (h * c + c))                                           # proj_out
    return num_layers * block + outside


def six_p_t_ratio(dims: ModelDims, num_layers: int, n_img: int, text_valid: int) -> float:
    """How far 6 * params * tokens would misstate one sample's training FLOPs (>1: overstates)."""
    model = training_step_flops([(n_img, text_valid)], num_layers, dims, include_outside=True).model
    return 6 * parameter_count(dims, num_layers) * (n_img + text_valid) / model
