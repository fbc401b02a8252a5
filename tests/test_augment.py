"""Augmentation is not reading: a failed augmentation never marks a file bad; RandAugment's 0-bit posterize
works; too many unreadable files stop the run; AudioMAE's mixup, roll and token masking; VideoMAE's clip
augmentation and repeated clips. Small real files (make_files), CPU, a few seconds."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import make_files as mf
import numpy as np
import pytest
import torch

import pathway.adapters.registry as adapters
from pathway.adapters.base import AugmentationError, TooManyUnreadableFilesError
from pathway.train.data import SeededItems, collate, make_loader


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    for c, cls in enumerate(("cat", "dog")):
        for i in range(5):
            mf.write_image(tmp_path / "train" / cls / f"{i}.png", seed=10 * c + i)
    return tmp_path


def test_rand_augment_posterize_with_zero_bits_gives_black_not_an_error(image_root: Path):
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    transform = adapters.get("image")(image_root, img_size=32).transform(train=True)
    ops = [op for t in transform.transforms for op in getattr(t, "ops", []) if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the draw that keeps 0 bits (mstd0.5 reaches it)
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(op(img)).max() == 0
    with pytest.raises(ValueError, match="bits"):  # what Pillow 13 does with timm's own op
        AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(img)


def test_failed_augmentation_is_redrawn_and_never_marks_the_file(image_root: Path):
    ad = adapters.get("image")(image_root, img_size=32)
    ds = ad.dataset("train", train=True)
    calls = {"n": 0}
    real = ds.augment

    def flaky(image, label, index):  # fails on two draws of three, as a rare op would on an unlucky draw
        calls["n"] += 1
        if calls["n"] % 3:
            raise ValueError("bits must be between or equal to 1 and 8")
        return real(image, label, index)

    ds.augment = flaky
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping unreadable file" warning
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 10 and ds.unreadable_count() == 0 and ad.skipped == 0
    assert [y for _, y in items] == [label for _, label in ds.samples]  # every item is its own file

    ds.augment = lambda image, label, index: (_ for _ in ()).throw(RuntimeError("broken transform"))
    with pytest.raises(AugmentationError, match=r"failed 11 times on .*0\.png.*RuntimeError: broken transform"):
        ds[0]
    assert ds.unreadable_count() == 0


def test_unreadable_files_are_counted_and_too_many_stop_the_run(image_root: Path):
    mf.corrupt(image_root / "train" / "cat" / "0.png", "garbage")
    ok = adapters.get("image")(image_root, img_size=32, max_unreadable_share=0.1)
    ds = ok.dataset("train", train=False)
    with pytest.warns(UserWarning, match="skipping unreadable file .*0.png"):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 10 and ds.unreadable_count() == 1 and ds.unreadable_share() == 0.1 and ok.skipped == 1
    mf.corrupt(image_root / "train" / "dog" / "0.png", "truncated")
    strict_share = adapters.get("image")(
        image_root, img_size=32, max_unreadable_share=0.1
    ).dataset("train", train=False)
    with (
        pytest.warns(UserWarning),
        pytest.raises(TooManyUnreadableFilesError, match=r"2 of the 10 files .*max_unreadable_share=0.1"),
    ):
        [strict_share[i] for i in range(len(strict_share))]
    with pytest.raises(ValueError, match="max_unreadable_share"):
        adapters.get("image")(image_root, max_unreadable_share=5)
    loader = torch.utils.data.DataLoader(  # the share is counted over the workers; the error keeps its class
        adapters.get("image")(image_root, img_size=32, max_unreadable_share=0.1).dataset("train", train=False),
        batch_size=2, num_workers=2, collate_fn=collate)
    with warnings.catch_warnings(), pytest.raises(TooManyUnreadableFilesError, match="max_unreadable_share=0.1"):
        warnings.simplefilter("ignore")
        list(loader)


# ---------------------------------------------------------------- audio (AudioMAE dataset.py)


@pytest.fixture
def audio_root(tmp_path: Path) -> Path:
    mf.write_audio(tmp_path / "clips" / "a.wav", freq=440)
    mf.write_audio(tmp_path / "clips" / "b.wav", freq=880, seconds=0.5)
    (tmp_path / "train.csv").write_text("path,labels\nclips/a.wav,/m/speech\nclips/b.wav,\"/m/music,/m/dog\"\n")
    return tmp_path


def test_audio_mixup_mixes_waveforms_and_labels_as_audiomae(audio_root: Path):
    from pathway.adapters.audio import read_audio

    ad = adapters.get("audio")(audio_root, target_length=128, freqm=0, timem=0, mixup=1.0)
    assert ad.classes == ["/m/dog", "/m/music", "/m/speech"]
    x, y = SeededItems(ad.dataset("train", train=True), seed=0)[0]  # this seed draws b.wav as the partner
    waves = [read_audio(audio_root / "clips" / name, 16000) for name in ("a.wav", "b.wav")]
    lam = float(y[2])
    assert 0 < lam < 1 and y.tolist() == pytest.approx([1 - lam, 1 - lam, lam])
    a, b = (w - w.mean() for w in waves)
    b = torch.nn.functional.pad(b, (0, len(a) - len(b)))  # the partner zero-padded to the clip's length
    mix = lam * a + (1 - lam) * b
    torch.testing.assert_close(x, ad.features(mix - mix.mean(), train=False), atol=1e-4, rtol=1e-4)
    shares = [float(SeededItems(ad.dataset("train", train=True), seed=s)[0][1].max() < 1) for s in range(12)]
    assert 0.2 < sum(shares) / 12 < 0.8  # the partner is drawn uniformly: itself half the time (labels stay 1)
    plain = adapters.get("audio")(audio_root, target_length=128, freqm=0, timem=0)
    assert plain.dataset("train", train=True)[1][1].tolist() == [1, 1, 0]


def test_roll_mag_aug_and_fine_tuning_token_masking():
    from pathway.adapters.audio import AudioAdapter
    from pathway.tokenizers.audio_spectrogram import AudioSpectrogramTokenizer

    ad = AudioAdapter.spec(2, roll_mag_aug=True)
    wave = torch.arange(10.0)
    np.random.seed(7)
    out = ad.roll_and_scale(wave)
    np.random.seed(7)
    shift, gain = np.random.randint(10), np.random.beta(10, 10) + 0.5
    torch.testing.assert_close(out, torch.from_numpy(np.roll(wave.numpy(), shift) * gain).float())

    tok = AudioSpectrogramTokenizer(128, 32, 16, 8, mask_t_prob=0.25, mask_f_prob=0.5)  # grid 8 x 2
    x = torch.randn(3, 1, 128, 32)
    full = tok.eval().encode(x).tokens  # [3, 16, 8]
    masked = tok.train().encode(x).tokens
    assert full.shape == (3, 16, 8) and masked.shape == (3, 6 * 1, 8)  # int(8 * .75) rows x int(2 * .5) columns
    grid = full.view(3, 8, 2, 8)
    for b in range(3):  # every kept token is one of the clip's own tokens, no duplicates
        hits = [(r, c) for t in masked[b] for r in range(8) for c in range(2) if torch.equal(t, grid[b, r, c])]
        assert len(hits) == 6 and len(set(hits)) == 6 and len({c for _, c in hits}) == 1
    assert AudioAdapter.spec(2, mask_t_prob=0.2, mask_f_prob=0.2).tokenizer(8).mask_t_prob == 0.2
    with pytest.raises(ValueError, match="mixup"):
        AudioAdapter.spec(2, mixup=1.5)


# ---------------------------------------------------------------- video (VideoMAE kinetics.py _aug_frame)


def test_video_rand_augment_is_the_same_on_every_frame_and_repeated_clips_flatten(tmp_path: Path):
    from PIL import Image

    from pathway.adapters.video import same_for_every_frame

    mf.write_video(tmp_path / "train" / "up" / "a.mp4", frames=8)
    mf.write_video(tmp_path / "train" / "down" / "b.mp4", frames=8, seed=1)
    ad = adapters.get("video")(tmp_path, num_frames=4, sampling_rate=1, img_size=32, num_sample=2)
    ra = ad.frame_augmentation()
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    random.seed(0), np.random.seed(0)
    outs = same_for_every_frame(ra, [frame] * 4)
    assert all(np.array_equal(np.asarray(o), np.asarray(outs[0])) for o in outs)
    # it does vary per clip
    assert any(not np.array_equal(np.asarray(ra(frame)), np.asarray(outs[0])) for _ in range(5))

    loader, _ = make_loader(ad.dataset("train", train=True), batch_size=2, num_workers=0, seed=0, shuffle=True)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 4, 32, 32) and sorted(y.tolist()) == [0, 0, 1, 1]  # 2 videos x num_sample 2
    assert not torch.equal(x[0], x[1]) or not torch.equal(x[2], x[3])  # independently augmented clips
    with pytest.raises(ValueError, match="num_sample"):
        adapters.get("video")(tmp_path, num_sample=0)


def test_video_test_views_start_where_videomae_starts_them():
    ad = adapters.get("video").spec(400, num_frames=16, sampling_rate=4, test_clips=5, test_crops=3)
    # kinetics.py test mode on 300 frames: 75 frames after subsampling, temporal_step (75 - 16) / 4 = 14.75
    assert [ad.test_clip_start(300, k) for k in range(5)] == [0, 14 * 4, 29 * 4, 44 * 4, 59 * 4]
    assert ad.test_views() == [(k, pos) for k in range(5) for pos in (0.0, 0.5, 1.0)]
    assert adapters.get("video").spec(400, test_clips=1).test_clip_start(100, 0) == (100 - 64) // 2


def test_an_unreadable_mixup_partner_is_marked_not_the_clip(audio_root: Path):
    mf.write_audio(audio_root / "clips" / "c.wav")
    mf.corrupt(audio_root / "clips" / "c.wav", "garbage")
    (audio_root / "train.csv").write_text(
        "path,labels\nclips/a.wav,/m/speech\nclips/b.wav,/m/dog\nclips/c.wav,/m/dog\n"
    )
    ad = adapters.get("audio")(audio_root, target_length=64, freqm=0, timem=0, mixup=1.0, max_unreadable_share=0.5)
    ds = ad.dataset("train", train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(6):  # partners drawn at random: c.wav is drawn and found unreadable on the way
            SeededItems(ds, seed=seed)[0]
    assert [ds.samples[i][0].name for i in range(3) if ds._bad[i]] == ["c.wav"] and ds.unreadable_count() == 1
    none = adapters.get("audio")(audio_root, target_length=64, mixup=1.0, max_unreadable_share=0.0)
    ds = none.dataset("train", train=True)
    with warnings.catch_warnings(), pytest.raises(TooManyUnreadableFilesError, match=r"latest: \S*c\.wav"):
        warnings.simplefilter("ignore")
        for seed in range(6):
            SeededItems(ds, seed=seed)[0]
    assert ds.unreadable_count() == 1 and not ds._bad[0]  # the clip being mixed is not blamed
