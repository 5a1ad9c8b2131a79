"""QwenImageMMDiT: diffusers' QwenImageTransformer2DModel rebuilt from megatron-core pieces.

forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes) has the same
meaning as diffusers' forward and matches it numerically (fp32, TP=1 and TP>1).

Activation recompute (driven by the config, using megatron.core.tensor_parallel.checkpoint):
- 'full' + 'uniform': the blocks are cut into chunks of recompute_num_layers; each chunk keeps only its
  inputs and recomputes its forward in backward.
- 'full' + 'block': the first recompute_num_layers blocks are checkpointed one by one, the rest are not.
- 'selective': inside every block, recompute the parts named in recompute_modules (default ['core_attn']):
  'core_attn' = SDPA softmax(QK^T)V, 'layernorm' = LayerNorm + adaLN modulate, 'mlp' = both MLPs.
Recompute only runs while autograd records (torch.is_grad_enabled()); in eval/no_grad it is skipped.

Layout: the blocks work sequence-first, [s, b, h], as megatron's own models do. With sequence_parallel
(megatron's meaning, TP > 1) each TP rank holds 1/TP of each stream's tokens between the TP regions: the
per-token LayerNorm/modulate/gate/residual work and its activations are split over the TP group; q/k/v and
MLP-up projections all-gather the tokens, the output and MLP-down projections reduce-scatter them
(sequence.py). The embeddings before the blocks and norm_out/proj_out after them run whole on every rank.
Gradients: the row-parallel biases, added to token shards, are marked `sequence_parallel` by megatron and
all-reduced over TP by finalize_model_grads; the modulation sums its own (layers.AdaLNModulation); every other
replicated parameter sees whole sequences and gets the full gradient on every rank.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from .block import get_qwen_image_block_spec
from .config import QwenImageConfig
from .fused import layer_norm_modulate
from .layers import AdaLNModulation, AdaLNModulationSubmodules, RMSNorm, TimestepEmbedding, replicated_linear
from .rope import QwenMSRoPE, normalize_img_shapes
from .sequence import enter_sequence_parallel, leave_sequence_parallel


def prefix_lengths(mask: torch.Tensor, name: str) -> list[int]:
    """The valid tokens of each row of a [B, L] padding mask (True/1 = valid), as host ints; refuses a mask
    whose valid tokens are not a prefix (every tokenizer pads at the end). Syncs the host only for a device
    mask: read from the loader's CPU mask it costs none."""
    mask = mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]):
        raise ValueError(f"{name} must mark a prefix of valid tokens per sample (padding at the end)")
    return lengths.tolist()


