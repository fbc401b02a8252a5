"""Video: mp4/avi/webm/mkv -> ``x [3, num_frames, img_size, img_size]`` clips -> VideoMAE tubelets.

Reading: decord (``VideoReader``, only the sampled frames are decoded); when decord cannot open or
decode a file, PyAV decodes it instead (decord's last release is from 2021) before the file is declared
unreadable. A video with fewer frames than a clip spans is **looped**: frame indices wrap around.

Training (VideoMAE ``kinetics.py`` ``_aug_frame``): ``num_frames`` frames ``sampling_rate`` apart from a
random start; RandAugment (``auto_augment``, VideoMAE's ``rand-m7-n4-mstd0.5-inc1``) drawn once per clip
and applied identically to every frame; a random resized crop (``scale``, ``ratio``) shared by the frames,
resized to ``img_size``; horizontal flip (``hflip``); random erasing (``re_prob``, per frame as VideoMAE's
batch-mode erasing). ``num_sample > 1`` is VideoMAE's repeated augmentation: each read yields that many
independently augmented clips of the video, as :class:`pathway.train.data.Repeated`, which
:func:`pathway.train.data.make_loader` flattens into the batch (a batch of B items holds B * num_sample clips).

Evaluation: ``dataset(split, train=False)`` gives **one view** per video (the centre clip, short side
rescaled to ``img_size``, centre crop), cheap enough for every epoch. :meth:`VideoAdapter.multiview_dataset`
is the final multi-view test, streamed: one item per (video, view), ``test_clips`` evenly spaced clips x
``test_crops`` crops (1: centre; 3: both ends and centre of the long side), item ``(x, y, video_index)``;
the caller averages the softmax probabilities of a video's views (VideoMAE ``engine_for_finetuning.py``
``merge``), e.g. with ``MetricAccumulator.add(logits, y, item=video_index)``.

Layouts: ``root/<split>.csv`` (``path,label``) when it exists, else ``root/<split>/<class>/<file>``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from pathway.tokenizers.base import Tokenizer
from pathway.tokenizers.video_tubelet import VideoTubeletTokenizer
from pathway.train.data import Repeated

from .base import Adapter, FileDataset, LayoutError, OptionError, UnreadableFileError
from .image import IMAGENET_MEAN, IMAGENET_STD, keep_zero_bit_posterize
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

        fallback: list[np.ndarray] = []  # PyAV's frames, decoded once if decord fails on this file

        def get(idx) -> np.ndarray:
            if not fallback:
                try:
                    return reader.get_batch(list(idx)).asnumpy()
                except Exception as decode_error:  # decoded lazily: decord opens some files it cannot decode
                    try:
                        fallback.append(read_all_frames_pyav(path))
                    except Exception as av_error:  # a failure of both readers is the file's
                        raise UnreadableFileError(
                            f"{path}: decord could not decode frames ({type(decode_error).__name__}: "
                            f"{decode_error}) and PyAV failed ({type(av_error).__name__}: {av_error})"
                        ) from av_error
            frames = fallback[0]
            return frames[np.asarray(idx) % len(frames)]  # the two readers may count a frame more or less

        return n, get
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


def read_video(path: Path, label=None) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """FileDataset's read step for videos: open the file (frames are decoded when a clip asks for them)."""
    return frame_count_and_reader(path)


def clip_indices(num_video_frames: int, num_frames: int, rate: int, start: int) -> np.ndarray:
    """Frame indices of one clip; past the end they wrap around (short videos loop)."""
    return (start + np.arange(num_frames) * rate) % num_video_frames


def same_for_every_frame(transform: Callable, frames: list) -> list:
    """``transform`` applied to each frame under the same random draws (one RandAugment per clip, as VideoMAE
    applies its video RandAugment to the list of frames); the random state then moves on once."""
    py_state, np_state = random.getstate(), np.random.get_state()
    out = []
    for frame in frames:
        random.setstate(py_state)
        np.random.set_state(np_state)
        out.append(transform(frame))
    return out


