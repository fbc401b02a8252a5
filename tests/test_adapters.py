"""Adapters read real files written here (PIL, soundfile, open3d, PyAV), skip broken ones, and explain bad layouts."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import make_files as mf
import numpy as np
import pytest
import torch

import pathway.adapters.registry as adapters
from pathway.adapters.base import (
    Adapter,
    LayoutError,
    LeftOut,
    OptionError,
    TooManyUnreadableFilesError,
    UnreadableFileError,
)
from pathway.tokenizers.base import Tokenizer
from pathway.train.data import collate


def read_all(ds) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    return items, [str(w.message) for w in caught]


def read_kept(ds) -> tuple[list, list[str]]:
    """An evaluation set's items with the files left out (unreadable) removed, and the warnings."""
    items, messages = read_all(ds)
    return [item for item in items if not isinstance(item, LeftOut)], messages


# ---------------------------------------------------------------- registry and import


def test_import_is_light_and_registry_lists_builtins():
    code = (
        "import sys, pathway.adapters as a; "
        "print(sorted(m for m in ('PIL', 'open3d', 'librosa', 'decord', 'av', 'soundfile', 'timm') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert {"image", "video", "audio", "point", "point_part", "timeseries"} <= set(adapters.available())
    assert adapters.get("image").name == "image" and issubclass(adapters.get("image"), Adapter)
    with pytest.raises(OptionError, match="available: .*image"):
        adapters.get("smell")


def test_register_and_entry_points(monkeypatch):
    from pathway.adapters import registry

    @adapters.register("unit_test_modality")
    class Custom(Adapter):
        task, metric = "classification", "top1"

    assert adapters.get("unit_test_modality") is Custom and Custom.name == "unit_test_modality"
    with pytest.raises(ValueError, match="already taken"):
        adapters.register("unit_test_modality")(type("Other", (Adapter,), {}))
    registry._REGISTRY.pop("unit_test_modality")

    class EntryPoint:  # what importlib.metadata hands back for an installed plugin
        name = "plugin_modality"

        def load(self):
            return Custom

    monkeypatch.setattr(registry, "entry_points", lambda group: [EntryPoint()] if group == "pathway.adapters" else [])
    assert "plugin_modality" in adapters.available()
    assert adapters.get("plugin_modality") is Custom
    registry._REGISTRY.pop("plugin_modality")


# ---------------------------------------------------------------- image


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            for i, ext in enumerate(("png", "jpg", "webp", "bmp")):
                mf.write_image(tmp_path / split / cls / f"{i}.{ext}", seed=10 * c + i)
    return tmp_path


def test_image_adapter_reads_and_transforms(image_root: Path):
    from PIL import Image

    ad = adapters.get("image")(image_root, img_size=32, patch_size=8)
    assert ad.num_classes == 2 and ad.classes == ["cat", "dog"] and ad.task == "classification" and ad.metric == "top1"
    ev = ad.dataset("val", train=False)
    assert len(ev) == 8
    x, y = ev[5]
    assert x.shape == (3, 32, 32) and y == 1
    # evaluation = resize + centre crop + ImageNet normalisation; at the native size only normalisation
    ref = np.asarray(Image.open(ev.samples[5][0]).convert("RGB"), dtype=np.float32) / 255
    ref = (ref - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    ad_full = adapters.get("image")(image_root, img_size=32, crop_pct=1.0)
    torch.testing.assert_close(
        ad_full.dataset("val", False)[5][0], torch.from_numpy(ref.transpose(2, 0, 1)).float(), rtol=0, atol=1e-5
    )
    xt, _ = ad.dataset("train", train=True)[0]
    assert xt.shape == (3, 32, 32)
    tok = ad.tokenizer(16)
    assert isinstance(tok, Tokenizer)
    out = tok.encode(torch.stack([x, xt]))
    assert ad.head(16)(out.tokens, out).shape == (2, 2)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_image_adapter_skips_broken_files(image_root: Path, how: str):
    bad = mf.corrupt(image_root / "train" / "cat" / "1.jpg", how)
    ad = adapters.get("image")(image_root, img_size=32, patch_size=8, max_unreadable_share=0.5)
    items, messages = read_all(ad.dataset("train", True))
    assert len(items) == 8 and ad.skipped == 1
    assert sum(str(bad) in m for m in messages) == 1
    strict = adapters.get("image")(image_root, img_size=32, strict=True)
    with pytest.raises(UnreadableFileError, match=str(bad)):
        read_all(strict.dataset("train", True))


def test_skip_count_is_shared_with_workers(image_root: Path):
    mf.corrupt(image_root / "train" / "dog" / "0.png", "garbage")
    ad = adapters.get("image")(image_root, img_size=32, max_unreadable_share=0.5)
    ds = ad.dataset("train", False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(len(b[1]) for b in batches) == 7 and ad.skipped == 1 and ds.unreadable_count() == 1


def test_image_layout_and_option_errors(tmp_path: Path, image_root: Path):
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['img_sise'\].*img_size"):
        adapters.get("image")(image_root, img_sise=32)
    with pytest.raises(LayoutError, match="does not exist"):
        adapters.get("image")(tmp_path / "nowhere")
    flat = tmp_path / "flat"
    mf.write_image(flat / "train" / "a.png")
    with pytest.raises(LayoutError, match=r"no class folders .*<class_name>"):
        adapters.get("image")(flat)
    mf.write_image(image_root / "val" / "bird" / "0.png")
    ad = adapters.get("image")(image_root)
    with pytest.raises(LayoutError, match=r"'bird' is not in the class list"):
        ad.dataset("val", False)
    with pytest.raises(LayoutError, match=r"split folder .*test"):
        ad.dataset("test", False)


def test_spec_builds_tokenizer_and_head_without_data():
    ad = adapters.get("image").spec(10, img_size=32, patch_size=8)
    assert ad.num_classes == 10 and ad.root is None
    tok, head = ad.tokenizer(16), ad.head(16)
    out = tok.encode(torch.randn(2, 3, 32, 32))
    assert head(out.tokens, out).shape == (2, 10)
    with_cls = torch.cat([torch.zeros(2, 1, 16), out.tokens], dim=1)  # the engine prepends a class token
    torch.testing.assert_close(head(with_cls, out), head.fc(torch.zeros(2, 16)).expand(2, 10))
    with pytest.raises(LayoutError, match="no data"):
        ad.dataset("train", True)
    with pytest.raises(OptionError, match="in_chans"):
        adapters.get("image").spec(10, in_chans=4)


# ---------------------------------------------------------------- audio


def kaldi_fbank_reference(wave: np.ndarray, sr: int = 16000, bins: int = 128) -> np.ndarray:
    """Kaldi's compute-fbank-feats steps, written from its documentation with numpy loops (float64)."""
    win, shift, nfft = 400, 160, 512
    if len(wave) < win:
        wave = np.pad(wave, (0, win - len(wave)))
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2)
    step = (hi - lo) / (bins + 1)
    fb = np.zeros((bins, nfft // 2 + 1))
    for m in range(bins):
        left, centre, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
        for k in range(nfft // 2):
            z = mel(k * sr / nfft)
            if left < z < right:
                fb[m, k] = (z - left) / (centre - left) if z <= centre else (right - z) / (right - centre)
    window = np.array([0.5 - 0.5 * np.cos(2 * np.pi * i / (win - 1)) for i in range(win)])
    rows = []
    for t in range(1 + (len(wave) - win) // shift):
        frame = wave[t * shift : t * shift + win].astype(np.float64)
        frame = frame - frame.mean()
        frame = np.concatenate([[frame[0] - 0.97 * frame[0]], frame[1:] - 0.97 * frame[:-1]])
        power = np.abs(np.fft.rfft(frame * window, nfft)) ** 2
        rows.append(np.log(np.maximum(fb @ power, np.finfo(np.float32).eps)))
    return np.array(rows)


@pytest.fixture
def audio_root(tmp_path: Path) -> Path:
    mf.write_audio(tmp_path / "clips" / "a.wav", freq=440)
    mf.write_audio(tmp_path / "clips" / "b.flac", freq=880, sr=22050, channels=2)  # resampled, down-mixed
    mf.write_audio(tmp_path / "clips" / "c.ogg", freq=1500, seconds=0.5)
    mf.write_audio(tmp_path / "clips" / "tiny.wav", seconds=0.01)  # shorter than one 25 ms window
    (tmp_path / "train.csv").write_text(
        'path,labels\nclips/a.wav,"/m/speech,/m/music"\nclips/b.flac,/m/music\nclips/c.ogg,/m/dog;/m/speech\nclips/tiny.wav,/m/dog\n'
    )
    (tmp_path / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n0,/m/speech,Speech\n1,/m/music,Music\n2,/m/dog,Dog\n3,/m/cat,Cat\n"
    )
    return tmp_path


def test_kaldi_fbank_matches_reference():

    from pathway.adapters.audio import kaldi_fbank

    wave = np.random.default_rng(0).standard_normal(16000 // 4).astype(np.float32) * 0.3
    ours = kaldi_fbank(torch.from_numpy(wave)).numpy()
    ref = kaldi_fbank_reference(wave)
    assert ours.shape == ref.shape == (1 + (4000 - 400) // 160, 128)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-4)
    assert kaldi_fbank(torch.zeros(100)).shape == (1, 128)  # padded to one window


def test_audio_adapter_multilabel_manifest(audio_root: Path):
    import librosa

    from pathway.adapters.audio import AUDIOSET_MEAN, AUDIOSET_STD

    ad = adapters.get("audio")(audio_root, target_length=128, freqm=8, timem=16)
    assert ad.classes == ["/m/speech", "/m/music", "/m/dog", "/m/cat"] and (ad.task, ad.metric) == ("multilabel", "map")
    items, _ = read_all(ad.dataset("train", train=False))
    assert [y.tolist() for _, y in items] == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]]
    assert all(x.shape == (1, 128, 128) for x, _ in items)
    # the adapter's steps against a direct computation: librosa at 16 kHz mono, mean removed, fbank, pad, normalise
    wave, _ = librosa.load(str(audio_root / "clips" / "b.flac"), sr=16000, mono=True)
    fb = kaldi_fbank_reference(wave - wave.mean())  # 1 s: 98 frames, the rest is padding
    np.testing.assert_allclose(items[1][0][0, : len(fb)].numpy(), (fb - AUDIOSET_MEAN) / (2 * AUDIOSET_STD), atol=1e-3)
    short = items[2][0][0]  # 0.5 s = 48 frames, then zero padding (before normalisation, as AudioMAE)
    torch.testing.assert_close(short[48:], torch.full((80, 128), -AUDIOSET_MEAN / (2 * AUDIOSET_STD)))
    assert items[3][0].shape == (1, 128, 128)  # 10 ms clip padded to one window
    from pathway.adapters.audio import spec_augment

    fbank = torch.rand(128, 32) + 1
    masked = spec_augment(fbank, freqm=8, timem=16, generator=torch.Generator().manual_seed(2)) == 0
    cols, rows = masked.all(dim=0), masked.all(dim=1)  # masked mel bins / frames
    assert 0 < int(cols.sum()) < 8 and 0 < int(rows.sum()) < 16
    assert torch.equal(masked, cols[None, :] | rows[:, None])  # one contiguous band each, nothing else
    assert ad.dataset("train", train=True)[0][0].shape == (1, 128, 128)
    tok = ad.tokenizer(16)
    out = tok.encode(torch.stack([x for x, _ in items]))
    assert out.tokens.shape == (4, 64, 16) and ad.head(16)(out.tokens, out).shape == (4, 4)


def test_audio_adapter_folders_bad_files_and_errors(tmp_path: Path, audio_root: Path):
    for i in range(3):
        mf.write_audio(tmp_path / "f" / "train" / "tone" / f"{i}.wav", freq=300 + 100 * i)
    mf.corrupt(mf.write_audio(tmp_path / "f" / "train" / "tone" / "empty.wav"), "empty")
    mf.corrupt(mf.write_audio(tmp_path / "f" / "train" / "tone" / "garbage.flac"), "garbage")
    mf.corrupt(mf.write_audio(tmp_path / "f" / "train" / "tone" / "cut.flac"), "truncated")
    ad = adapters.get("audio")(tmp_path / "f", target_length=64, max_unreadable_share=0.5)
    items, messages = read_kept(ad.dataset("train", False))
    assert len(items) == 3 and ad.skipped == 3 and ad.num_classes == 1
    assert all(any(name in m for m in messages) for name in ("empty.wav", "garbage.flac", "cut.flac"))
    (audio_root / "val.csv").write_text("path,labels\nclips/a.wav,/m/speech\nclips/missing.wav,/m/dog\n")
    with pytest.raises(LayoutError, match=r"line 3: 'clips/missing.wav' points to .*does not exist"):
        adapters.get("audio")(audio_root).dataset("val", False)
    (audio_root / "val.csv").write_text("path,labels\nclips/a.wav,/m/horse\n")
    with pytest.raises(LayoutError, match=r"\['/m/horse'\] not in the class list"):
        adapters.get("audio")(audio_root).dataset("val", False)
    with pytest.raises(OptionError, match="multiple of patch_size"):
        adapters.get("audio")(audio_root, target_length=100)


# ---------------------------------------------------------------- point clouds


@pytest.fixture
def point_root(tmp_path: Path) -> Path:
    for i, ext in enumerate(("ply", "pcd", "xyz", "xyzn", "pts", "npy", "txt")):
        mf.write_point_cloud(tmp_path / "train" / "blob" / f"{i}.{ext}", n=512, seed=i, normals=True)
    for ext in ("obj", "off", "stl"):
        mf.write_mesh(tmp_path / "train" / "box" / f"m.{ext}")
    mf.write_point_cloud(tmp_path / "train" / "box" / "few.npy", n=20, seed=9)  # fewer points than a group
    return tmp_path


def test_point_adapter_reads_every_format(point_root: Path):
    from pathway.adapters.point import read_points

    ad = adapters.get("point")(point_root, num_points=256, num_groups=16, group_size=32)
    ds = ad.dataset("train", train=False)
    items, messages = read_all(ds)
    assert len(items) == 11 and ad.skipped == 0 and not messages
    for (x, y), (_, label) in zip(items, ds.samples):
        assert x.shape == (256, 3) and y == label
        torch.testing.assert_close(x.mean(0), torch.zeros(3), atol=0.15, rtol=0)  # centred on the sample
        assert 0.9 < float(x.norm(dim=1).max()) <= 1.0 + 1e-5  # inside the unit sphere
    # values: the ply file's points, normalised, are the adapter's (evaluation sampling is a subset)
    raw = read_points(point_root / "train" / "blob" / "0.ply")
    assert raw.shape == (512, 3)
    np.testing.assert_allclose(raw, mf.sphere_points(512, 0), atol=1e-5)
    few = dict(zip([p.name for p, _ in ds.samples], items))["few.npy"][0]
    assert len(torch.unique(few, dim=0)) == 20  # resampled with replacement up to 256 points
    assert torch.equal(ds[0][0], ds[0][0])  # evaluation sampling is deterministic
    tok = ad.tokenizer(32)
    out = tok.encode(torch.stack([x for x, _ in items]))
    assert out.tokens.shape == (11, 16, 32) and ad.head(32)(out.tokens, out).shape == (11, 2)


def test_point_adapter_normals_and_augmentation(point_root: Path):
    ad = adapters.get("point")(point_root, num_points=128, num_groups=8, group_size=8, in_chans=6, rotate=True,
                               extensions=("ply", "pcd", "xyzn", "obj", "off", "stl"))
    x, _ = ad.dataset("train", train=True)[0]
    assert x.shape == (128, 6)
    torch.testing.assert_close(x[:, 3:].norm(dim=1), torch.ones(128))  # normals stay unit length
    assert ad.tokenizer(16).first_conv[0].weight.shape == (128, 6, 1)
    with pytest.raises(LayoutError, match="has no normals"):
        adapters.get("point")(  # `classes`: the box folder holds no xyz file
            point_root, in_chans=6, extensions=("xyz",), classes=["blob", "box"], strict=True
        ).dataset("train", False)[0]
    with pytest.raises(OptionError, match="num_points=16 must be at least group_size=32"):
        adapters.get("point")(point_root, num_points=16)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_point_adapter_skips_broken_files(point_root: Path, how: str):
    bad = [mf.corrupt(point_root / "train" / "blob" / name, how) for name in ("0.ply", "1.pcd", "5.npy")]
    if how != "truncated":  # the first third of an OBJ text is still a (smaller) valid mesh
        bad.append(mf.corrupt(point_root / "train" / "box" / "m.obj", how))
    ad = adapters.get("point")(point_root, num_points=64, num_groups=8, group_size=8, max_unreadable_share=0.5)
    items, messages = read_all(ad.dataset("train", True))
    assert len(items) == 11 and ad.skipped == len(bad)
    assert all(sum(str(p) in m for m in messages) == 1 for p in bad)
    with pytest.raises(UnreadableFileError, match="0.ply"):
        adapters.get("point")(
            point_root, num_points=64, num_groups=8, group_size=8, strict=True
        ).dataset("train", True)[0]


def test_point_part_segmentation(tmp_path: Path):
    for i in range(2):
        mf.write_part_txt(tmp_path / "train" / "chair" / f"{i}.txt", n=200, seed=i, labels=(0, 1))
        mf.write_part_txt(tmp_path / "train" / "lamp" / f"{i}.txt", n=300, seed=10 + i, labels=(2, 3))
    ad = adapters.get("point_part")(tmp_path, num_points=256, num_groups=16, group_size=16, in_chans=6)
    assert (ad.task, ad.metric, ad.num_classes) == ("segmentation", "miou", 4)
    items, _ = read_all(ad.dataset("train", train=False))
    x, y = items[0]
    assert x.shape == (256, 6) and y.shape == (256,) and y.dtype == torch.long
    # labels travel with their points: upper half of the cloud is label 1 in the file
    raw = np.loadtxt(ad.dataset("train", False).samples[0][0])
    upper = x[:, 2] > (
        np.median(raw[:, 2] - raw[:, :3].mean(0)[2]) / np.linalg.norm(raw[:, :3] - raw[:, :3].mean(0), axis=1).max()
        + 0.05
    )
    assert set(y[upper].tolist()) <= {1}
    tok, head = ad.tokenizer(32), ad.head(32)
    batch = torch.stack([x for x, _ in items])
    out = tok.encode(batch)
    logits = head(out.tokens, out)
    assert logits.shape == (4, 256, 4)
    logits.sum().backward()


def test_segmentation_head_interpolates_from_three_nearest_centres():
    from pathway.adapters.heads import SegmentationHead
    from pathway.tokenizers.base import TokenizerOutput
    from pathway.tokenizers.point_group import interpolate_to_points

    centers = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 5, 5]]])
    feats = torch.tensor([[[1.0], [2.0], [3.0], [100.0]]])
    points = torch.tensor([[[0.0, 0, 0], [0.5, 0, 0]]])
    got = interpolate_to_points(points, centers, feats)
    w = 1 / (torch.tensor([0.0, 1, 1]) + 1e-8)
    expect0 = (w * torch.tensor([1.0, 2, 3])).sum() / w.sum()
    w = 1 / torch.tensor([0.25, 0.25, 1.25])
    expect1 = (w * torch.tensor([1.0, 2, 3])).sum() / w.sum()
    torch.testing.assert_close(got[0, :, 0], torch.stack([expect0, expect1]))
    head = SegmentationHead(1, 3)
    out = TokenizerOutput(feats, feats, {"centers": centers, "points": points})
    with_cls = torch.cat([torch.zeros(1, 1, 1), feats], dim=1)
    torch.testing.assert_close(head(with_cls, out), head(feats, out))  # a class token is ignored
    with pytest.raises(ValueError, match="centers"):
        head(feats, TokenizerOutput(feats, feats, {}))


def test_partnet_reader(tmp_path: Path):
    import json

    from pathway.adapters.point import partnet_categories, read_partnet

    split = tmp_path / "stats" / "train_val_test_split"
    split.mkdir(parents=True)
    (split / "Chair.train.json").write_text(json.dumps([{"anno_id": "17", "model_id": "x"}]))
    folder = tmp_path / "data_v0" / "17" / "point_sample"
    folder.mkdir(parents=True)
    np.savetxt(folder / "pts-10000.txt", mf.sphere_points(300))
    np.savetxt(folder / "label-10000.txt", np.arange(300) % 3, fmt="%d")
    assert read_partnet(tmp_path, "Chair", "train") == [(folder / "pts-10000.txt", folder / "label-10000.txt")]
    assert partnet_categories(tmp_path) == ["Chair"]
    with pytest.raises(LayoutError, match="no PartNet split lists"):
        partnet_categories(tmp_path / "nowhere")
    ad = adapters.get("point_part")(
        tmp_path, layout="partnet", category="Chair", num_points=128, num_groups=8, group_size=8
    )
    x, y = ad.dataset("train", False)[0]
    assert ad.num_classes == 3 and x.shape == (128, 3) and set(y.tolist()) == {0, 1, 2}
    with pytest.raises(LayoutError, match="Chair.val.json"):
        ad.dataset("val", False)
    with pytest.raises(OptionError, match="category"):
        adapters.get("point_part")(tmp_path, layout="partnet")


# ---------------------------------------------------------------- video


@pytest.fixture
def video_root(tmp_path: Path) -> Path:
    mf.write_video(tmp_path / "train" / "up" / "a.mp4", frames=8, seed=1)
    mf.write_video(tmp_path / "train" / "up" / "b.webm", frames=8, seed=2)
    mf.write_video(tmp_path / "train" / "down" / "c.avi", frames=5, seed=3)  # shorter than a clip
    return tmp_path


def normalised_frames(path: Path, idx: list[int]) -> torch.Tensor:
    from pathway.adapters.video import read_all_frames_pyav

    frames = torch.from_numpy(read_all_frames_pyav(path)[idx]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((frames - mean) / std).permute(1, 0, 2, 3)


def test_video_adapter_clips_match_decoded_frames(video_root: Path):
    ad = adapters.get("video")(video_root, num_frames=4, sampling_rate=2, img_size=32, test_clips=1, test_crops=1)
    assert ad.classes == ["down", "up"]
    ds = ad.dataset("train", train=False)
    items, messages = read_all(ds)
    assert not messages and [y for _, y in items] == [0, 1, 1]
    by_name = {p.name: x for (p, _), (x, _) in zip(ds.samples, items)}
    torch.testing.assert_close(by_name["a.mp4"], normalised_frames(video_root / "train" / "up" / "a.mp4", [0, 2, 4, 6]))
    # 5 frames, clip spans 8: indices loop to 0, 2, 4, 1
    torch.testing.assert_close(
        by_name["c.avi"], normalised_frames(video_root / "train" / "down" / "c.avi", [0, 2, 4, 1])
    )
    x, _ = ad.dataset("train", train=True)[0]
    assert x.shape == (3, 4, 32, 32)
    multi = adapters.get("video")(video_root, num_frames=4, sampling_rate=1, img_size=32, test_clips=2, test_crops=3)
    assert multi.dataset("train", False)[0][0].shape == (3, 4, 32, 32)  # one view per epoch's evaluation
    views = multi.multiview_dataset("train")
    assert len(views) == 3 * 6 and [views[i][2] for i in range(len(views))] == [j for j in range(3) for _ in range(6)]
    assert all(views[i][0].shape == (3, 4, 32, 32) for i in (0, 5, 17))
    tok = ad.tokenizer(24)
    assert tok.proj.weight.shape == (24, 3, 2, 16, 16)
    out = tok.encode(torch.stack([x for x, _ in items]))
    assert out.tokens.shape == (3, 2 * 2 * 2, 24) and ad.head(24)(out.tokens, out).shape == (3, 2)


def test_video_falls_back_to_pyav(video_root: Path, monkeypatch):
    import decord

    from pathway.adapters.video import frame_count_and_reader

    path = video_root / "train" / "up" / "a.mp4"
    n, get = frame_count_and_reader(path)
    expected = get([1, 3])

    def broken(*args, **kwargs):
        raise RuntimeError("decord cannot open this file")

    monkeypatch.setattr(decord, "VideoReader", broken)
    n2, get2 = frame_count_and_reader(path)
    assert n2 == n == 8
    np.testing.assert_array_equal(get2([1, 3]), expected)


def test_video_manifest_bad_files_and_errors(video_root: Path):
    (video_root / "train.csv").write_text("path,label\ntrain/up/a.mp4,3\ntrain/down/c.avi,0\ntrain/up/b.webm,3\n")
    ad = adapters.get("video")(
        video_root, num_frames=2, sampling_rate=1, img_size=32, test_clips=1, test_crops=1, max_unreadable_share=0.8
    )
    assert ad.classes == ["0", "3"]
    for how, name in zip(("empty", "truncated", "garbage"), ("a.mp4", "c.avi", "b.webm")):
        mf.write_video(video_root / "bad" / how / name)
        mf.corrupt(video_root / "bad" / how / name, how)
    (video_root / "val.csv").write_text(
        "path,label\ntrain/up/a.mp4,3\nbad/empty/a.mp4,3\nbad/truncated/c.avi,0\nbad/garbage/b.webm,0\n"
    )
    items, messages = read_kept(ad.dataset("val", False))
    assert len(items) == 1 and ad.skipped == 3 and sum("bad/" in m for m in messages) == 3
    multi = adapters.get("video")(video_root, num_frames=2, sampling_rate=1, img_size=32, test_clips=2, test_crops=3,
                                  max_unreadable_share=0.8)
    views = multi.multiview_dataset("val")
    items, messages = read_kept(views)  # 4 videos x 6 views; a bad video's views all left out, it is named once
    assert len(views) == 24 and [j for _, _, j in items] == [0] * 6 and multi.skipped == views.unreadable_count() == 3
    assert sorted(re.search(r"bad/\w+/\S+", m).group() for m in messages) == [
        "bad/empty/a.mp4", "bad/garbage/b.webm", "bad/truncated/c.avi"]
    (video_root / "val.csv").write_text("path,label\ntrain/up/a.mp4,7\n")
    with pytest.raises(LayoutError, match=r"\['7'\] not in the class list"):
        ad.dataset("val", False)


# ---------------------------------------------------------------- time series (the fifth, one-file modality)


def test_timeseries_adapter(tmp_path: Path):
    from pathway.adapters.timeseries import TimeSeriesPatchTokenizer

    mf.write_series(tmp_path / "train" / "calm" / "a.npy", length=100, seed=0)
    mf.write_series(tmp_path / "train" / "wild" / "b.csv", length=40, seed=1)
    mf.corrupt(mf.write_series(tmp_path / "train" / "wild" / "c.npy"), "garbage")
    ad = adapters.get("timeseries")(tmp_path, in_chans=3, length=64, patch_size=8, max_unreadable_share=0.5)
    ds = ad.dataset("train", train=False)
    items, _ = read_kept(ds)
    assert len(items) == 2 and ad.skipped == 1
    raw = np.load(tmp_path / "train" / "calm" / "a.npy")[:, 18:82]  # centre crop of 100 -> 64
    ref = (raw - raw.mean(1, keepdims=True)) / raw.std(1, keepdims=True)
    np.testing.assert_allclose(items[0][0].numpy(), ref, atol=1e-5)
    csv = np.loadtxt(tmp_path / "train" / "wild" / "b.csv", delimiter=",", skiprows=1).T
    np.testing.assert_allclose(
        items[1][0][:, :40].numpy(), (csv - csv.mean(1, keepdims=True)) / csv.std(1, keepdims=True), atol=1e-5
    )
    assert torch.equal(items[1][0][:, 40:], torch.zeros(3, 24))  # zero padding to length
    tok = ad.tokenizer(16)
    assert isinstance(tok, TimeSeriesPatchTokenizer) and tok.proj.weight.shape == (16, 3, 8)
    batch = torch.stack([x for x, _ in items])
    out = tok.encode(batch)
    assert out.tokens.shape == (2, 8, 16) and tok.reconstruction_targets(batch, out).shape == (2, 8, 24)
    with pytest.raises(LayoutError, match="has 3 channels but in_chans=2"):
        adapters.get("timeseries")(
            tmp_path, in_chans=2, length=64, patch_size=8, strict=True
        ).dataset("train", False)[0]


@pytest.mark.parametrize("name, options", [
    ("image", dict(img_size=32, patch_size=8)), ("video", dict(num_frames=8, img_size=32)),
    ("audio", dict(target_length=64, num_mel_bins=32)), ("point", dict(num_points=256, num_groups=8, group_size=16)),
    ("point_part", dict(num_points=256, num_groups=8, group_size=16)), ("timeseries", dict(length=128, patch_size=16)),
])
def test_example_input_fits_the_tokenizer_without_data(name, options):
    from pathway.adapters.registry import get

    adapter = get(name).spec(4, **options)
    tokens = adapter.tokenizer(32)(adapter.example_input()[None])
    assert tokens.shape[0] == 1 and tokens.shape[-1] == 32


def test_part_segmentation_bad_files_are_named(tmp_path: Path):
    for i in range(2):
        mf.write_part_txt(tmp_path / "train" / "Chair" / f"{i}.txt", seed=i)
    (tmp_path / "train" / "Chair" / "bad.txt").write_text("1 2 3 4 5 6 0\n1 2\n")   # a truncated row
    with pytest.raises(UnreadableFileError, match=r"bad\.txt.*num_classes="):
        adapters.get("point_part")(tmp_path)
    points, labels = tmp_path / "p.txt", tmp_path / "l.txt"
    np.savetxt(points, np.random.rand(40, 3))       # xyz only, as PartNet ships them
    np.savetxt(labels, np.zeros(40, dtype=int), fmt="%d")
    with pytest.raises(LayoutError, match=r"p\.txt has 3 values per point but in_chans=6"):
        adapters.get("point_part").spec(4, in_chans=6).read(points, labels)


# ---------------------------------------------------------------- data read right, or refused by name (issue 18)


def test_sixteen_bit_grey_is_read_over_its_full_range(tmp_path: Path):
    from PIL import Image

    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(ramp).save(tmp_path / "train" / cls / "ramp.png")
        Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "train" / cls / "ramp.tif")
    assert Image.open(tmp_path / "train" / "a" / "ramp.png").mode == "I;16"
    plain = dict(img_size=32, patch_size=8, crop_pct=1.0, mean=(0.0,), std=(1.0,))
    x, _ = adapters.get("image")(tmp_path, in_chans=1, **plain).dataset("train", False)[0]
    np.testing.assert_allclose(x[0].numpy(), ramp / 65535, atol=0.5 / 255 + 1e-6)  # was 255 above 0.4 % of the ramp
    rgb, _ = adapters.get("image")(tmp_path, **{**plain, "mean": (0.0,) * 3, "std": (1.0,) * 3}).dataset(
        "train", False)[0]
    torch.testing.assert_close(rgb, x.expand(3, -1, -1))
    floats = adapters.get("image")(tmp_path, extensions=("tif",), **plain).dataset("train", False)
    with pytest.raises(LayoutError, match=r"ramp\.tif has 32-bit float pixels \(Pillow mode F\).*8- or 16-bit PNG"):
        floats[0]


def test_an_empty_class_folder_is_refused_not_made_a_class(image_root: Path):
    (image_root / "train" / "bird").mkdir()
    (image_root / "train" / "fish").mkdir()
    (image_root / "train" / "fish" / "notes.txt").write_text("no image here")
    with pytest.raises(LayoutError, match=r"train/bird', .*train/fish'\] \(2 of 4\) hold no files with extensions"):
        adapters.get("image")(image_root)
    kept = adapters.get("image")(image_root, classes=["bird", "cat", "dog", "fish"])  # named on purpose: kept
    assert kept.num_classes == 4 and len(kept.dataset("train", False)) == 8


def test_truncated_wavs_are_named_not_read_as_short_clips(tmp_path: Path):
    import soundfile as sf

    mf.write_audio(tmp_path / "train" / "tone" / "whole.wav")
    for i in range(3):
        mf.corrupt(mf.write_audio(tmp_path / "val" / "tone" / f"cut{i}.wav", freq=300 + 100 * i), "truncated")
    stream = mf.write_audio(tmp_path / "val" / "tone" / "stream.wav")  # a streaming writer leaves the size open
    data = bytearray(stream.read_bytes())
    data[data.index(b"data") + 4 : data.index(b"data") + 8] = b"\xff\xff\xff\xff"
    stream.write_bytes(bytes(data))
    assert sf.info(str(tmp_path / "val" / "tone" / "cut0.wav")).frames < 16000 / 2  # libsndfile reads the stump
    ad = adapters.get("audio")(tmp_path, target_length=128, max_unreadable_share=1.0)
    items, messages = read_kept(ad.dataset("val", False))
    assert len(items) == 1 and ad.skipped == 3  # the stream wav is whole
    assert sum(bool(re.search(r"cut\d\.wav is truncated: its header declares 1\.000 s of audio, the file holds "
                              r"0\.33\d s", m)) for m in messages) == 3
    with warnings.catch_warnings(), pytest.raises(TooManyUnreadableFilesError, match=r"cut\d\.wav is truncated"):
        warnings.simplefilter("ignore")
        read_all(adapters.get("audio")(tmp_path, target_length=128).dataset("val", False))


def test_an_unreadable_evaluation_file_is_left_out_not_replaced_by_a_neighbour(tmp_path: Path):
    from pathway.adapters.image import read_image

    for i in range(6):
        mf.write_image(tmp_path / "train" / ("a" if i < 3 else "b") / f"{i}.png", seed=i)
    mf.corrupt(tmp_path / "train" / "a" / "1.png", "garbage")
    ad = adapters.get("image")(tmp_path, img_size=32, patch_size=8, max_unreadable_share=0.5)
    ev = ad.dataset("train", train=False)
    with pytest.warns(UserWarning, match=r"1\.png .*left out of the evaluation"):
        batches = list(torch.utils.data.DataLoader(ev, batch_size=4, collate_fn=collate))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert y.tolist() == [0, 0, 1, 1, 1] and ev.unreadable_count() == 1  # 5 items from 5 readable images
    readable = [path for path, _ in ev.samples if path.name != "1.png"]
    torch.testing.assert_close(x, torch.stack([ad.transform(False)(read_image(p)) for p in readable]))
    train, messages = read_all(ad.dataset("train", train=True))  # training: the next file takes the place
    assert len(train) == 6 and not any(isinstance(item, LeftOut) for item in train)
    assert any("next readable file takes its place" in m for m in messages)


def test_an_unreachable_data_root_says_why(tmp_path: Path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(LayoutError, match=r"loop is a symlink loop \(.*loop -> .*loop -> \.\.\."):
        adapters.get("image")(tmp_path / "loop")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(LayoutError, match=r"data root \S+/a/images cannot be read: \S+/a is a symlink loop"):
        adapters.get("image")(tmp_path / "a" / "images")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(LayoutError, match=r"gone is a symlink to \S+/nowhere, which does not exist"):
        adapters.get("image")(tmp_path / "gone")
    with pytest.raises(LayoutError, match=r"\S+/missing does not exist; pass the folder .*data\.root"):
        adapters.get("image")(tmp_path / "missing" / "images")


@pytest.mark.parametrize("name, options, message", [
    ("image", {"patch_size": 0}, r"patch_size=0 must be a whole number >= 1 \(data\.options\.patch_size\)"),
    ("image", {"patch_size": -16}, r"patch_size=-16 must be a whole number >= 1"),
    ("image", {"img_size": "224"}, r"img_size='224' must be a whole number >= 1"),
    ("image", {"img_size": 30, "patch_size": 16}, r"img_size=30 must be a multiple of patch_size=16 \(e\.g\. img_si"),
    ("video", {"tubelet_size": 0}, r"tubelet_size=0 must be"),
    ("video", {"num_frames": 15}, r"num_frames=15 must be a multiple of tubelet_size=2"),
    ("video", {"img_size": 200}, r"img_size=200 must be a multiple of patch_size=16"),
    ("audio", {"patch_size": 0}, r"patch_size=0 must be"),
    ("audio", {"num_mel_bins": 100}, r"num_mel_bins=100 must be a multiple of patch_size=16"),
    ("audio", {"timem": -1}, r"timem=-1 must be a whole number >= 0"),
    ("timeseries", {"patch_size": 0}, r"patch_size=0 must be"),
    ("timeseries", {"in_chans": 0}, r"in_chans=0 must be"),
])
def test_size_options_that_cannot_work_are_refused_by_name(name, options, message):
    with pytest.raises(OptionError, match=message):
        adapters.get(name).spec(4, **options)


def test_a_patch_tokenizer_refuses_a_patch_of_zero():
    from pathway.tokenizers.patch import PatchTokenizer
    from pathway.tokenizers.pos_embed import resample_pos_embed

    with pytest.raises(OptionError, match=r"patch_size \(0, 0\) must be whole numbers >= 1"):
        PatchTokenizer((32, 32), (0, 0), 3, 16)
    with pytest.raises(ValueError, match=r"token grid \(0, 2\) has an axis without tokens"):
        resample_pos_embed(torch.zeros(1, 4, 8), (2, 2), (0, 2))


def test_the_item_list_is_held_in_arrays(image_root: Path):
    import os
    import tracemalloc

    from pathway.adapters.samples import SampleList

    n = 10_000
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        items = [(Path("/data/imagenet/train") / f"n{i // 1300:08d}" / f"n{i // 1300:08d}_{i}.JPEG", i // 1300)
                 for i in range(n)]
        [str(path) for path, _ in items]  # as once the files are opened: each Path caches its string
        as_list = tracemalloc.get_traced_memory()[0] - base
        before_packing = tracemalloc.get_traced_memory()[0]
        packed = SampleList(items)
        as_arrays = tracemalloc.get_traced_memory()[0] - before_packing
    finally:
        tracemalloc.stop()
    assert as_list / n > 300 and packed.nbytes / n < 60 and as_arrays < as_list / 5
    assert list(packed) == items and packed[-1] == items[-1] and len(packed) == n
    with pytest.raises(IndexError):
        packed[n]
    odd = Path(os.fsdecode(b"clips/caf\xe9 \xe2\x88\x95 1.wav"))  # a name that is not UTF-8, and a Unicode slash
    mixed = [(odd, [2, 0]), (Path("/abs/b.wav"), []), (Path("c.wav"), [1])]
    assert list(SampleList(mixed)) == mixed
    others = [(Path("x/p.txt"), Path("x/p.labels")), (Path("x/q.txt"), None)]
    assert list(SampleList(others)) == others
    held = adapters.get("image")(image_root, img_size=32).dataset("val", False).samples  # what a worker copies
    assert isinstance(held, SampleList) and [label for _, label in held] == [0] * 4 + [1] * 4


def test_unusual_image_files_are_read_right_or_named(tmp_path: Path):
    from PIL import Image

    from pathway.adapters.image import read_image

    g = np.meshgrid(np.linspace(0, 65535, 16), np.linspace(0, 65535, 16))
    rgb16 = np.stack([g[0], g[1], np.full((16, 16), 40000.0)], -1).round()
    rgb8 = np.rint(rgb16 * 255 / 65535).astype(np.uint8)
    a, b = tmp_path / "train" / "x\u2215y", tmp_path / "train" / "b"  # a class named with a Unicode slash
    mf.write_png(a / "rgb16.png", rgb16, color_type=2)
    mf.write_png(a / "grey_alpha16.png", rgb16[..., :2], color_type=4)
    mf.write_png(a / "bomb.png", rgb16[:2, :2, :1], color_type=0, size=(20000, 20000))
    a.mkdir(exist_ok=True)
    Image.fromarray(rgb8).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    palette = Image.fromarray(rgb8).quantize(8)
    palette.save(a / "palette.png", transparency=bytes([0] + [255] * 7))  # index 0 fully transparent
    Image.fromarray(rgb8).save(a / "disguised.jpg", format="PNG")  # a PNG under a JPEG name
    Image.fromarray(rgb8[..., 0] > 127).save(a / "bilevel.png")
    (a / "dangling.png").symlink_to(a / "deleted.png")
    mf.write_image(tmp_path / "elsewhere" / "linked.png", size=16)
    b.mkdir()
    (b / "sub").symlink_to(tmp_path / "elsewhere")  # a symlinked sub-folder is followed, as ImageFolder does
    ad = adapters.get("image")(tmp_path, img_size=16, patch_size=8, max_unreadable_share=0.5)
    assert ad.classes == ["b", "x\u2215y"]
    ds = ad.dataset("train", False)
    items, messages = read_kept(ds)
    assert [p.name for p, _ in ds.samples][0] == "linked.png" and len(items) == 7
    assert len(messages) == 2  # the two skips below, and no warning of Pillow's (palette transparency, bombs)
    assert sorted(re.search(r"file \S+/(\S+) \((\w+)", m).groups() for m in messages) == [
        ("bomb.png", "DecompressionBombError"), ("dangling.png", "FileNotFoundError")]
    read = {name: np.asarray(read_image(a / name)).astype(int) for name in ("rgb16.png", "cmyk.jpg", "disguised.jpg")}
    assert np.abs(read["rgb16.png"] - rgb8).max() == 0 and np.abs(read["disguised.jpg"] - rgb8).max() == 0
    assert np.abs(read["cmyk.jpg"] - rgb8).mean() < 3
    grey = np.asarray(read_image(a / "grey_alpha16.png", in_chans=1)).astype(int)
    assert np.abs(grey - rgb8[..., 0]).max() == 0  # alpha dropped, the 16-bit grey scaled
    np.testing.assert_array_equal(read_image(a / "palette.png"), palette.convert("RGB"))
    assert set(np.unique(read_image(a / "bilevel.png", in_chans=1))) == {0, 255}
    (b / "loop").symlink_to(b)
    with pytest.raises(LayoutError, match=r"b/loop is a symlink to \S+/b, a folder this scan .* remove the link"):
        ad.dataset("train", False)


def test_unusual_audio_files_manifests_and_series_are_named(tmp_path: Path):
    import soundfile as sf

    def skipped(messages: list[str]) -> dict[str, str]:
        """File name -> the reason its skip warning gives."""
        found = [re.search(r"skipping unreadable file \S+/(\S+) \((.*?)\); left out", m) for m in messages]
        return dict(match.groups() for match in found if match)  # librosa's own deprecation warnings aside

    clips = tmp_path / "clips"
    mf.write_audio(clips / "fine.wav")
    sf.write(str(clips / "empty.wav"), np.zeros(0, np.float32), 16000)
    (clips / "no_stream.mp3").write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00")  # a tag and no audio
    wave = np.sin(np.arange(1600) / 10).astype(np.float32)
    wave[5] = np.nan
    sf.write(str(clips / "nan.wav"), wave, 16000, subtype="FLOAT")
    rows = "".join(f"clips/{name},/m/a\n" for name in ("fine.wav", "empty.wav", "no_stream.mp3", "nan.wav"))
    (tmp_path / "train.csv").write_text("path,labels\n" + rows, encoding="utf-8-sig")  # a spreadsheet's BOM
    ad = adapters.get("audio")(tmp_path, target_length=64, max_unreadable_share=1.0)
    items, messages = read_kept(ad.dataset("train", False))
    assert ad.classes == ["/m/a"] and len(items) == 1
    assert skipped(messages) == {
        "empty.wav": f"UnreadableFileError: {clips}/empty.wav decodes to no samples",
        "no_stream.mp3": f"UnreadableFileError: {clips}/no_stream.mp3: neither soundfile nor audioread can decode "
                         f"it (no audio stream, or not an audio file)",
        "nan.wav": "ParameterError: Audio buffer is not finite everywhere",
    }
    (tmp_path / "val.csv").write_text("path,labels\nclips/fine.wav,/m/a\n./clips/fine.wav,/m/a\n")
    with pytest.raises(LayoutError, match=r"line 3: './clips/fine.wav' is listed again \(first on line 2\)"):
        ad.dataset("val", False)
    (tmp_path / "val.csv").write_bytes("path,labels\nclips/fine.wav,/m/caf\u00e9\n".encode("latin-1"))
    with pytest.raises(LayoutError, match=r"val\.csv is not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8"):
        ad.dataset("val", False)
    calm = tmp_path / "train" / "calm"
    mf.write_series(calm / "fine.npy", channels=2)
    np.save(calm / "complex.npy", (np.arange(20) + 1j).reshape(2, 10))
    np.save(calm / "objects.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    series = adapters.get("timeseries")(tmp_path, in_chans=2, length=16, patch_size=8, max_unreadable_share=1.0)
    items, messages = read_kept(series.dataset("train", False))
    reasons = skipped(messages)
    assert len(items) == 1 and sorted(reasons) == ["complex.npy", "objects.npy"]
    assert reasons["complex.npy"].startswith(f"UnreadableFileError: {calm}/complex.npy: holds complex128 values")
    assert reasons["objects.npy"] == "ValueError: Object arrays cannot be loaded when allow_pickle=False"
