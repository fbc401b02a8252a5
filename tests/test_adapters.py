"""Adapters read real files written here (PIL, soundfile, open3d, PyAV), skip broken ones, and explain bad layouts."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pathway.adapters as adapters
from pathway.adapters import Adapter, LayoutError, OptionError, UnreadableFileError
from pathway.tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
import make_files as mf  # noqa: E402


def read_all(ds) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    return items, [str(w.message) for w in caught]


# ---------------------------------------------------------------- registry and import


def test_import_is_light_and_registry_lists_builtins():
    code = (
        "import sys, pathway.adapters as a; "
        "print(sorted(m for m in ('PIL', 'open3d', 'librosa', 'decord', 'av', 'soundfile', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert {"image", "video", "audio", "point", "point_part", "timeseries"} <= set(adapters.available())
    assert adapters.get("image").name == "image" and issubclass(adapters.get("image"), Adapter)
    with pytest.raises(KeyError, match="available: .*image"):
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
    torch.testing.assert_close(ad_full.dataset("val", False)[5][0], torch.from_numpy(ref.transpose(2, 0, 1)).float(), rtol=0, atol=1e-5)
    xt, _ = ad.dataset("train", train=True)[0]
    assert xt.shape == (3, 32, 32)
    tok = ad.tokenizer(16)
    assert isinstance(tok, Tokenizer)
    out = tok.encode(torch.stack([x, xt]))
    assert ad.head(16)(out.tokens, out).shape == (2, 2)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_image_adapter_skips_broken_files(image_root: Path, how: str):
    bad = mf.corrupt(image_root / "train" / "cat" / "1.jpg", how)
    ad = adapters.get("image")(image_root, img_size=32, patch_size=8)
    items, messages = read_all(ad.dataset("train", True))
    assert len(items) == 8 and ad.skipped == 1
    assert sum(str(bad) in m for m in messages) == 1
    strict = adapters.get("image")(image_root, img_size=32, strict=True)
    with pytest.raises(UnreadableFileError, match=str(bad)):
        read_all(strict.dataset("train", True))


def test_skip_count_is_shared_with_workers(image_root: Path):
    mf.corrupt(image_root / "train" / "dog" / "0.png", "garbage")
    ad = adapters.get("image")(image_root, img_size=32)
    loader = torch.utils.data.DataLoader(ad.dataset("train", False), batch_size=4, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert sum(len(b[1]) for b in batches) == 8 and ad.skipped == 1


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
