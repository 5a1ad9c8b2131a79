"""Build tiny random encoders locally, in the Hugging Face layout of the released Qwen-Image repo.

    python -m megatron_qwen_image.encoders.make_tiny OUT_DIR [--seed 0]

writes (nothing is downloaded; every file comes from `save_pretrained`, so the same
`from_pretrained` code loads these and the released weights):

    OUT_DIR/model_index.json   diffusers QwenImagePipeline index (QwenImagePipeline.from_pretrained(OUT_DIR) works)
    OUT_DIR/tokenizer/         Qwen2Tokenizer: a byte-level BPE trained here with `tokenizers`, Qwen2's
                               pre-tokenizer regex and the chat special tokens (<|im_start|>, <|im_end|>, ...)
    OUT_DIR/text_encoder/      Qwen2_5_VLForConditionalGeneration, hidden_size 64 (the contract's tiny width)
    OUT_DIR/processor/         the Qwen2-VL processor of the edit pipelines: Qwen2VLImageProcessor (patch 14, merge 2,
                               temporal patch 2 as the tiny vision tower; at most 64 vision tokens an image) + tokenizer
    OUT_DIR/vae/               AutoencoderKLQwenImage, z_dim 16, spatial factor 8 (as released)
    OUT_DIR/transformer/       QwenImageTransformer2DModel at configs/model/tiny.yaml's shape
    OUT_DIR/scheduler/         FlowMatchEulerDiscreteScheduler with Qwen-Image's released settings
    OUT_DIR/clip/              a tiny CLIPModel + tokenizer + image processor for the model-based filter

The tokenizer is trained on the prompt templates' words (among others), so every template word is a
single token as in the real Qwen vocabulary: the template prefixes then tokenize to the same 34 (text-to-image)
and 64 (edit, edit plus) tokens that diffusers hard-codes, which the encoder tests check against the computed
drop indices.

The edit pipelines (QwenImageEditPipeline, QwenImageEditPlusPipeline) are built from these parts in the tests;
there is no model_index.json for them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import diffusers
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessorPil)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from megatron_qwen_image.encoders.edit import EDIT, EDIT_PLUS
from megatron_qwen_image.encoders.text import PROMPT_TEMPLATE
from megatron_qwen_image.flow_matching import RELEASED_SCHEDULER

# Tiny sizes the rest of the project builds on: text features 64 wide (configs/model/tiny.yaml's
# joint_attention_dim), VAE z_dim 16 with spatial factor 8.
TEXT_HIDDEN = 64
Z_DIM = 16

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",  # pad (and unk), as in Qwen2.5-VL
    "<|im_start|>",
    "<|im_end|>",  # eos of the chat model
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2.5-VL chat template (text part), so apply_chat_template works on the tiny tokenizer too.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_EN_WORDS = (
    "a an the of and with on in at to for from by over under near above below left right top bottom "
    "photo picture image poster sign banner card page book cover street shop cafe sky sea mountain city "
    "red orange yellow green blue purple pink white black gray grey brown gold silver light dark bright "
    "large small big tiny round square long short tall wide thin thick soft smooth rough "
    "text letters words title reads says written printed shows showing background foreground center "
    "cat dog bird tree flower car house road river sun moon star cloud rain snow person man woman child "
    "one two three four five six seven eight nine ten lines line font bold serif sans "
    "hello world welcome open closed sale today new old good morning night coffee tea music art "
    "describe color shape size texture quantity spatial relationships objects detailing user assistant system"
).split()

_ZH_TEXT = (
    "你好世界欢迎光临今日特价新品上市早上好晚安咖啡茶音乐艺术书店花园城市山海天空星月"
    "红色蓝色绿色黄色白色黑色一张图片海报上面写着文字标题背景中间左边右边"
)


def _training_corpus() -> list[str]:
    """Text the tiny BPE learns from: the prompt templates many times, English words, Chinese phrases."""
    templates = [PROMPT_TEMPLATE.format(""), EDIT.format("", 1), EDIT_PLUS.format("", 2)]
    lines = [t for t in templates for _ in range(200)]
    words = _EN_WORDS
    for i in range(400):
        n = 4 + i % 9
        lines.append(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(n)).capitalize() + ".")
        lines.append(" " + " ".join(words[(i * 11 + j * 5) % len(words)] for j in range(n)))
    for i in range(0, len(_ZH_TEXT) - 4, 2):
        lines.append(_ZH_TEXT[i : i + 6])
    lines.append("0123456789 .,:;!?\"'()-_/ \n\n\t")
    return lines


def build_tokenizer(out_dir: str, vocab_size: int = 2000):
    """Train a Qwen2-style byte-level BPE locally and save it as a `Qwen2Tokenizer`."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    hf_tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=QWEN_SPECIAL_TOKENS,
        model_max_length=32768,
        errors="replace",
    )
    hf_tok.chat_template = QWEN_CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def build_text_encoder(out_dir: str, tokenizer, seed: int):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width) like [16, 24, 24] at 7B
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=TEXT_HIDDEN,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    return model