class QwenImageMMDiT(MegatronModule):
    """The Qwen-Image MMDiT. Parameter layout: time_embed.linear_{1,2}, txt_norm, img_in, txt_in,
    layers.{i}.(img_mod|txt_mod).linear, layers.{i}.attention.*, layers.{i}.(img_mlp|txt_mlp).linear_fc{1,2},
    norm_out.linear, proj_out. See diffusers_mapping.py for the name/TP-split correspondence."""

    def __init__(self, config: QwenImageConfig, block_spec: Optional[ModuleSpec] = None):
        super().__init__(config=config)
        self.config: QwenImageConfig = config
        block_spec = block_spec or get_qwen_image_block_spec()
        hidden = config.hidden_size

        self.time_embed = TimestepEmbedding(config)
        self.txt_norm = RMSNorm(config, config.joint_attention_dim, eps=config.layernorm_epsilon)
        self.img_in = replicated_linear(config, config.in_channels, hidden)
        self.txt_in = replicated_linear(config, config.joint_attention_dim, hidden)
        self.rope = QwenMSRoPE(config.axes_dims_rope, config.rope_theta)
        self.layers = torch.nn.ModuleList(
            [build_module(block_spec, config=config, layer_number=i + 1) for i in range(config.num_layers)]
        )
        self.sequence_parallel = config.sequence_parallel and config.tensor_model_parallel_size > 1
        self.norm_out = AdaLNModulation(config, AdaLNModulationSubmodules(), num_chunks=2)  # scale, shift
        self.proj_out = replicated_linear(config, hidden, config.proj_out_channels,
                                          init_method=config.output_layer_init_method)

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's pipeline schedules; this model has no pipeline stages, so only None is valid."""
        tensors = input_tensor if isinstance(input_tensor, (list, tuple)) else [input_tensor]
        if any(t is not None for t in tensors):
            raise ValueError("QwenImageMMDiT does not support pipeline parallelism (got an input tensor)")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """For megatron's dist_checkpointing: every tensor with its TP split (see diffusers_mapping for the axes).

        MegatronModule's default would treat everything under the `layers` ModuleList (not a MegatronModule)
        as replicated; here each block is recursed into so its tensor-parallel linears report their shards.
        """
        sharded = {}
        for name, module in self.named_children():
            children = module if isinstance(module, torch.nn.ModuleList) else [module]
            for i, child in enumerate(children):
                sub_prefix = f"{prefix}{name}.{i}." if isinstance(module, torch.nn.ModuleList) else f"{prefix}{name}."
                sharded.update(sharded_state_dict_default(child, sub_prefix, sharded_offsets, metadata))
        return sharded

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: Optional[torch.Tensor] = None,
        timestep: Optional[torch.Tensor] = None,
        img_shapes=None,
        text_lengths: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """hidden_states [B, N, in_channels] packed latents; encoder_hidden_states [B, L, joint_attention_dim];
        encoder_hidden_states_mask [B, L] (True/1 = valid token) or None; timestep sigma in [0, 1], [B];
        img_shapes: per sample (frames, h, w) in patch units, or a list of them per sample: the target first,
        then the condition images of an edit sample, whose tokens follow the target's in hidden_states
        (diffusers' edit layout: [(1, h, w), (1, ch, cw)]; MSRoPE gives image i frame index i).
        text_lengths: the valid text tokens of each sample as host integers, when the caller knows them (the
        trainer reads them from the CPU mask before the copy): the model then never syncs the host to read the
        mask. None: derived from the mask.
        Returns the prediction [B, N, patch_size**2 * out_channels] for every image token, condition tokens
        included (as diffusers; the edit pipeline and the trainer keep the target's first tokens)."""
        cfg = self.config
        if timestep is None:
            raise ValueError("timestep is required: sigma in [0, 1], shape [B]")
        batch, n_img, channels = hidden_states.shape
        text_len = encoder_hidden_states.shape[1]
        if channels != cfg.in_channels:
            raise ValueError(f"hidden_states has {channels} channels, config.in_channels={cfg.in_channels}")
        if encoder_hidden_states.shape[0] != batch or encoder_hidden_states.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states shape {tuple(encoder_hidden_states.shape)} must be "
                             f"[{batch}, L, joint_attention_dim={cfg.joint_attention_dim}]")
        images = normalize_img_shapes(img_shapes, batch)
        if sum(f * h * w for f, h, w in images) != n_img:
            raise ValueError(f"img_shapes {images} give {sum(f * h * w for f, h, w in images)} image tokens, "
                             f"hidden_states has {n_img}")
        text_lengths = self._text_lengths(encoder_hidden_states_mask, text_lengths, batch, text_len)

        img = self.img_in(hidden_states)
        timestep = timestep.to(img.dtype)  # as diffusers (the sigma is rounded to the compute dtype)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        n_target = images[0][0] * images[0][1] * images[0][2]  # condition images' tokens follow the target's
        if cfg.zero_cond_t and len(images) > 1:
            # Edit-2511: condition tokens are modulated at timestep 0 (one embedding pass for both, as diffusers)
            temb, cond_temb = self.time_embed(torch.cat([timestep, timestep * 0]), img.dtype).chunk(2)
        else:
            temb, cond_temb = self.time_embed(timestep, img.dtype), None
        rope = self.rope(images, text_len, device=img.device)

        # Sequence-first inside the blocks (megatron's [s, b, h]); with SP each TP rank keeps 1/TP of the tokens.
        img, txt = img.transpose(0, 1).contiguous(), txt.transpose(0, 1).contiguous()
        image_split = n_target  # this rank's count of target tokens in its image stream
        if self.sequence_parallel:
            tp = cfg.tensor_model_parallel_size
            img, txt = enter_sequence_parallel(img, tp), enter_sequence_parallel(txt, tp)
            image_split = min(max(n_target - parallel_state.get_tensor_model_parallel_rank() * img.shape[0], 0),
                              img.shape[0])
        tensors = rope if cond_temb is None else (*rope, cond_temb)
        img, txt = self._run_layers(img, txt, temb, tensors, text_lengths, image_split)
        if self.sequence_parallel:
            img = leave_sequence_parallel(img, n_img)
        img = img.transpose(0, 1)

        scale, shift = self.norm_out(temb).chunk(2, dim=-1)
        img = layer_norm_modulate(img, shift[:, None, :], scale[:, None, :], cfg.layernorm_epsilon)
        return self.proj_out(img)

    @staticmethod
    def _text_lengths(text_mask, text_lengths, batch, text_len) -> Optional[list[int]]:
        """Valid text tokens per sample as host ints, or None when nothing is padded (one unmasked attention).
        Valid tokens must come first (the mask is a prefix), as every tokenizer pads."""
        if text_mask is not None and tuple(text_mask.shape) != (batch, text_len):
            raise ValueError(f"encoder_hidden_states_mask shape {tuple(text_mask.shape)} must be "
                             f"[{batch}, {text_len}]")
        if text_lengths is None:
            if text_mask is None:
                return None
            # one host sync for a device mask; the trainer passes the lengths instead
            text_lengths = prefix_lengths(text_mask, "encoder_hidden_states_mask")
        text_lengths = [int(n) for n in text_lengths]
        if len(text_lengths) != batch or not all(0 <= n <= text_len for n in text_lengths):
            raise ValueError(f"text_lengths {text_lengths} must give one length in [0, {text_len}] per sample")
        return None if all(n == text_len for n in text_lengths) else text_lengths

    def _run_layers(self, img, txt, temb, tensors, text_lengths, image_split):
        """`tensors`: the four RoPE tables, then cond_temb when the condition tokens have their own timestep."""
        cfg = self.config
        recompute = cfg.recompute_granularity == "full" and torch.is_grad_enabled()
        n = len(self.layers)

        def run(start, end):
            def forward_chunk(img, txt, temb, *tensors):  # tensors only, for checkpoint; host values closed over
                rope, cond_temb = tensors[:4], (tensors[4] if len(tensors) > 4 else None)
                for layer in self.layers[start:end]:
                    img, txt = layer(img, txt, temb, *rope, text_lengths, cond_temb, image_split)
                return img, txt
            return forward_chunk

        def checkpointed(start, end, img, txt):
            return tensor_parallel.checkpoint(run(start, end), cfg.distribute_saved_activations, img, txt, temb,
                                              *tensors)

        if not recompute:
            return run(0, n)(img, txt, temb, *tensors)
        if cfg.recompute_method == "uniform":
            for start in range(0, n, cfg.recompute_num_layers):
                img, txt = checkpointed(start, min(start + cfg.recompute_num_layers, n), img, txt)
            return img, txt
        # 'block': checkpoint the first recompute_num_layers blocks individually, run the rest normally.
        for i in range(n):
            if i < cfg.recompute_num_layers:
                img, txt = checkpointed(i, i + 1, img, txt)
            else:
                img, txt = run(i, i + 1)(img, txt, temb, *tensors)
        return img, txt
