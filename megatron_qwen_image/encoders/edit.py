"""Image-editing (TI2I) conditioning exactly as diffusers' `QwenImageEditPipeline` and `QwenImageEditPlusPipeline`
compute it: Qwen2.5-VL features of (instruction, condition image(s)) and the condition images' VAE latents.

The pipelines (diffusers 0.42.1, pipelines/qwenimage/pipeline_qwenimage_edit.py and ..._edit_plus.py):
  1. size each condition image with `calculate_dimensions(area, width / height)`: the area kept, the aspect kept,
     both sides rounded to multiples of 32 (our `condition_size`); area 1024*1024 for the VAE image, and for Plus
     384*384 for the image the vision tower sees (Edit shows the vision tower the VAE-sized image itself);
  2. resize with the pipeline's VaeImageProcessor (PIL Lanczos, no crop: the aspect is already the image's own);
  3. wrap the instruction in the template (`EditTemplate`): Edit's has one `<|vision_start|><|image_pad|>
     <|vision_end|>` block before the instruction; Plus puts "Picture N: <vision block>" per image there instead;
  4. run the Qwen2-VL processor on (texts, vision images), `padding=True`: its image processor resizes each image
     once more (`smart_resize`: sides to multiples of 28 = patch 14 x merge 2, area within its min/max pixels),
     and each `<|image_pad|>` becomes grid_h * grid_w / 4 pad tokens;
  5. run Qwen2.5-VL (vision tower + language model) on input_ids, attention_mask, pixel_values, image_grid_thw
     (not the processor's mm_token_type_ids: transformers 5 then gives all tokens 1-D positions instead of
     Qwen2.5-VL's 3-D ones, diffusers#14194; we do the same), take `hidden_states[-1]`, keep each prompt's
     valid tokens and drop the first `drop_idx` (64, hard-coded in diffusers: the system turn and
     `<|im_start|>user\\n`). The vision tokens stay in the features, and nothing is cut at 1024: a 1024*1024
     Edit image alone gives 1369 vision tokens with the released processor, a 384*384 Plus image 196;
  6. VAE path (`prepare_latents`/`_encode_vae_image`): the VAE-sized image -> [-1, 1] -> one frame -> encode ->
     `mode()` -> `(z - mean) / std` (divided: the text-to-image/img2img path multiplies by 1/std, which differs in
     the last bit, so this is not `QwenVAEEncoder.normalize`), then packed 2x2 (the model's job, model/packing.py).

We return per-prompt features unpadded (`[L_i, D]`) and per-image latents unpacked (`[z_dim, h/8, w/8]`), each
prompt's images sized on their own as in a one-prompt call. (Edit's `__call__` with a list of images sizes them all
by the first and shows the vision tower the originals: `VaeImageProcessor.resize` passes a list through unchanged.)
Images are converted to RGB first, as diffusers' `load_image` does before the pipeline sees them (the pipeline's
own VAE path takes only RGB). The encoder tests (tests/test_encoders_edit.py) prove equality with both pipelines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

from megatron_qwen_image.cache.buckets import CONDITION_AREA, EDIT_PLUS_VISION_AREA, condition_size
from megatron_qwen_image.encoders.local_dir import PROCESSOR, TEXT_ENCODER, component_dir
from megatron_qwen_image.encoders.vae import QwenVAEEncoder, image_to_tensor

VISION_START = "<|vision_start|>"
_SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
           "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
           "image that meets the user's requirements while maintaining consistency with the original input where "
           "appropriate.<|im_end|>\n<|im_start|>user\n")
_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
VAE_AREA = CONDITION_AREA  # both pipelines' VAE condition area, 1024 * 1024 (Plus: VAE_IMAGE_SIZE)


@dataclass(frozen=True)
class EditTemplate:
    """One pipeline's prompt template and condition-image sizes."""

    name: str  # "edit" | "edit_plus"
    template: str  # the pipeline's prompt_template_encode, one '{}' for the user content
    vision_area: int | None  # area of the image the vision tower gets; None: the VAE-sized image (Edit)
    vae_area: int = VAE_AREA
    image_prompt: str | None = None  # Plus: per-image prefix ("Picture {}: ..."); None: one image, in `template`

    def format(self, instruction: str, num_images: int) -> str:
        """The templated prompt for `instruction` with `num_images` condition images, as the pipeline builds it."""
        if self.image_prompt is None:
            if num_images != 1:
                raise ValueError(f"the {self.name!r} template takes exactly one condition image, got {num_images}")
            return self.template.format(instruction)
        if num_images < 1:
            raise ValueError(f"the {self.name!r} template needs at least one condition image, got {num_images}")
        return self.template.format("".join(self.image_prompt.format(i + 1) for i in range(num_images)) + instruction)


