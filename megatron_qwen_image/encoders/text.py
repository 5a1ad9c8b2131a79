"""Qwen2.5-VL text features exactly as diffusers' `QwenImagePipeline.encode_prompt` computes them.

The pipeline (diffusers 0.42.1, pipelines/qwenimage/pipeline_qwenimage.py):
  1. wraps each prompt in PROMPT_TEMPLATE (a system instruction + the prompt as the user turn);
  2. tokenizes the batch with `padding=True, truncation=True, max_length=1024 + drop_idx`;
  3. runs Qwen2.5-VL and takes `hidden_states[-1]` (the last layer after the final RMSNorm);
  4. keeps each prompt's valid (attention-mask) tokens and drops the first `drop_idx` of them —
     the template's system turn and `<|im_start|>user\\n`, 34 tokens with the real Qwen vocabulary;
  5. pads to the batch's longest and cuts at `max_sequence_length` (1024).

We return step 4-5's per-prompt tensors *unpadded* (`[L_i, D]`, L_i <= 1024): the latent cache stores
them without padding and the loader pads per batch. `drop_idx` is computed from the tokenizer (the
length of the template's prefix) rather than hard-coded, and checked to be a stable prefix.

We call the inner `Qwen2_5_VLModel` and read `last_hidden_state`: transformers ties
`hidden_states[-1]` to it, and skipping the LM head avoids a [L, 152064] logits tensor per prompt at
full size. The encoder tests prove equality with the pipeline's own output.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from megatron_qwen_image.encoders.local_dir import TEXT_ENCODER, TOKENIZER, component_dir

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
MAX_TEXT_TOKENS = 1024  # the pipeline's tokenizer_max_length and the cap of encode_prompt's max_sequence_length


def template_drop_index(tokenizer, template: str = PROMPT_TEMPLATE) -> int:
    """Number of leading template tokens the pipeline drops: the tokens of the text before '{}'.

    Raises if the prefix does not tokenize to a stable prefix of a templated prompt (a BPE merge across
    the boundary would make dropping a fixed count wrong).
    """
    if template.count("{}") != 1:
        raise ValueError(f"prompt template must contain exactly one '{{}}', got {template!r}")
    prefix = template.split("{}")[0]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    probe_ids = tokenizer(template.format("A probe prompt 测试 123."), add_special_tokens=False)["input_ids"]
    if probe_ids[: len(prefix_ids)] != prefix_ids:
        raise ValueError("the prompt template's prefix does not tokenize to a stable prefix with this tokenizer; "
                         "cannot compute the number of template tokens to drop")
    return len(prefix_ids)


def load_tokenizer(local_dir: str):
    """The Qwen2 tokenizer from a pipeline repo (`tokenizer/`) or a tokenizer directory; never downloads."""
    return AutoTokenizer.from_pretrained(component_dir(local_dir, TOKENIZER), local_files_only=True)


class QwenTextEncoder:
    """Prompts -> unpadded Qwen2.5-VL features, identical to `QwenImagePipeline.encode_prompt`."""

    def __init__(self, model, tokenizer, template: str = PROMPT_TEMPLATE, max_length: int = MAX_TEXT_TOKENS,
                 batch_size: int = 8):
        if not 0 < max_length <= MAX_TEXT_TOKENS:
            raise ValueError(f"max_length must be in 1..{MAX_TEXT_TOKENS}, got {max_length}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.batch_size = batch_size
        self.drop_idx = template_drop_index(tokenizer, template)

    @classmethod
    def from_pretrained(cls, local_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        **kwargs) -> "QwenTextEncoder":
        """Load from a local HF-layout directory: a Qwen-Image repo (text_encoder/ + tokenizer/) or a model dir."""
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(component_dir(local_dir, TEXT_ENCODER), dtype=dtype,
                                                                   local_files_only=True)
        return cls(model.to(device), load_tokenizer(local_dir), **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens each prompt has after the template prefix is dropped, before the max_length cap (a count over
        max_length is a prompt the encoder would cut)."""
        if not prompts:  # the tokenizer fails on an empty batch
            return []
        ids = self.tokenizer([self.template.format(p) for p in prompts], add_special_tokens=True)["input_ids"]
        return [len(x) - self.drop_idx for x in ids]

    def token_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Feature length each prompt would get (after dropping the template prefix, capped at max_length)."""
        return [min(n, self.max_length) for n in self.token_counts(prompts)]

    @torch.no_grad()
    def encode_batch(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """One forward pass over `prompts` (one padded batch, as the pipeline does)."""
        txt = [self.template.format(p) for p in prompts]
        tokens = self.tokenizer(txt, max_length=MAX_TEXT_TOKENS + self.drop_idx, padding=True, truncation=True,
                                return_tensors="pt").to(self.device)
        out = self.model.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        hidden = out.last_hidden_state
        mask = tokens.attention_mask.bool()
        valid = torch.split(hidden[mask], mask.sum(dim=1).tolist(), dim=0)
        return [v[self.drop_idx:][: self.max_length] for v in valid]

    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Unpadded features `[L_i, hidden]` per prompt, in order, batched `batch_size` at a time."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        out: list[torch.Tensor] = []
        for i in range(0, len(prompts), self.batch_size):
            out.extend(self.encode_batch(prompts[i : i + self.batch_size]))
        return out
