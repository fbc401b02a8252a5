"""Tokenizers: modality tensors to tokens ``[B, N, D]`` (imported as ``pathway.tokenizers``; torch only)."""

from .base import Tokenizer as Tokenizer
from .base import TokenizerOutput as TokenizerOutput
from .image_patch import ImagePatchTokenizer as ImagePatchTokenizer
from .patch import PatchTokenizer as PatchTokenizer
from .patch import patchify as patchify
from .pos_embed import resample_pos_embed as resample_pos_embed
from .pos_embed import sincos_pos_embed as sincos_pos_embed
from .pos_embed import sinusoid_table as sinusoid_table
from .point_group import PointGroupTokenizer as PointGroupTokenizer
from .point_group import farthest_point_sample as farthest_point_sample
from .point_group import knn as knn
from .audio_spectrogram import AudioSpectrogramTokenizer as AudioSpectrogramTokenizer
from .video_tubelet import VideoTubeletTokenizer as VideoTubeletTokenizer