EDIT = EditTemplate("edit", _SYSTEM + VISION_START + "<|image_pad|><|vision_end|>{}" + _ASSISTANT, vision_area=None)
EDIT_PLUS = EditTemplate("edit_plus", _SYSTEM + "{}" + _ASSISTANT, vision_area=EDIT_PLUS_VISION_AREA,
                         image_prompt="Picture {}: <|vision_start|><|image_pad|><|vision_end|>")
TEMPLATES = {t.name: t for t in (EDIT, EDIT_PLUS)}

# The pipelines' image_processor (vae_scale_factor 8 x patch 2); its resize is a plain PIL Lanczos resize.
_RESIZER = VaeImageProcessor(vae_scale_factor=16)


def as_rgb(image) -> PIL.Image.Image:
    """A PIL image in RGB (converted as diffusers' `load_image` does); TypeError for anything else."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"a condition image must be a PIL.Image.Image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_to_area(image: PIL.Image.Image, area: int) -> PIL.Image.Image:
    """`image` resized to `condition_size(..., area)` exactly as the pipelines resize it."""
    w, h = condition_size(*image.size, area=area)
    return _RESIZER.resize(image, h, w)


def edit_drop_index(tokenizer, template: EditTemplate = EDIT) -> int:
    """Number of leading template tokens the pipeline drops, computed from the tokenizer.

    diffusers hard-codes 64 for both templates: the tokens before the first vision token, i.e. the system turn
    and `<|im_start|>user\\n` (the same prefix in both). Counting up to '{}' as text.py's template_drop_index does
    would give 67 for Edit, whose vision block sits before '{}': the pipeline keeps that block (2 + the image's pad
    tokens, once the processor expands `<|image_pad|>`) in the features, and for Plus the "Picture N: " labels too.
    Raises unless the prefix tokenizes to a stable prefix of a templated prompt (no BPE merge across it).
    """
    prefix = template.template.split("{}")[0].split(VISION_START)[0]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    probe = template.format("A probe instruction 测试 123.", 1)
    rest_ids = tokenizer(probe[len(prefix):], add_special_tokens=False)["input_ids"]
    if tokenizer(probe, add_special_tokens=False)["input_ids"] != prefix_ids + rest_ids:
        raise ValueError(f"the {template.name!r} template's prefix does not tokenize to a stable prefix with this "
                         "tokenizer; cannot compute the number of template tokens to drop")
    return len(prefix_ids)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """The Qwen2-VL processor without its video processor; `__call__` is Qwen2VLProcessor's own.

    transformers 5.23 type-checks every sub-processor when a processor is built, and cannot check the video one
    without torchvision (not a dependency here): Qwen2VLProcessor(...) and .from_pretrained fail even for images
    only (transformers#48558). Images never touch the video processor, so we leave it out.
    """

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def load_processor(local_dir: str) -> Qwen2VLImageOnlyProcessor:
    """The Qwen2-VL processor of an edit pipeline repo (`processor/`: image processor config + tokenizer files),
    with the classes Qwen2VLProcessor.from_pretrained picks for them; never downloads."""
    path = component_dir(local_dir, PROCESSOR)
    return Qwen2VLImageOnlyProcessor(image_processor=AutoImageProcessor.from_pretrained(path, local_files_only=True),
                                     tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True))


def _images_per_prompt(images) -> list[list]:
    """Each prompt's condition image(s): an image, or a list of images (Plus), per prompt."""
    return [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]


class QwenEditTextEncoder:
    """(instruction, condition image(s)) -> unpadded Qwen2.5-VL features, identical to the edit pipelines'
    `encode_prompt` given the images the pipeline hands it (`vision_image`)."""

    def __init__(self, model, processor, template: EditTemplate = EDIT, batch_size: int = 8):
        self.model = model.eval()
        self.processor = processor
        self.template = template
        self.batch_size = batch_size
        # The processor's tokenizer is the one that tokenizes the prompts.
        self.drop_idx = edit_drop_index(processor.tokenizer, template)

    @classmethod
    def from_pretrained(cls, local_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        **kwargs) -> "QwenEditTextEncoder":
        """Load from a local edit pipeline repo: text_encoder/ and processor/ (which holds its tokenizer)."""
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(component_dir(local_dir, TEXT_ENCODER), dtype=dtype,
                                                                   local_files_only=True)
        return cls(model.to(device), load_processor(local_dir), **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def vision_image(self, image) -> PIL.Image.Image:
        """The condition image as the pipeline gives it to the processor (before the processor's own resize)."""
        return resize_to_area(as_rgb(image), self.template.vision_area or self.template.vae_area)

    @torch.no_grad()
    def encode_batch(self, instructions: Sequence[str], images: Sequence, presized: bool = False) -> list[torch.Tensor]:
        """One forward pass (one padded batch, as the pipeline does); `images[i]`: prompt i's image or images.
        `presized`: the images already are what the pipeline hands the processor (the producer sizes them on
        its CPU actors: buckets.condition_image), so they are not resized again."""
        if len(instructions) != len(images):
            raise ValueError(f"got {len(instructions)} instructions but {len(images)} condition image entries")
        per_prompt = _images_per_prompt(images)
        txt = [self.template.format(p, len(ims)) for p, ims in zip(instructions, per_prompt)]
        vision = [as_rgb(im) if presized else self.vision_image(im) for ims in per_prompt for im in ims]
        inputs = self.processor(text=txt, images=vision, padding=True, return_tensors="pt").to(self.device)
        # The pipeline's arguments exactly: without mm_token_type_ids (which the processor also returns),
        # transformers 5 gives every token 1-D positions instead of Qwen2.5-VL's 3-D ones (diffusers#14194);
        # we keep the pipeline's behaviour. The inner model's last_hidden_state is hidden_states[-1].
        out = self.model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        mask = inputs["attention_mask"].bool()
        valid = torch.split(out.last_hidden_state[mask], mask.sum(dim=1).tolist(), dim=0)
        return [v[self.drop_idx:] for v in valid]

    def encode(self, instructions: Sequence[str], images: Sequence, presized: bool = False) -> list[torch.Tensor]:
        """Features `[L_i, hidden]` per instruction, in order, `batch_size` prompts per forward pass."""
        if isinstance(instructions, str):
            raise TypeError("encode() takes a list of instructions, not a single string")
        out: list[torch.Tensor] = []
        for i in range(0, len(instructions), self.batch_size):
            out.extend(self.encode_batch(instructions[i : i + self.batch_size], images[i : i + self.batch_size],
                                         presized))
        return out


class QwenEditConditionEncoder:
    """Condition images -> normalised VAE latents `[z_dim, h/8, w/8]` each, identical to the edit pipelines'
    `prepare_latents` image latents before packing (one VAE pass per image, as the pipelines run them)."""

    def __init__(self, vae_encoder: QwenVAEEncoder, template: EditTemplate = EDIT):
        self.vae_encoder = vae_encoder
        self.template = template
        cfg = vae_encoder.vae.config
        self._mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)

    @classmethod
    def from_pretrained(cls, local_dir: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        template: EditTemplate = EDIT) -> "QwenEditConditionEncoder":
        """Load the VAE from a local pipeline repo (vae/) or the VAE directory itself."""
        return cls(QwenVAEEncoder.from_pretrained(local_dir, device=device, dtype=dtype), template)

    def vae_image(self, image) -> PIL.Image.Image:
        """The condition image as the pipeline preprocesses it for the VAE."""
        return resize_to_area(as_rgb(image), self.template.vae_area)

    @torch.no_grad()
    def encode(self, images: Sequence, presized: bool = False) -> list[torch.Tensor]:
        """Latents `[z_dim, h/8, w/8]` per condition image, in order. `presized`: the images already have their
        condition size (the producer's, buckets.condition_image) and are not resized again."""
        if isinstance(images, PIL.Image.Image):
            raise TypeError("encode() takes a list of images, not a single image")
        out = []
        for image in images:
            image = as_rgb(image) if presized else self.vae_image(image)
            x = image_to_tensor(image)[None, :, None]  # [1, 3, 1, H, W]: one frame
            z = self.vae_encoder.vae.encode(x.to(self.vae_encoder.device, self.vae_encoder.dtype)).latent_dist.mode()
            z = (z - self._mean.to(z.device, z.dtype)) / self._std.to(z.device, z.dtype)
            out.append(z[0, :, 0])
        return out
