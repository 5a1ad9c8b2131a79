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
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from .block import get_qwen_image_block_spec
from .config import QwenImageConfig
from .layers import AdaLNModulation, AdaLNModulationSubmodules, RMSNorm, TimestepEmbedding, layer_norm_no_affine, \
    replicated_linear
from .rope import QwenMSRoPE, normalize_img_shapes


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
        img_shapes: per sample (frames, h, w) in patch units (or a list of them per sample).
        text_lengths: the valid text tokens of each sample as host integers, when the caller knows them (the
        trainer reads them from the CPU mask before the copy): the model then never syncs the host to read the
        mask. None: derived from the mask.
        Returns the prediction [B, N, patch_size**2 * out_channels]."""
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
        key_mask = self._joint_key_mask(encoder_hidden_states_mask, batch, text_len, n_img, text_lengths)

        img = self.img_in(hidden_states)
        timestep = timestep.to(img.dtype)  # as diffusers (the sigma is rounded to the compute dtype)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        temb = self.time_embed(timestep, img.dtype)
        rope = self.rope(images, text_len, device=img.device)

        img, txt = self._run_layers(img, txt, temb, key_mask, *rope)

        scale, shift = self.norm_out(temb).chunk(2, dim=-1)
        img = layer_norm_no_affine(img, cfg.layernorm_epsilon) * (1 + scale[:, None, :]) + shift[:, None, :]
        return self.proj_out(img)

    @staticmethod
    def _joint_key_mask(text_mask, batch, text_len, n_img, text_lengths=None) -> Optional[torch.Tensor]:
        """[B, L + N] bool key mask over [text, image] (image keys always valid), or None when nothing is
        padded (lets SDPA use its fastest kernel)."""
        if text_mask is None:
            return None
        if tuple(text_mask.shape) != (batch, text_len):
            raise ValueError(f"encoder_hidden_states_mask shape {tuple(text_mask.shape)} must be "
                             f"[{batch}, {text_len}]")
        text_mask = text_mask.to(torch.bool)
        if (all(n == text_len for n in text_lengths) if text_lengths is not None else bool(text_mask.all())):
            return None
        return torch.cat([text_mask, text_mask.new_ones(batch, n_img)], dim=1)

    def _run_layers(self, img, txt, temb, key_mask, *rope):
        cfg = self.config
        recompute = cfg.recompute_granularity == "full" and torch.is_grad_enabled()
        n = len(self.layers)

        def run(start, end):
            def forward_chunk(img, txt, temb, key_mask, *rope):
                for layer in self.layers[start:end]:
                    img, txt = layer(img, txt, temb, key_mask, *rope)
                return img, txt
            return forward_chunk

        def checkpointed(start, end, img, txt):
            return tensor_parallel.checkpoint(run(start, end), cfg.distribute_saved_activations,
                                              img, txt, temb, key_mask, *rope)

        if not recompute:
            return run(0, n)(img, txt, temb, key_mask, *rope)
        if cfg.recompute_method == "uniform":
            for start in range(0, n, cfg.recompute_num_layers):
                img, txt = checkpointed(start, min(start + cfg.recompute_num_layers, n), img, txt)
            return img, txt
        # 'block': checkpoint the first recompute_num_layers blocks individually, run the rest normally.
        for i in range(n):
            if i < cfg.recompute_num_layers:
                img, txt = checkpointed(i, i + 1, img, txt)
            else:
                img, txt = run(i, i + 1)(img, txt, temb, key_mask, *rope)
        return img, txt
