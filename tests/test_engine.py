"""The engine: schedule, metrics, model, a whole tiny run (fold check, timm export, logs, plots),
NaN stop, corrupt checkpoints, MAE pretraining. Tiny models (width 32, depth 2), a few steps, CPU."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from pathway.train.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "recipes" / "demo" / "image.yaml"


def tiny(data_root: Path, out: Path, name: str, *extra: str) -> list[str]:
    """Overrides that shrink the image demo to a few seconds."""
    return [f"data.root={data_root}", f"output.dir={out}", f"output.name={name}", "model.embed_dim=32",
            "model.depth=2", "model.num_heads=2", "data.batch_size=16", "train.epochs=1", "train.max_steps=6",
            "train.log_every=2", "optim.warmup_epochs=0.1", *extra]


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    from pathway.train.demo_data import make_demo_data

    return make_demo_data("image", tmp_path_factory.mktemp("data") / "image", per_class=30)


# -- pure pieces --------------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_and_mae_scaling():
    from pathway.train.schedule import lr_at, scaled_lr

    lrs = [lr_at(s, base_lr=1.0, total_steps=100, warmup_steps=10, min_lr=0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up to the peak
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then monotone decay
    assert lrs[55] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_at(100, base_lr=1.0, total_steps=100, warmup_steps=10, min_lr=0.01) == pytest.approx(0.01)
    assert scaled_lr(1e-3, 1024) == pytest.approx(4e-3)  # MAE: blr * bs / 256


def test_metrics_against_references():
    from sklearn.metrics import average_precision_score

    from pathway.train.metrics import average_views, mean_average_precision, part_miou, topk_accuracy

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(50, 7, generator=g), torch.randint(0, 7, (50,), generator=g)
    acc = topk_accuracy(logits, target)
    assert acc["top1"] == pytest.approx((logits.argmax(1) == target).float().mean().item() * 100)
    ranks = (logits > logits.gather(1, target[:, None])).sum(1)
    assert acc["top5"] == pytest.approx((ranks < 5).float().mean().item() * 100)

    multi = (torch.rand(40, 5, generator=g) > 0.6).float()
    scores = torch.randn(40, 5, generator=g)
    ref = average_precision_score(multi.numpy(), scores.numpy(), average="macro")
    assert mean_average_precision(scores, multi)["map"] == pytest.approx(100 * ref, abs=1e-4)

    # two shapes of one category, parts {0, 1}: IoUs (1 + 1/3) / 2 and 1 -> instance mean 5/6
    target_seg = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]])
    seg_logits = torch.nn.functional.one_hot(pred, 2).float()
    res = part_miou(seg_logits, target_seg, torch.tensor([0, 0]), {0: [0, 1]})
    assert res["inst_miou"] == pytest.approx(100 * ((0.5 + 2 / 3) / 2 + 1) / 2)

    views = torch.arange(12.0).view(6, 2)  # 3 items x 2 views
    assert torch.equal(average_views(views, 2), torch.tensor([[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]))


def test_transformer_model_keys_and_shapes(image_data):
    from pathway.train.model import build_adapter, build_transformer

    r = load_recipe(IMAGE, [f"data.root={image_data}", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
                            "model.cls_token=true"])
    adapter = build_adapter(r)
    model = build_transformer(r, adapter)
    keys = set(model.state_dict())
    for k in ("cls_token", "tokenizer.proj.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight",
              "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight", "blocks.0.norm1.weight", "norm.weight"):
        assert k in keys
    x = torch.stack([adapter.dataset("train", True)[i][0] for i in range(3)])
    assert model(x).shape == (3, adapter.num_classes)


# -- a whole run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(image_data, tmp_path_factory):
    from pathway.train.engine import train

    out = tmp_path_factory.mktemp("runs")
    r = load_recipe(IMAGE, tiny(image_data, out, "run", "pathway.lambda_init=0.2", "train.ema=true",
                                "train.ema_decay=0.9", "train.mixup=0.8", "train.cutmix=1.0",
                                "train.label_smoothing=0.1", "optim.accum_steps=2"))
    return train(r, progress=False), r


def test_run_writes_logs_plots_and_folded_model(finished_run):
    result, recipe = finished_run
    run = recipe.run_dir
    assert result["step"] == 6
    for name in ("recipe.yaml", "metrics.jsonl", "lambdas.jsonl", "train.csv", "eval.csv", "curves.png",
                 "lambdas.png", "model.safetensors", "model_timm.safetensors", "model_timm.json", "result.json"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all(r["lambda_abs"] > 0 and r["samples_per_s"] > 0 and math.isfinite(r["loss"]) for r in train_rows)
    assert {"top1", "top5", "ema_top1"} <= set(result["metrics"])
    assert load_recipe(run / "recipe.yaml").to_dict() == {**recipe.to_dict()}  # resolved recipe saved
    installed = importlib.util.find_spec("tensorboard") is not None
    assert recipe.train.tensorboard is None and (run / "tensorboard").is_dir() == installed  # default: if installed


def test_fold_is_checked_and_folded_file_is_plain(finished_run):
    from safetensors.torch import load_file

    from pathway.train.model import build_adapter, build_transformer

    result, recipe = finished_run
    info = json.loads((recipe.run_dir / "result.json").read_text())
    assert info["fold_max_abs_diff"] < 1e-5
    lam = json.loads((recipe.run_dir / "lambdas.jsonl").read_text().splitlines()[-1])
    assert any(abs(v - 0.2) > 1e-4 for k, v in lam.items() if k != "step")  # lambdas trained, fold is not trivial
    plain = build_transformer(recipe, build_adapter(recipe))
    plain.load_state_dict(load_file(str(recipe.run_dir / "model.safetensors")), strict=True)


def test_timm_export_loads_strict_with_same_outputs(finished_run):
    import timm
    from safetensors.torch import load_file

    from pathway.train.model import build_adapter, build_transformer

    _, recipe = finished_run
    run = recipe.run_dir
    kwargs = json.loads((run / "model_timm.json").read_text())["kwargs"]
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    vit.load_state_dict(load_file(str(run / "model_timm.safetensors")), strict=True)
    ours = build_transformer(recipe, build_adapter(recipe)).eval()
    ours.load_state_dict(load_file(str(run / "model.safetensors")), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (vit(x) - ours(x)).abs().max().item() < 1e-5


def test_nan_loss_stops_after_saving(image_data, tmp_path, monkeypatch):
    """Fault injection: the 3rd loss is NaN. The run stops with a message; the last safe state is on disk; the run
    folder's lock is released."""
    import fcntl

    import pathway.train.engine as engine
    from pathway.train.checkpoint import load_latest
    from pathway.train.owned import _HELD, LOCK

    real, calls = engine.compute_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(engine, "compute_loss", poisoned)
    r = load_recipe(IMAGE, tiny(image_data, tmp_path, "nan"))
    with pytest.raises(engine.NonFiniteLossError, match="loss is nan at step 2.*last finite state is saved"):
        engine.train(r, progress=False)
    path, state = load_latest(r.run_dir / "checkpoints")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    with (r.run_dir / LOCK).open("a") as lock:  # the run released its folder: another holder gets the lock at once
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert r.run_dir.resolve() not in _HELD  # nothing left open for the interpreter's exit (no ResourceWarning)