def build_processor(out_dir: str, tokenizer):
    """The edit pipelines' Qwen2-VL processor, saved as its parts (image processor config + tokenizer files, the
    released processor/ layout): transformers cannot build a Qwen2VLProcessor object without torchvision (see
    encoders/edit.py). Saved as "Qwen2VLImageProcessor", so AutoImageProcessor picks the class it would for the
    released files. Small max_pixels (64 merged tokens) keeps the tiny tests fast; min_pixels as released."""
    Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}, patch_size=14,
                             merge_size=2, temporal_patch_size=2).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_vae(out_dir: str, seed: int):
    torch.manual_seed(seed + 1)
    # Three down-sampling stages -> spatial factor 8 and z_dim 16, as released; narrow channels for speed.
    # latents_mean / latents_std keep the released defaults so normalisation is exercised for real.
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
                                 attn_scales=[], temperal_downsample=[False, True, True]).eval()
    vae.save_pretrained(out_dir)
    return vae


def build_transformer(out_dir: str, seed: int):
    torch.manual_seed(seed + 2)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6),
    ).eval()
    model.save_pretrained(out_dir)


def build_scheduler(out_dir: str):
    FlowMatchEulerDiscreteScheduler(**RELEASED_SCHEDULER).save_pretrained(out_dir)


def build_clip(out_dir: str, seed: int):
    """A tiny CLIPModel with its own small BPE tokenizer and a CLIPImageProcessor (224 -> 32 px)."""
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|startoftext|>", "<|endoftext|>"])
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)]
    )
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)
    hf_tok.save_pretrained(out_dir)
    config = CLIPConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed + 3)
    CLIPModel(config).eval().save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out_dir)


def write_model_index(out_dir: str):
    index = {
        "_class_name": "QwenImagePipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def make_tiny(out_dir: str, seed: int = 0, with_clip: bool = True, with_transformer: bool = True) -> str:
    """Write the tiny encoders (and pipeline parts) under `out_dir`; returns `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(os.path.join(out_dir, "tokenizer"))
    build_text_encoder(os.path.join(out_dir, "text_encoder"), tokenizer, seed)
    build_processor(os.path.join(out_dir, "processor"), tokenizer)
    build_vae(os.path.join(out_dir, "vae"), seed)
    build_scheduler(os.path.join(out_dir, "scheduler"))
    if with_transformer:
        build_transformer(os.path.join(out_dir, "transformer"), seed)
        write_model_index(out_dir)
    if with_clip:
        build_clip(os.path.join(out_dir, "clip"), seed)
    return out_dir


def ensure_tiny(out_dir: str | None = None, seed: int = 0) -> str:
    """Build the tiny encoders once and reuse them: `out_dir` defaults to a temp-dir path keyed by this
    file's content and the seed, so tests in several modules (and reruns) share one build. The build goes
    to a temporary sibling directory renamed into place, so a half-built directory is never used."""
    if out_dir is None:
        with open(__file__, "rb") as f:
            digest = hashlib.sha1(f.read() + str(seed).encode()).hexdigest()[:12]
        out_dir = os.path.join(tempfile.gettempdir(), f"megatron-qwen-image-tiny-{digest}")
    if os.path.isfile(os.path.join(out_dir, _DONE)):
        return out_dir
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".", dir=os.path.dirname(os.path.abspath(out_dir)))
    try:
        make_tiny(tmp, seed=seed)
        with open(os.path.join(tmp, _DONE), "w") as f:
            f.write("ok\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first (or out_dir exists): use theirs if complete
            if not os.path.isfile(os.path.join(out_dir, _DONE)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


_DONE = ".complete"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_qwen_image.encoders.make_tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-clip", action="store_true", help="skip the tiny CLIP used by the model-based filter")
    args = p.parse_args(argv)
    t0 = time.time()
    make_tiny(args.out_dir, seed=args.seed, with_clip=not args.no_clip)
    print(f"tiny encoders written to {args.out_dir} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
