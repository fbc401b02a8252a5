"""Tokenizers: modality tensors to tokens ``[B, N, D]`` (imported as ``pathway.tokenizers``; torch only)."""

# The modules live in the repository's top-level `tokenizers/` folder. It has no __init__.py, so it never shadows
# Hugging Face's tokenizers for code started in the repo root: a plain folder yields to an installed package of the same
# name (PEP 420). A wheel installs the modules beside this file; in a source checkout (editable install,
# or the repo root on sys.path) this package reads them from that folder.
from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
if not (_here / "base.py").exists():
    __path__.append(str(_here.parents[1] / "tokenizers"))
del _Path, _here

from .audio_spectrogram import AudioSpectrogramTokenizer as AudioSpectrogramTokenizer
from .base import Tokenizer as Tokenizer, TokenizerOutput as TokenizerOutput
from .image_patch import ImagePatchTokenizer as ImagePatchTokenizer
from .patch import PatchTokenizer as PatchTokenizer, patchify as patchify
from .point_group import (
    PointGroupTokenizer as PointGroupTokenizer,
    farthest_point_sample as farthest_point_sample,
    knn as knn,
)
from .pos_embed import (
    resample_pos_embed as resample_pos_embed,
    sincos_pos_embed as sincos_pos_embed,
    sinusoid_table as sinusoid_table,
)
from .video_tubelet import VideoTubeletTokenizer as VideoTubeletTokenizer
