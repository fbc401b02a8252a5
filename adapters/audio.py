"""Audio: wav/flac/mp3/ogg -> 16 kHz mono -> Kaldi log-mel fbank ``[1, 1024, 128]`` -> AudioMAE patches.

The features are AudioMAE's (``torchaudio.compliance.kaldi.fbank(htk_compat=True, window_type="hanning",
num_mel_bins=128, dither=0, frame_shift=10)`` on the mean-removed waveform), written here in torch so
torchaudio is not needed: 25 ms frames every 10 ms, per-frame DC removal, pre-emphasis 0.97, Hann
window, 512-point power spectrum, 128 triangular filters on Kaldi's mel scale (20 Hz to Nyquist),
natural log floored at float32 eps. Then pad (zeros) or crop to ``target_length`` frames, SpecAugment in
training (one frequency mask up to ``freqm`` bins, one time mask up to ``timem`` frames) and
``(x - norm_mean) / (2 * norm_std)`` with AudioMAE's AudioSet statistics by default.

Training augmentation as AudioMAE's fine-tuning (``dataset.py`` and ``ft_as.sh``), each an option:
``roll_mag_aug`` rolls each mean-removed waveform by a random offset and scales it by ``Beta(10, 10) + 0.5``;
``mixup`` is the share of training clips mixed with another clip drawn uniformly from the split, on the
waveforms (the partner padded or cut to the clip's length), ``lambda ~ Beta(10, 10)``, labels
``lambda * y1 + (1 - lambda) * y2`` (a label of both clips stays 1); ``mask_t_prob`` / ``mask_f_prob``
drop that share of the patch-grid's time rows / frequency columns from the tokens (AudioMAE's
``random_masking_2d``, training only; see :class:`~pathway.tokenizers.AudioSpectrogramTokenizer`).

Layouts: ``root/<split>.csv`` manifests with ``path,labels`` (several labels per clip, AudioSet style;
class list from ``classes``, else ``root/class_labels_indices.csv`` (``index,mid,display_name``), else
the labels of the training manifest), or ``root/<split>/<class>/<file>`` folders. ``y`` is a float
multi-hot vector, the task ``multilabel``, the metric mAP. A clip shorter than one 25 ms window is
zero-padded to one window. Unreadable (named, counted, skipped as any bad file): a file that decodes to no
samples, to non-finite samples (librosa refuses them), or to less audio than its header declares (a truncated
WAV, which libsndfile reads up to where the bytes stop without a word; a truncated FLAC already fails to
decode). MP3 and Ogg state no length a cut could be checked against.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pathway.tokenizers.audio_spectrogram import AudioSpectrogramTokenizer
from pathway.tokenizers.base import Tokenizer

from .base import Adapter, FileDataset, OptionError, UnreadableFileError
from .registry import register

AUDIO_EXTENSIONS = ("wav", "flac", "mp3", "ogg")
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974
TRUNCATION_TOLERANCE_S = 0.01  # decoded audio may fall short of the declared length by one 10 ms frame (resampling)


def kaldi_mel_banks(
    num_bins: int, num_fft: int, sample_rate: int, low_freq: float = 20.0, high_freq: float = 0.0
) -> Tensor:
    """Kaldi's triangular filters, built on the mel scale ``1127 ln(1 + f/700)``; ``[num_bins, num_fft // 2 + 1]``."""
    nyquist = sample_rate / 2
    high_freq = high_freq if high_freq > 0 else nyquist + high_freq

    def mel(f: Tensor | float) -> Tensor:
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)

    lo, hi = mel(low_freq), mel(high_freq)
    delta = (hi - lo) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, centre, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    fft_mel = mel(sample_rate / num_fft * torch.arange(num_fft // 2, dtype=torch.float64)).unsqueeze(0)
    up, down = (fft_mel - left) / (centre - left), (right - fft_mel) / (right - centre)
    banks = torch.clamp(torch.minimum(up, down), min=0)
    return torch.nn.functional.pad(banks, (0, 1)).float()  # Kaldi leaves the Nyquist bin out


def kaldi_fbank(wave: Tensor, sample_rate: int = 16000, num_mel_bins: int = 128, frame_ms: float = 25.0,
                shift_ms: float = 10.0, preemphasis: float = 0.97) -> Tensor:
    """Log-mel filterbank ``[frames, num_mel_bins]`` of a mono waveform ``[n]`` (Kaldi ``fbank``, snip edges)."""
    win, shift = int(sample_rate * frame_ms / 1000), int(sample_rate * shift_ms / 1000)
    wave = wave.float()
    if wave.numel() < win:
        wave = torch.nn.functional.pad(wave, (0, win - wave.numel()))
    num_frames = 1 + (wave.numel() - win) // shift
    frames = wave.as_strided((num_frames, win), (shift, 1))  # [frames, win]
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = frames - preemphasis * torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(win, periodic=False)
    num_fft = 1 << math.ceil(math.log2(win))
    power = torch.fft.rfft(frames, n=num_fft).abs().pow(2)  # [frames, num_fft/2 + 1]
    mel = power @ kaldi_mel_banks(num_mel_bins, num_fft, sample_rate).T
    return mel.clamp(min=torch.finfo(torch.float32).eps).log()


def spec_augment(fbank: Tensor, freqm: int, timem: int, generator: torch.Generator | None = None) -> Tensor:
    """One frequency and one time mask set to zero, widths drawn as torchaudio's masking; ``[T, F]``."""
    out = fbank.clone()
    for dim, max_width in ((1, freqm), (0, timem)):
        if max_width <= 0:
            continue
        width = int(torch.rand((), generator=generator) * max_width)
        start = int(torch.rand((), generator=generator) * (out.shape[dim] - width))
        out.narrow(dim, start, width).zero_()
    return out


def read_audio(path: Path, sample_rate: int) -> Tensor:
    """Mono waveform at ``sample_rate`` (librosa decodes, checks that every sample is finite, and resamples);
    empty or truncated audio is unreadable."""
    import librosa
    from audioread.exceptions import NoBackendError

    try:
        wave, _ = librosa.load(str(path), sr=sample_rate, mono=True)
    except NoBackendError as error:  # raised without a message
        raise UnreadableFileError(
            f"{path}: neither soundfile nor audioread can decode it (no audio stream, or not an audio file)"
        ) from error
    if wave.size == 0:
        raise UnreadableFileError(f"{path} decodes to no samples")
    declared = declared_seconds(path)
    if declared is not None and wave.size / sample_rate < declared - TRUNCATION_TOLERANCE_S:
        raise UnreadableFileError(
            f"{path} is truncated: its header declares {declared:.3f} s of audio, the file holds "
            f"{wave.size / sample_rate:.3f} s"
        )
    return torch.from_numpy(wave)


def declared_seconds(path: Path) -> float | None:
    """The duration a WAV file's header declares (its ``data`` chunk size over the byte rate), or None for other
    formats and for a size left open by a streaming writer (0 or 0xFFFFFFFF)."""
    import struct

    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        byte_rate = 0
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"fmt ":
                fmt = f.read(size + size % 2)
                byte_rate = struct.unpack("<I", fmt[8:12])[0] if len(fmt) >= 12 else 0
            elif name == b"data":
                return size / byte_rate if byte_rate and size not in (0, 0xFFFFFFFF) else None
            else:
                f.seek(size + size % 2, 1)


@register("audio")
class AudioAdapter(Adapter):
    task = "multilabel"
    metric = "map"
    defaults = {
        **Adapter.defaults,
        "sample_rate": 16000,
        "num_mel_bins": 128,
        "target_length": 1024,  # frames of 10 ms
        "patch_size": 16,
        "pos_embed": "sincos",
        "norm_mean": AUDIOSET_MEAN,
        "norm_std": AUDIOSET_STD,
        "freqm": 48,  # SpecAugment widths, training only
        "timem": 192,
        "mixup": 0.0,  # share of training clips mixed with another clip (AudioMAE --mixup 0.5)
        "roll_mag_aug": False,  # random roll + Beta(10, 10) + 0.5 gain of each training waveform (AudioMAE)
        "mask_t_prob": 0.0,  # share of time rows of patches dropped in training (AudioMAE fine-tuning 0.2)
        "mask_f_prob": 0.0,  # share of frequency columns of patches dropped in training (0.2)
        "extensions": AUDIO_EXTENSIONS,
    }
    sizes = ("sample_rate", "num_mel_bins", "target_length", "patch_size")
    multiples = (("target_length", "patch_size"), ("num_mel_bins", "patch_size"))

    def check_options(self) -> None:
        super().check_options()
        o = self.options
        for key in ("mixup", "mask_t_prob", "mask_f_prob"):
            if not 0 <= o[key] < (1.0001 if key == "mixup" else 1):
                raise OptionError(
                    f"AudioAdapter: {key}={o[key]} must be a share in [0, 1{']' if key == 'mixup' else ')'}"
                )
        for key in ("freqm", "timem"):
            if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 0:
                raise OptionError(f"AudioAdapter: {key}={o[key]!r} must be a whole number >= 0 (0: no mask)")

    def find_classes(self) -> list[str]:
        o = self.options
        index = self.root / "class_labels_indices.csv"
        rows = self.manifest_rows(o["train_split"])
        if o["classes"] or (not index.is_file() and rows is None):
            return super().find_classes()
        if index.is_file():
            with index.open(newline="", encoding="utf-8-sig") as f:
                return [row["mid"] for row in csv.DictReader(f)]
        return sorted({lab for _, labels in rows for lab in labels})

    def build_dataset(self, split: str, train: bool) -> Dataset:
        o = self.options
        rows = self.manifest_rows(split)
        if rows is not None:
            where = self.manifest_path(split)
            samples = [(path, self.label_index(labels, f"{where}: {path.name}")) for path, labels in rows]
        else:
            samples = [(p, [c]) for p, c in self.folder_samples(split)]

        def read(path: Path, labels: list[int]) -> Tensor:
            return read_audio(path, o["sample_rate"])

        def augment(wave: Tensor, labels: list[int], index: int) -> tuple[Tensor, Tensor]:
            y = self.multi_hot(labels)
            if train:
                wave = self.roll_and_scale(wave - wave.mean())
                if random.random() < o["mixup"]:  # AudioMAE draws the decision and the partner with `random`
                    _, partner, partner_labels = dataset.read_item(random.randint(0, len(dataset) - 1))
                    wave, lam = mix_waveforms(wave, self.roll_and_scale(partner - partner.mean()))
                    y = (lam * y + (1 - lam) * self.multi_hot(partner_labels)).clamp_(max=1.0)  # shared label: 1
            return self.features(wave, train), y

        dataset = FileDataset(samples, read, augment, self)  # `augment` draws mixup partners from it
        return dataset

    def multi_hot(self, labels: list[int]) -> Tensor:
        y = torch.zeros(self.num_classes)
        y[labels] = 1.0
        return y

    def roll_and_scale(self, wave: Tensor) -> Tensor:
        """AudioMAE's ``roll_mag_aug`` when the option is on: a random circular shift, gain ``Beta(10, 10) + 0.5``."""
        if not self.options["roll_mag_aug"]:
            return wave
        shift = int(np.random.randint(len(wave)))
        return torch.roll(wave, shift) * float(np.random.beta(10, 10) + 0.5)

    def features(self, wave: Tensor, train: bool) -> Tensor:
        """Waveform -> normalised fbank ``[1, target_length, num_mel_bins]`` (AudioMAE's order of steps)."""
        o = self.options
        fbank = kaldi_fbank(wave - wave.mean(), o["sample_rate"], o["num_mel_bins"])
        n = o["target_length"]
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, n - fbank.shape[0])) if fbank.shape[0] < n else fbank[:n]
        if train:
            fbank = spec_augment(fbank, o["freqm"], o["timem"])
        return ((fbank - o["norm_mean"]) / (2 * o["norm_std"])).unsqueeze(0)

    def input_shape(self) -> tuple[int, ...]:
        o = self.options
        return (1, o["target_length"], o["num_mel_bins"])

    def tokenizer(self, embed_dim: int) -> Tokenizer:
        o = self.options
        return AudioSpectrogramTokenizer(o["target_length"], o["num_mel_bins"], o["patch_size"], embed_dim,
                                         o["pos_embed"], mask_t_prob=o["mask_t_prob"], mask_f_prob=o["mask_f_prob"])


def mix_waveforms(wave: Tensor, partner: Tensor) -> tuple[Tensor, float]:
    """AudioMAE's waveform mixup: the partner zero-padded or cut to ``wave``'s length, ``lambda ~ Beta(10, 10)``,
    the mix mean-removed again; returns ``(mix, lambda)``."""
    n = len(wave)
    partner = torch.nn.functional.pad(partner, (0, n - len(partner))) if len(partner) < n else partner[:n]
    lam = float(np.random.beta(10, 10))
    mix = lam * wave + (1 - lam) * partner
    return mix - mix.mean(), lam
