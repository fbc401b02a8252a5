"""Example inputs for the runtime recorder, derived from what a model says about itself.

torch.fx needs no inputs; the runtime recorder runs one forward, so it needs a batch of one that
the model accepts. Users may pass their own (a tensor, a tuple of args or a dict of kwargs);
otherwise this module derives them, and the report says which ones were used.

Sources, in order: timm's ``patch_embed`` (its built image size) or ``pretrained_cfg['input_size']``; a Hugging
Face config (``main_input_name`` with ``image_size``/``num_channels``, ``num_frames``, ``max_length`` x
``num_mel_bins`` (AST), a waveform long enough for the convolutional feature encoder (wav2vec2,
HuBERT), ``num_mel_bins`` x 2 ``max_source_positions`` (Whisper), or token ids); an
``nn.TransformerEncoder`` (``d_model``, ``batch_first``); torchvision's ``image_size`` attribute;
finally the first weight layer of the model (a Conv2d's ``in_channels``, a Linear's
``in_features``, an Embedding).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def describe(inputs: Any) -> str:
    """``pixel_values [1, 3, 224, 224]``-style description of example inputs."""
    if isinstance(inputs, dict):
        return ", ".join(f"{k} {list(v.shape)}" if isinstance(v, torch.Tensor) else f"{k}={v!r}"
                         for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(describe(v) for v in inputs)
    if isinstance(inputs, torch.Tensor):
        return f"tensor {list(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}"
    return repr(inputs)


def derive_inputs(model: nn.Module) -> tuple[Any, str]:
    """Return (inputs, where they came from) for a batch of one, or raise ``LookupError``."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def image(*shape: int) -> torch.Tensor:
        return torch.randn(1, *shape, device=device, dtype=dtype)

    patch_embed = getattr(model, "patch_embed", None)   # timm: the built size, which img_size= may change
    if (isinstance(getattr(patch_embed, "img_size", None), tuple)
            and hasattr(getattr(patch_embed, "proj", None), "in_channels")):
        return image(patch_embed.proj.in_channels, *patch_embed.img_size), "timm patch_embed (in_chans, img_size)"
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return image(*cfg["input_size"]), "timm pretrained_cfg['input_size']"

    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is not None and main is not None:
        ids = {main: torch.randint(0, min(getattr(config, "vocab_size", 100) or 100, 100), (1, 16), device=device)}
        if main == "pixel_values":
            size = getattr(config, "image_size", 224)
            size = size if isinstance(size, (tuple, list)) else (size, size)
            channels = getattr(config, "num_channels", 3)
            frames = getattr(config, "num_frames", None)
            shape = (frames, channels, *size) if frames else (channels, *size)
            return {main: image(*shape)}, "Hugging Face config (image_size, num_channels, num_frames)"
        if main == "input_values" and hasattr(config, "num_mel_bins"):
            length = getattr(config, "max_length", 1024)
            return {main: image(length, config.num_mel_bins)}, "Hugging Face config (max_length, num_mel_bins)"
        if main == "input_values" and hasattr(config, "conv_kernel"):
            return {main: image(_waveform_length(config))}, "Hugging Face config (conv_kernel, conv_stride: 16 frames)"
        if main == "input_features" and hasattr(config, "max_source_positions"):
            features = {main: image(config.num_mel_bins, 2 * config.max_source_positions)}
            if hasattr(model, "decoder"):
                features["decoder_input_ids"] = torch.zeros(1, 4, dtype=torch.long, device=device)
            return features, "Hugging Face config (num_mel_bins, 2 x max_source_positions)"
        if main == "input_ids":
            return ids, "Hugging Face config (16 token ids)"

    layer = model.layers[0] if isinstance(model, nn.TransformerEncoder) else model
    if isinstance(layer, nn.TransformerEncoderLayer):
        width = layer.self_attn.embed_dim
        tokens = image(8, width) if layer.self_attn.batch_first else image(8, width).transpose(0, 1)
        return tokens, f"{type(model).__name__}(d_model={width}, batch_first={layer.self_attn.batch_first})"

    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return image(3, size, size), "model.image_size"

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (image(module.in_channels, 224, 224),
                    f"first layer {type(module).__name__}({module.in_channels}, ...)")
        if isinstance(module, nn.Conv3d):
            return image(module.in_channels, 16, 224, 224), f"first layer Conv3d({module.in_channels}, ...)"
        if isinstance(module, nn.Conv1d):
            return image(module.in_channels, 256), f"first layer Conv1d({module.in_channels}, ...)"
        if isinstance(module, nn.Embedding):
            ids = torch.randint(0, min(module.num_embeddings, 100), (1, 16), device=device)
            return ids, f"first layer Embedding({module.num_embeddings}, ...)"
        if isinstance(module, nn.Linear):
            return image(8, module.in_features), f"first layer Linear({module.in_features}, ...)"
        if isinstance(module, nn.MultiheadAttention):
            x = image(8, module.embed_dim)
            return (x, x, x), f"first layer MultiheadAttention({module.embed_dim}, ...)"
    raise LookupError("no layer to derive example inputs from")


def _waveform_length(config: Any) -> int:
    """Samples that a wav2vec2-style convolutional feature encoder turns into 16 frames."""
    receptive, stride = 1, 1
    for kernel, step in zip(config.conv_kernel, config.conv_stride):
        receptive += (kernel - 1) * stride
        stride *= step
    return receptive + 15 * stride
