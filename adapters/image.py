"""Images: ``root/<split>/<class>/*.{jpg,png,webp,bmp}`` read with PIL, timm transforms, ViT patch tokens.

Training uses timm's ``create_transform`` as MAE fine-tuning does (random resized crop, flip,
RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, bicubic); evaluation resizes to
``img_size / crop_pct`` and centre-crops. Items: ``x [C, img_size, img_size]`` float, ``y`` int.

Files are read at their full range: 16-bit grey (Pillow's ``I;16`` modes, e.g. 16-bit PNGs) is scaled to
8 bits as ``round(v * 255 / 65535)`` before the 8-bit transforms (Pillow's own conversion clips every value
above 255 to white); 32-bit integer and float images (modes ``I`` and ``F``), whose range the format does not
fix, are refused by name. Palette, grey + alpha, CMYK and bilevel images become RGB or grey as Pillow converts
them (alpha dropped, as torchvision's loader does).

RandAugment's posterize keeps 0 bits at the top magnitude (``PosterizeIncreasing`` at m >= 10, reached
through ``mstd0.5`` about once in a thousand calls); Pillow 13 refuses 0 bits where older Pillow returned a
black image, which timm's policies rely on. :func:`keep_zero_bit_posterize` restores that behaviour in
the transforms this adapter builds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from pathway.tokenizers.base import Tokenizer
from pathway.tokenizers.image_patch import ImagePatchTokenizer

from .base import Adapter, FileDataset, LayoutError, OptionError
from .registry import register

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@register("image")
class ImageAdapter(Adapter):
    task = "classification"
    metric = "top1"
    defaults = {
        **Adapter.defaults,
        "img_size": 224,
        "patch_size": 16,
        "in_chans": 3,  # 3 (RGB) or 1 (grey)
        "pos_embed": "learn",
        "auto_augment": "rand-m9-mstd0.5-inc1",  # None turns RandAugment off
        "re_prob": 0.25,  # random erasing
        "hflip": 0.5,  # horizontal flip probability (0 for digits, text, anything not mirror-symmetric)
        "scale": (0.08, 1.0),  # random-resized-crop area range (timm's default)
        "color_jitter": None,  # MAE fine-tuning: off when RandAugment is on
        "interpolation": "bicubic",
        "crop_pct": 0.875,  # evaluation: resize to img_size / crop_pct, centre crop
        "mean": None,  # None: ImageNet's (RGB) or 0.5 (grey)
        "std": None,
        "extensions": IMAGE_EXTENSIONS,
    }
    sizes = ("img_size", "patch_size")
    multiples = (("img_size", "patch_size"),)

    def check_options(self) -> None:
        super().check_options()
        if self.options["in_chans"] not in (1, 3):
            raise OptionError(f"ImageAdapter: in_chans={self.options['in_chans']} must be 3 (RGB) or 1 (grey)")

    def build_dataset(self, split: str, train: bool) -> Dataset:
        o = self.options
        transform = self.transform(train)

        def augment(image, label: int, index: int) -> tuple[Tensor, int]:
            return transform(image), label

        return FileDataset(
            self.folder_samples(split), lambda path, label: read_image(path, o["in_chans"]), augment, self
        )

    def transform(self, train: bool):
        """timm's train / eval transform for this adapter's options (PIL image -> normalised tensor)."""
        from timm.data import create_transform

        o = self.options
        grey = o["in_chans"] == 1
        mean = tuple(o["mean"] or ((0.5,) if grey else IMAGENET_MEAN))
        std = tuple(o["std"] or ((0.5,) if grey else IMAGENET_STD))
        if train:
            return keep_zero_bit_posterize(create_transform(
                o["img_size"], is_training=True, auto_augment=o["auto_augment"], color_jitter=o["color_jitter"],
                re_prob=o["re_prob"], re_mode="pixel", interpolation=o["interpolation"], mean=mean, std=std,
                hflip=o["hflip"], scale=tuple(o["scale"]),
            ))
        return create_transform(
            o["img_size"], is_training=False, interpolation=o["interpolation"], crop_pct=o["crop_pct"],
            mean=mean, std=std,
        )

    def input_shape(self) -> tuple[int, ...]:
        o = self.options
        return (o["in_chans"], o["img_size"], o["img_size"])

    def tokenizer(self, embed_dim: int) -> Tokenizer:
        o = self.options
        return ImagePatchTokenizer(o["img_size"], o["patch_size"], o["in_chans"], embed_dim, pos_embed=o["pos_embed"])


def posterize_keeping_zero_bits(img, bits_to_keep: int, **kwargs):
    """timm's posterize, with 0 bits giving the black image older Pillow returned (Pillow 13 raises)."""
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def keep_zero_bit_posterize(transform):
    """Point every posterize op of the timm RandAugment / AutoAugment inside ``transform`` at
    :func:`posterize_keeping_zero_bits`; returns ``transform``."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", [transform]):
        # RandAugment, AutoAugment
        ops = list(getattr(t, "ops", [])) + [op for sub in getattr(t, "policy", []) for op in sub]
        for op in ops:
            if isinstance(op, auto_augment.AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = posterize_keeping_zero_bits
    return transform


def read_image(path: Path, in_chans: int = 3):
    """Decode an image fully (so truncated files fail here, not later) and convert it to RGB or grey, 8 bits
    per channel over the file's full range."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return eight_bit(img, path).convert("RGB" if in_chans == 3 else "L")


def eight_bit(img, path: Path):
    """``img`` with 8-bit channels: 16-bit grey scaled (not clipped) to 0..255; 32-bit modes refused by name."""
    from PIL import Image

    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8))
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "32-bit float"
        raise LayoutError(
            f"{path} has {kind} pixels (Pillow mode {img.mode}), whose value range the file does not state, so "
            f"they cannot be scaled to the model's input without a guess; convert the images to 8- or 16-bit PNG "
            f"(or JPEG), or leave them out through data.options.extensions"
        )
    return img