def test_corrupt_checkpoint_is_named_and_previous_used(tmp_path):
    from pathway.train.checkpoint import CheckpointError, load_latest, save_checkpoint

    base = {"model": {"w": torch.ones(3)}, "optimizer": {}, "epoch": 0, "position": 0, "rng": [], "recipe": {}}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {**base, "step": step}, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    newest = tmp_path / "ckpt-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:50])  # truncated, as by a full disk
    messages = []
    path, state = load_latest(tmp_path, log=messages.append)
    assert state["step"] == 2 and path.name == "ckpt-00000002.pt"
    assert str(newest) in messages[0] and "unreadable" in messages[0]
    (tmp_path / "ckpt-00000002.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="ckpt-00000002.pt.*ckpt-00000003.pt|ckpt-00000003.pt.*ckpt-00000002.pt"):
        load_latest(tmp_path, log=messages.append)


@pytest.mark.parametrize("adapter, opts", [
    ("image", ["data.options={img_size: 32, patch_size: 8, auto_augment: null, re_prob: 0.0}"]),
    ("point", ["data.options={num_points: 128, num_groups: 8, group_size: 16}"]),
])
def test_mae_pretrain_gives_an_aux_checkpoint(adapter, opts, tmp_path):
    from pathway.train.demo_data import make_demo_data
    from pathway.train.model import build_adapter, build_transformer, init_from_checkpoint
    from pathway.train.pretrain import pretrain

    root = make_demo_data(adapter, tmp_path / adapter, per_class=10)
    over = [f"data.root={root}", f"output.dir={tmp_path}", "output.name=mae",
            "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.batch_size=8", "train.epochs=1",
            "train.max_steps=4", "pretrain.decoder_dim=16", "pretrain.decoder_depth=1", "pretrain.decoder_heads=2",
            *opts]
    r = load_recipe(ROOT / "recipes" / "demo" / f"{adapter}.yaml", over)
    out = pretrain(r, progress=False)
    assert math.isfinite(out["last_loss"]) and out["steps"] == 4
    aux = build_transformer(r, build_adapter(r))
    before = aux.blocks[0].attn.qkv.weight.clone()
    line = init_from_checkpoint(aux, out["encoder"], "auto", body_only=True)
    assert "pathway layout" in line and not torch.equal(before, aux.blocks[0].attn.qkv.weight)


def test_chamfer_is_zero_on_identical_sets_and_symmetric():
    from pathway.train.pretrain import chamfer_l2

    a, b = torch.randn(4, 16, 3), torch.randn(4, 16, 3)
    assert chamfer_l2(a, a[:, torch.randperm(16)]).item() == pytest.approx(0.0, abs=1e-6)
    assert chamfer_l2(a, b).item() == pytest.approx(chamfer_l2(b, a).item(), rel=1e-5)


def test_pruning_never_keeps_an_unreadable_later_checkpoint_in_place_of_good_ones(tmp_path):
    from pathway.train.checkpoint import load_latest, save_checkpoint

    base = {"model": {"w": torch.ones(3)}, "optimizer": {}, "epoch": 0, "position": 0, "rng": [], "recipe": {}}
    for step in (2, 3):
        save_checkpoint(tmp_path, {**base, "step": step}, step, keep_last=2)
    (tmp_path / "ckpt-00000009.pt").write_bytes(b"junk")            # a later, unreadable checkpoint
    path, state = load_latest(tmp_path, log=lambda _: None)          # resume falls back to step 3
    assert state["step"] == 3
    for step in (4, 5):                                               # the resumed run goes on, keep_last=1
        save_checkpoint(tmp_path, {**base, "step": step}, step, keep_last=1)
    assert load_latest(tmp_path, log=lambda _: None)[1]["step"] == 5
    assert "ckpt-00000005.pt" in {p.name for p in tmp_path.iterdir()}


# -- evaluation streams views; unreadable files are counted (issue 10, 2.6 and 2.1) -------------------


def test_multiview_evaluation_streams_views_and_averages_probabilities():
    """Views arrive one per row, in any order and batching; an item's softmax probabilities are averaged."""
    from pathway.train.engine import Context, evaluate

    class Table(torch.nn.Module):  # logits looked up by the first value of x
        def __init__(self, rows):
            super().__init__()
            self.rows = torch.nn.Parameter(torch.tensor(rows))

        def forward(self, x):
            return self.rows[x[:, 0].long()]

    # item 0 (label 1): one confident wrong view, two mild right ones; item 1 (label 0): one right view.
    rows = [[4.0, 0.0], [0.0, 1.0], [0.0, 1.2], [2.0, 0.0]]
    views = [(torch.tensor([[0.0], [1.0]]), torch.tensor([1, 1]), torch.tensor([0, 0])),
             (torch.tensor([[3.0], [2.0]]), torch.tensor([0, 1]), torch.tensor([1, 0]))]
    out = evaluate(Table(rows), views, Context(torch.device("cpu")), "top1", "classification")
    item0 = torch.tensor(rows[:3])
    assert item0.mean(0).argmax() == 0 and item0.softmax(1).mean(0).argmax() == 1  # the two rules disagree
    assert out["top1"] == 100.0  # by the probability mean (VideoMAE's merge) both items are right


def test_unreadable_files_are_counted_in_logs_and_result(image_data, tmp_path):
    import shutil

    from pathway.train.engine import train

    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    victim = sorted((data / "train").rglob("*.png"))[0]
    victim.write_bytes(b"not an image")
    r = load_recipe(IMAGE, tiny(data, tmp_path, "skips", "train.log_every=1", "data.num_workers=0"))
    with pytest.warns(UserWarning, match="skipping unreadable file"):
        result = train(r, progress=False)
    assert result["unreadable_files"] == 1
    rows = [json.loads(line) for line in (tmp_path / "skips" / "metrics.jsonl").read_text().splitlines()]
    assert [r["unreadable_files"] for r in rows if r["kind"] == "train"][-1] == 1
    assert json.loads((tmp_path / "skips" / "result.json").read_text())["unreadable_files"] == 1


def test_an_evaluation_batch_of_unreadable_files_only_is_skipped_and_the_files_named(image_data, tmp_path, capsys):
    """Both files of the first validation batch (batch size 2) unreadable: their items are left out, the batch is
    empty and skipped, the run ends, and the user is told which files and how many."""
    import shutil

    from pathway.train.engine import train
    from pathway.train.model import build_adapter

    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    r = load_recipe(IMAGE, tiny(data, tmp_path, "empty-batch", "data.batch_size=2", "train.max_steps=2",
                                "data.num_workers=0"))
    samples = build_adapter(r).dataset("val", train=False).samples
    victims = [Path(samples[i][0]) for i in range(2)]
    for victim in victims:
        victim.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping unreadable file") as seen:
        result = train(r, progress=False)
    warned = " ".join(str(w.message) for w in seen)
    assert all(f"{victim} " in warned for victim in victims) and "left out of the evaluation" in warned
    assert result["step"] == 2 and result["unreadable_files"] == 2 and "top1" in result["metrics"]
    assert "2 unreadable file(s) skipped so far" in capsys.readouterr().out


def test_too_many_unreadable_files_stop_the_run_with_a_clear_error(image_data, tmp_path, capsys):
    import shutil

    from pathway.train.cli import main

    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    for victim in sorted((data / "train").rglob("*.png"))[:3]:
        victim.write_bytes(b"not an image")
    sets = tiny(data, tmp_path, "broken", "data.num_workers=0", "data.options.max_unreadable_share=0.01")
    with pytest.warns(UserWarning, match="skipping unreadable file"):
        code = main(["train", str(IMAGE), "--no-progress"] + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err
    assert code == 2 and "are unreadable, more than max_unreadable_share=0.01" in err


# -- CPU speed settings: bf16 autocast when asked, fused AdamW, fewer checkpoints, cheap per-item seeds ----


def test_cpu_autocast_is_bf16_only_when_asked_and_fp16_is_refused(image_data, tmp_path):
    from pathway.train.config import RecipeError
    from pathway.train.engine import setup

    def amp_of(value: str):
        return setup(load_recipe(IMAGE, tiny(image_data, tmp_path, "amp", "train.device=cpu",
                                             f"train.amp={value}"))).amp_dtype

    assert amp_of("auto") is None and amp_of("fp32") is None
    assert amp_of("bf16") is torch.bfloat16
    with pytest.raises(RecipeError, match="'train.amp' = 'fp16' on the CPU.*train.amp=bf16 or fp32"):
        amp_of("fp16")


def test_adamw_is_fused_on_the_cpu(image_data, tmp_path):
    from pathway.train.engine import build_adapter, build_model
    from pathway.train.optim import build_optimizer

    recipe = load_recipe(IMAGE, tiny(image_data, tmp_path, "fused", "aux.enabled=false"))
    model, _ = build_model(recipe, build_adapter(recipe), log=lambda *_: None)
    optimizer = build_optimizer(model, recipe, 1e-3, log=lambda *_: None)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


def test_checkpoint_epochs_saves_every_k_epochs_and_the_end(image_data, tmp_path):
    from pathway.train.checkpoint import list_checkpoints
    from pathway.train.engine import train

    # 240 training images / 80 = 3 steps an epoch; 3 epochs; a checkpoint after epoch 2 and the final one
    recipe = load_recipe(IMAGE, tiny(image_data, tmp_path, "every2", "data.batch_size=80", "train.epochs=3",
                                     "train.max_steps=9", "train.checkpoint_epochs=2", "train.keep_last=9",
                                     "train.tensorboard=false"))
    train(recipe, progress=False)
    saved = [p.name for p in list_checkpoints(recipe.run_dir / "checkpoints")]
    assert saved == ["ckpt-00000006.pt", "ckpt-00000009.pt"]
    assert not (recipe.run_dir / "tensorboard").exists()  # train.tensorboard=false, installed or not


def test_item_seeds_touch_only_the_cpu_generator(image_data, monkeypatch):
    """torch.manual_seed would reseed CUDA too (and, before CUDA starts, record a stack per item)."""
    from pathway.train.data import SeededItems
    from pathway.train.engine import build_adapter

    recipe = load_recipe(IMAGE, [f"data.root={image_data}"])
    items = SeededItems(build_adapter(recipe).dataset("train", train=True), seed=3)
    first = items[5][0]
    monkeypatch.setattr(torch, "manual_seed", lambda *_: pytest.fail("torch.manual_seed called per item"))
    state = torch.random.get_rng_state()
    assert torch.equal(items[5][0], first)                         # the same augmentation for the same item
    assert torch.equal(torch.random.get_rng_state(), state)        # and the global generator is left as it was