def random_resized_crop(frames: Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> Tensor:
    """One random box (torchvision's area / aspect sampling) cut from every frame of ``[T, C, H, W]``, resized
    to ``size x size`` (bilinear, as VideoMAE's ``random_resized_crop``)."""
    from torchvision.transforms import RandomResizedCrop

    top, left, h, w = RandomResizedCrop.get_params(frames[0], list(scale), list(ratio))
    crop = frames[..., top : top + h, left : left + w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


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
        "auto_augment": "rand-m7-n4-mstd0.5-inc1",  # VideoMAE --aa; None turns RandAugment off
        "interpolation": "bicubic",  # RandAugment's (VideoMAE --train_interpolation)
        "scale": (0.08, 1.0),  # random resized crop area and aspect ranges (VideoMAE _aug_frame)
        "ratio": (0.75, 1.3333),
        "hflip": 0.5,
        "re_prob": 0.25,  # random erasing (VideoMAE --reprob), per frame
        "num_sample": 1,  # repeated augmentation: clips per read video (VideoMAE --num_sample 2 on Kinetics)
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "extensions": VIDEO_EXTENSIONS,
    }
    sizes = ("num_frames", "sampling_rate", "img_size", "tubelet_size", "patch_size", "test_clips")
    multiples = (("num_frames", "tubelet_size"), ("img_size", "patch_size"))

    def check_options(self) -> None:
        super().check_options()
        o = self.options
        if int(o["num_sample"]) != o["num_sample"] or o["num_sample"] < 1:
            raise OptionError(
                f"VideoAdapter: num_sample={o['num_sample']} must be a whole number >= 1 (clips per video)"
            )
        if o["test_crops"] not in (1, 3):
            raise OptionError(f"VideoAdapter: test_crops={o['test_crops']} must be 1 (centre) or 3 (ends + centre)")

    def find_classes(self) -> list[str]:
        o = self.options
        rows = self.manifest_rows(o["train_split"])
        if o["classes"] or rows is None:
            return super().find_classes()
        labels = {lab for _, labs in rows for lab in labs}
        return sorted(labels, key=lambda s: (0, int(s)) if s.isdigit() else (1, s))  # Kinetics CSVs use numbers

    def samples(self, split: str) -> list[tuple[Path, int]]:
        """``(file, label)`` of a split, from its manifest or class folders."""
        rows = self.manifest_rows(split)
        if rows is None:
            return self.folder_samples(split)
        where = self.manifest_path(split)
        samples = []
        for path, labels in rows:
            if len(labels) != 1:
                raise OptionError(f"{where}: {path} has labels {labels}; video classification needs exactly one")
            samples.append((path, self.label_index(labels, f"{where}: {path.name}")[0]))
        return samples

    def build_dataset(self, split: str, train: bool) -> Dataset:
        o = self.options
        if train:
            transform = self.frame_augmentation()

            def augment(video, label: int, index: int):
                clips = [(self.train_clip(video, transform), label) for _ in range(o["num_sample"])]
                return clips[0] if len(clips) == 1 else Repeated(clips)
        else:
            def augment(video, label: int, index: int) -> tuple[Tensor, int]:
                n = video[0]
                start = max(0, n - o["num_frames"] * o["sampling_rate"]) // 2
                return self.view(video, start, 0.5), label

        return FileDataset(self.samples(split), read_video, augment, self)

    def test_views(self) -> list[tuple[int, float]]:
        """``(clip k, crop position)`` of every test view, clip-major: ``test_clips x test_crops`` of them."""
        o = self.options
        crops = (0.5,) if o["test_crops"] == 1 else (0.0, 0.5, 1.0)
        return [(k, pos) for k in range(o["test_clips"]) for pos in crops]

    def multiview_dataset(self, split: str) -> Dataset:
        """The multi-view test, one view per item: item ``v + V * j`` is view ``v`` of video ``j`` as
        ``(x [3, T, H, W], label, j)``; average the probabilities of the items sharing ``j``."""
        if self.root is None:
            raise LayoutError("VideoAdapter.spec(...) has no data; build it with VideoAdapter(root, ...)")
        views = self.test_views()

        def augment(video, label: int, index: int) -> tuple[Tensor, int, int]:
            j, view = divmod(index, len(views))
            clip, pos = views[view]
            return self.view(video, self.test_clip_start(video[0], clip), pos), label, j

        return FileDataset(self.samples(split), read_video, augment, self, evaluation=True, items_per_file=len(views))

    def test_clip_start(self, num_video_frames: int, clip: int) -> int:
        """First frame of test clip ``clip``: VideoMAE's ``int(clip * temporal_step)`` over the video subsampled
        at ``sampling_rate`` (``kinetics.py`` test mode), in frames of the video; one clip: the centre."""
        o = self.options
        rate, t, clips = o["sampling_rate"], o["num_frames"], o["test_clips"]
        if clips == 1:
            return max(0, num_video_frames - t * rate) // 2
        step = max((-(-num_video_frames // rate) - t) / (clips - 1), 0.0)
        return int(clip * step) * rate

    def _to_tensor(self, frames: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255  # [T, 3, H, W]

    def _normalise(self, clip: Tensor) -> Tensor:
        mean = torch.tensor(self.options["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(self.options["std"]).view(1, 3, 1, 1)
        return (clip - mean) / std  # [T, 3, H, W]

    def frame_augmentation(self) -> Callable | None:
        """The PIL-frame RandAugment of the ``auto_augment`` option (VideoMAE's ``create_random_augment``)."""
        o = self.options
        if not o["auto_augment"]:
            return None
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        hparams = {"translate_const": int(o["img_size"] * 0.45), "interpolation": str_to_pil_interp(o["interpolation"])}
        return keep_zero_bit_posterize(rand_augment_transform(o["auto_augment"], hparams))

    def train_clip(self, video: tuple[int, Callable], frame_augmentation: Callable | None) -> Tensor:
        """One augmented clip ``[3, T, img_size, img_size]`` (the steps of VideoMAE's ``_aug_frame``)."""
        from PIL import Image
        from timm.data.random_erasing import RandomErasing

        o = self.options
        n, get = video
        span = o["num_frames"] * o["sampling_rate"]
        start = int(np.random.randint(0, max(1, n - span + 1)))
        frames = get(clip_indices(n, o["num_frames"], o["sampling_rate"], start))  # uint8 [T, H, W, 3]
        if frame_augmentation is not None:
            frames = np.stack([
                np.asarray(f) for f in same_for_every_frame(frame_augmentation, [Image.fromarray(f) for f in frames])
            ])
        clip = self._normalise(self._to_tensor(frames))
        clip = random_resized_crop(clip, o["img_size"], tuple(o["scale"]), tuple(o["ratio"]))
        if np.random.rand() < o["hflip"]:
            clip = clip.flip(-1)
        if o["re_prob"] > 0:
            clip = RandomErasing(o["re_prob"], mode="pixel", max_count=1, num_splits=1, device="cpu")(clip)
        return clip.permute(1, 0, 2, 3).contiguous()  # [T, 3, H, W] -> [3, T, H, W]

    def view(self, video: tuple[int, Callable], start: int, pos: float) -> Tensor:
        """The evaluation view of the clip at ``start``: short side to ``img_size``, the crop at ``pos`` (0, 0.5
        or 1) along the long side; ``[3, T, img_size, img_size]``."""
        o = self.options
        n, get = video
        frames = resize_short_side(
            self._to_tensor(get(clip_indices(n, o["num_frames"], o["sampling_rate"], start))), o["img_size"]
        )
        size, (h, w) = o["img_size"], frames.shape[-2:]
        top = int((h - size) * pos) if h > w else (h - size) // 2  # VideoMAE: int(split * spatial_step)
        left = int((w - size) * pos) if w >= h else (w - size) // 2
        return self._normalise(frames[..., top : top + size, left : left + size]).permute(1, 0, 2, 3).contiguous()

    def input_shape(self) -> tuple[int, ...]:
        o = self.options
        return (3, o["num_frames"], o["img_size"], o["img_size"])

    def tokenizer(self, embed_dim: int) -> Tokenizer:
        o = self.options
        return VideoTubeletTokenizer(
            o["num_frames"], o["img_size"], o["tubelet_size"], o["patch_size"], 3, embed_dim, pos_embed=o["pos_embed"]
        )
