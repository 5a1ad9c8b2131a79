"""Where each encoder component lives in a local Hugging Face-layout directory, and what it must hold.

A directory given as the encoders (`--encoders DIR`) is a Qwen-Image pipeline repo as released (or as
`python -m megatron_qwen_image.encoders.make_tiny` writes it): `text_encoder/`, `tokenizer/`, `vae/`, ...
A component may also be given as its own directory (`DIR` holds the component's files directly).

`check_encoders_dir` runs before any actor starts: a wrong or incomplete directory is one line naming what
is missing, not an actor that dies in its constructor over and over.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

PIPELINE_HINT = ("a Qwen-Image pipeline directory holds text_encoder/, tokenizer/ and vae/ (the released repo, or "
                 "`python -m megatron_qwen_image.encoders.make_tiny DIR`)")


class EncoderDirError(FileNotFoundError):
    """An encoders directory lacks a component or one of its files; the message says which."""


@dataclass(frozen=True)
class Component:
    subdir: str  # its directory inside a pipeline repo
    what: str  # for messages
    required: tuple[tuple[str, ...], ...]  # each group: at least one of these files must exist

    def missing_in(self, path: str) -> list[str]:
        """The required file groups `path` lacks, as 'a' or 'a or b'."""
        return [" or ".join(group) for group in self.required
                if not any(os.path.isfile(os.path.join(path, name)) for name in group)]


TEXT_ENCODER = Component("text_encoder", "Qwen2.5-VL text encoder",
                         (("config.json",), ("model.safetensors", "model.safetensors.index.json")))
TOKENIZER = Component("tokenizer", "Qwen2 tokenizer", (("tokenizer_config.json",), ("tokenizer.json", "vocab.json")))
VAE = Component("vae", "Qwen-Image VAE (AutoencoderKLQwenImage)",
                (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")))
PRODUCER_COMPONENTS = (TEXT_ENCODER, TOKENIZER, VAE)
# Image-editing pipelines (Qwen-Image-Edit): the Qwen2-VL processor, an image processor and its own tokenizer.
PROCESSOR = Component("processor", "Qwen2-VL processor", (("preprocessor_config.json",), ("tokenizer_config.json",),
                                                          ("tokenizer.json", "vocab.json")))


def component_dir(local_dir: str, component: Component) -> str:
    """`local_dir/<subdir>` in a pipeline repo, else `local_dir` itself if it holds the component; raises
    EncoderDirError naming the missing files otherwise."""
    if not os.path.isdir(local_dir):
        raise EncoderDirError(f"encoders directory {local_dir!r} does not exist or is not a directory; {PIPELINE_HINT}")
    sub = os.path.join(local_dir, component.subdir)
    path = sub if os.path.isdir(sub) else local_dir
    missing = component.missing_in(path)
    if not missing:
        return path
    if path == sub:
        raise EncoderDirError(f"{component.what} in {sub} is incomplete: missing {', '.join(missing)}")
    inside = sorted(c.subdir for c in PRODUCER_COMPONENTS if not c.missing_in(local_dir))
    looks_like = f"; {local_dir} looks like a {inside[0]}/ component: pass its parent directory" if inside else ""
    raise EncoderDirError(f"no {component.what} in {local_dir} (no {component.subdir}/, and no "
                          f"{', '.join(missing)} directly){looks_like}; {PIPELINE_HINT}")


def check_encoders_dir(local_dir: str, components=PRODUCER_COMPONENTS) -> None:
    """Raise EncoderDirError (one line) unless `local_dir` holds every component's files."""
    for component in components:
        component_dir(local_dir, component)
