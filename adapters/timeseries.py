"""Multichannel time series: the worked example of adding a modality in one file (docs/new-modality.md).

Files ``root/<split>/<class>/*.npy`` (array ``[channels, length]``) or ``*.csv`` (one row per time step,
one column per channel, an optional header). Each series is cropped (training: at random; evaluation:
centred) or zero-padded to ``length``, and standardised per channel. Tokens come from
:class:`TimeSeriesPatchTokenizer`, the shared :class:`~pathway.tokenizers.PatchTokenizer` on a 1-D grid
(Conv1d ``proj`` over ``patch_size`` steps, MAE's sin-cos table by default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pathway.tokenizers.base import Tokenizer
from pathway.tokenizers.patch import PatchTokenizer

from .base import Adapter, FileDataset, LayoutError, UnreadableFileError
from .registry import register


class TimeSeriesPatchTokenizer(PatchTokenizer):
    """``[B, in_chans, length] -> tokens [B, length / patch_size, embed_dim]``."""

    def __init__(self, length: int, patch_size: int, in_chans: int, embed_dim: int, pos_embed: str = "sincos") -> None:
        super().__init__((length,), (patch_size,), in_chans, embed_dim, pos_embed=pos_embed)


def read_series(path: Path) -> np.ndarray:
    """``[channels, length]`` float32 from ``.npy`` (channels first) or ``.csv`` (time steps as rows)."""
    if path.suffix.lower() == ".npy":
        data = np.load(path, allow_pickle=False)
        data = data[None] if data.ndim == 1 else data
    else:
        with path.open() as f:
            header = f.readline()
        has_header = any(c.isalpha() for c in header.replace("e", "").replace("E", ""))
        data = np.loadtxt(path, delimiter=",", skiprows=int(has_header), ndmin=2).T
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating) or data.dtype == bool):
        raise UnreadableFileError(f"{path}: holds {data.dtype} values; expected real numbers (a complex series loses "
                                  f"its imaginary part: store real and imaginary parts as two channels)")
    if data.ndim != 2 or data.shape[1] == 0 or not np.isfinite(data).all():
        raise UnreadableFileError(f"{path}: expected a finite [channels, length] series, got shape {data.shape}")
    return data.astype(np.float32)


@register("timeseries")
class TimeSeriesAdapter(Adapter):
    task = "classification"
    metric = "top1"
    defaults = {
        **Adapter.defaults,
        "in_chans": 3,
        "length": 128,  # steps after crop / pad; a multiple of patch_size
        "patch_size": 16,
        "pos_embed": "sincos",
        "extensions": ("npy", "csv"),
    }
    sizes = ("in_chans", "length", "patch_size")
    multiples = (("length", "patch_size"),)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        o = self.options

        def read(path: Path, label: int) -> np.ndarray:
            series = read_series(path)
            if series.shape[0] != o["in_chans"]:
                raise LayoutError(f"{path} has {series.shape[0]} channels but in_chans={o['in_chans']}; set in_chans")
            return series

        def augment(series: np.ndarray, label: int, index: int) -> tuple[Tensor, int]:
            return torch.from_numpy(self.fit_length(series, train)), label

        return FileDataset(self.folder_samples(split), read, augment, self)

    def fit_length(self, series: np.ndarray, train: bool) -> np.ndarray:
        """Crop or zero-pad to ``length`` steps, then standardise each channel."""
        n, have = self.options["length"], series.shape[1]
        if have > n:
            start = np.random.randint(0, have - n + 1) if train else (have - n) // 2
            series = series[:, start : start + n]
        mean, std = series.mean(axis=1, keepdims=True), series.std(axis=1, keepdims=True)
        series = (series - mean) / np.maximum(std, 1e-6)
        return np.pad(series, ((0, 0), (0, n - series.shape[1]))).astype(np.float32)

    def input_shape(self) -> tuple[int, ...]:
        o = self.options
        return (o["in_chans"], o["length"])

    def tokenizer(self, embed_dim: int) -> Tokenizer:
        o = self.options
        return TimeSeriesPatchTokenizer(o["length"], o["patch_size"], o["in_chans"], embed_dim, o["pos_embed"])
