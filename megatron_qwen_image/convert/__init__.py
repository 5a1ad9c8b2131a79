"""Checkpoint conversion between diffusers' QwenImageTransformer2DModel and megatron-qwen-image checkpoints.

    python -m megatron_qwen_image.convert import-diffusers --src DIFFUSERS_DIR --dst CKPT_DIR --tp N
    python -m megatron_qwen_image.convert export-diffusers --src CKPT --dst DIFFUSERS_DIR

Modules: `diffusers_dir` (reading a released transformer directory), `streaming` (tensor-by-tensor
torch_dist writer/reader and safetensors writer), `importer` / `exporter` (the two commands). The checkpoint
directory format they write and read is megatron_qwen_image.checkpoint_format, shared with the trainer.
See docs/checkpoints.md.
"""
