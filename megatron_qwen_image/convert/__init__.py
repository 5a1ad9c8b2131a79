"""Checkpoint conversion between diffusers' QwenImageTransformer2DModel and megatron-qwen-image checkpoints.

    python -m megatron_qwen_image.convert import-diffusers --src DIFFUSERS_DIR --dst CKPT_DIR --tp N
    python -m megatron_qwen_image.convert export-diffusers --src CKPT --dst DIFFUSERS_DIR

Modules: `layout` (checkpoint directory conventions shared with the trainer), `diffusers_dir` (reading a
released transformer directory), `streaming` (tensor-by-tensor torch_dist writer/reader and safetensors
writer), `importer` / `exporter` (the two commands). See docs/checkpoints.md.
"""
