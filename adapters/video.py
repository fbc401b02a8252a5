"""Video: mp4/avi/webm/mkv -> ``x [3, num_frames, img_size, img_size]`` clips -> VideoMAE tubelets.

Reading: decord (``VideoReader``, only the sampled frames are decoded); when decord cannot open or
decode a file, PyAV decodes it instead (decord's last release is from 2021) before the file is declared
unreadable.

Sampling (VideoMAE): ``num_frames`` frames ``sampling_rate`` apart. Training draws one clip at a random
start, rescales the short side to a random size in [``img_size``, ``img_size * 1.15``], random-crops
``img_size`` and flips horizontally. Evaluation takes ``test_clips`` clips at evenly spaced starts x
``test_crops`` crops (1: centre; 3: both ends and centre of the long side) after rescaling the short side
to ``img_size``; with more than one view an item is ``[views, 3, T, H, W]`` and the caller averages the
logits over the views. A video with fewer frames than a clip spans is **looped**: frame indices wrap
around to the start.

Layouts: ``root/<split>.csv`` (``path,label``) when it exists, else ``root/<split>/<class>/<file>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from pathway.tokenizers.base import Tokenizer
from pathway.tokenizers.video_tubelet import VideoTubeletTokenizer

from .base import Adapter, FileDataset, OptionError, UnreadableFileError
from .image import IMAGENET_MEAN, IMAGENET_STD
from .registry import register

VIDEO_EXTENSIONS = ("mp4", "avi", "webm", "mkv", "mov")


def frame_count_and_reader(path: Path):
    """``(number of frames, get(indices) -> uint8 [T, H, W, 3])``: decord first, PyAV as the fallback."""
    try:
        import decord

        reader = decord.VideoReader(str(path), num_threads=1)
        n = len(reader)
        if n == 0:
            raise RuntimeError("decord found no frames")
        return n, lambda idx: reader.get_batch(list(idx)).asnumpy()
    except Exception as decord_error:
        try:
            frames = read_all_frames_pyav(path)
        except Exception as av_error:
            raise UnreadableFileError(
                f"{path}: decord failed ({type(decord_error).__name__}: {decord_error}) and PyAV failed "
                f"({type(av_error).__name__}: {av_error})"
            ) from av_error
        return len(frames), lambda idx: frames[np.asarray(idx)]


def read_all_frames_pyav(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise RuntimeError("PyAV decoded no frames")
    return np.stack(frames)


def clip_indices(num_video_frames: int, num_frames: int, rate: int, start: int) -> np.ndarray:
    """Frame indices of one clip; past the end they wrap around (short videos loop)."""
    return (start + np.arange(num_frames) * rate) % num_video_frames


def resize_short_side(frames: Tensor, size: int) -> Tensor:
    """``[T, C, H, W]`` resized so that ``min(H, W) == size`` (bilinear, antialiased)."""
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    return F.interpolate(frames, size=new, mode="bilinear", antialias=True, align_corners=False)


@register("video")
class VideoAdapter(Adapter):
    task = "classification"
    metric = "top1"
    defaults = {
        **Adapter.defaults,
        "num_frames": 16,
        "sampling_rate": 4,
        "img_size": 224,
        "tubelet_size": 2,
        "patch_size": 16,
        "pos_embed": "sincos",
        "test_clips": 5,
        "test_crops": 3,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "extensions": VIDEO_EXTENSIONS,
    }

    def check_options(self) -> None:
        o = self.options
        if o["test_crops"] not in (1, 3):
            raise OptionError(f"VideoAdapter: test_crops={o['test_crops']} must be 1 (centre) or 3 (ends + centre)")
        if o["num_frames"] % o["tubelet_size"]:
            raise OptionError(f"VideoAdapter: num_frames={o['num_frames']} must be a multiple of tubelet_size={o['tubelet_size']}")

    def find_classes(self) -> list[str]:
        o = self.options
        rows = self.manifest_rows(o["train_split"])
        if o["classes"] or rows is None:
            return super().find_classes()
        labels = {lab for _, labs in rows for lab in labs}
        return sorted(labels, key=lambda s: (0, int(s)) if s.isdigit() else (1, s))  # Kinetics CSVs use numbers

    def build_dataset(self, split: str, train: bool) -> Dataset:
        rows = self.manifest_rows(split)
        if rows is not None:
            where = self.manifest_path(split)
            samples = []
            for path, labels in rows:
                if len(labels) != 1:
                    raise OptionError(f"{where}: {path} has labels {labels}; video classification needs exactly one")
                samples.append((path, self.label_index(labels, f"{where}: {path.name}")[0]))
        else:
            samples = self.folder_samples(split)

        def load(path: Path, label: int, index: int) -> tuple[Tensor, int]:
            return (self.train_clip(path) if train else self.eval_views(path)), label

        return FileDataset(samples, load, self)

    def _to_tensor(self, frames: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255  # [T, 3, H, W]

    def _normalise(self, clip: Tensor) -> Tensor:
        mean = torch.tensor(self.options["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(self.options["std"]).view(1, 3, 1, 1)
        return ((clip - mean) / std).permute(1, 0, 2, 3).contiguous()  # [T, 3, H, W] -> [3, T, H, W]

    def train_clip(self, path: Path) -> Tensor:
        o = self.options
        n, get = frame_count_and_reader(path)
        span = o["num_frames"] * o["sampling_rate"]
        start = int(np.random.randint(0, max(1, n - span + 1)))
        frames = self._to_tensor(get(clip_indices(n, o["num_frames"], o["sampling_rate"], start)))
        size = o["img_size"]
        frames = resize_short_side(frames, int(np.random.randint(size, int(size * 1.15) + 1)))
        h, w = frames.shape[-2:]
        top, left = np.random.randint(0, h - size + 1), np.random.randint(0, w - size + 1)
        frames = frames[..., top : top + size, left : left + size]
        if np.random.rand() < 0.5:
            frames = frames.flip(-1)
        return self._normalise(frames)

    def eval_views(self, path: Path) -> Tensor:
        """``[3, T, H, W]`` for one view, else ``[clips * crops, 3, T, H, W]`` (clip-major)."""
        o = self.options
        n, get = frame_count_and_reader(path)
        span = o["num_frames"] * o["sampling_rate"]
        starts = np.linspace(0, max(0, n - span), o["test_clips"]).round().astype(int)
        size, views = o["img_size"], []
        for start in starts:
            frames = resize_short_side(self._to_tensor(get(clip_indices(n, o["num_frames"], o["sampling_rate"], start))), size)
            h, w = frames.shape[-2:]
            for pos in ((0.5,) if o["test_crops"] == 1 else (0.0, 0.5, 1.0)):
                top, left = round((h - size) * pos) if h > w else (h - size) // 2, round((w - size) * pos) if w >= h else (w - size) // 2
                views.append(self._normalise(frames[..., top : top + size, left : left + size]))
        return views[0] if len(views) == 1 else torch.stack(views)

    def input_shape(self) -> tuple[int, ...]:
        o = self.options
        return (3, o["num_frames"], o["img_size"], o["img_size"])

    def tokenizer(self, embed_dim: int) -> Tokenizer:
        o = self.options
        return VideoTubeletTokenizer(
            o["num_frames"], o["img_size"], o["tubelet_size"], o["patch_size"], 3, embed_dim, pos_embed=o["pos_embed"]
        )
