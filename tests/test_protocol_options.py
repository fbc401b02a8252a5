"""Two options that copy an official protocol: ``optim.repeat_step`` (Point-MAE's segmentation loop steps AdamW
twice per batch, the second time on the same gradients clipped) and ``train.export_ema`` (the EMA weights are the
run's: final test, fold, export, best evaluation). Tiny models, CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pathway.train.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "recipes" / "demo" / "image.yaml"
LR, BETAS, EPS, WD, CLIP = 0.01, (0.9, 0.999), 1e-8, 0.05, 0.1


def adamw_by_hand(w: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], t: int) -> torch.Tensor:
    """One AdamW step written out (decoupled decay, bias-corrected moments), step number ``t`` from 1."""
    state["m"] = BETAS[0] * state["m"] + (1 - BETAS[0]) * g
    state["v"] = BETAS[1] * state["v"] + (1 - BETAS[1]) * g * g
    m_hat, v_hat = state["m"] / (1 - BETAS[0] ** t), state["v"] / (1 - BETAS[1] ** t)
    return w * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + EPS)


def one_engine_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeat_step: bool, scaler=None):
    """``engine.optimizer_step`` on one batch (no accumulation) with torch's AdamW; returns the optimizer."""
    from pathway.train.engine import Context, optimizer_step

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)

    def stop(value: float) -> None:
        raise AssertionError(f"loss {value}")

    optimizer_step(model, iter([(x, y)]), lambda b: (((model(b[0]) - b[1]) ** 2).mean(), b[0].shape[0]), optimizer,
                   scaler, Context(torch.device("cpu")), 1, CLIP, stop, repeat_step=repeat_step)
    return optimizer


def test_repeat_step_is_two_adamw_steps_the_second_on_the_same_gradients_clipped():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(6, 3, dtype=torch.float64)
    x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), 5 * torch.randn(8, 3, generator=g, dtype=torch.float64)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    probe = nn.Linear(6, 3, dtype=torch.float64)  # the batch's gradients at the starting weights
    probe.load_state_dict(start)
    ((probe(x) - y) ** 2).mean().backward()
    grads = {"weight": probe.weight.grad, "bias": probe.bias.grad}
    norm = torch.cat([v.flatten() for v in grads.values()]).norm()
    assert norm > CLIP  # so the clipping acts on the second step
    clipped = {k: v * (CLIP / (norm + 1e-6)) for k, v in grads.items()}  # clip_grad_norm_'s coefficient
    expected = {}
    for k in grads:
        state = {"m": torch.zeros_like(start[k]), "v": torch.zeros_like(start[k])}
        first = adamw_by_hand(start[k], grads[k], state, 1)
        expected[k] = adamw_by_hand(first, clipped[k], state, 2)

    optimizer = one_engine_step(model, x, y, repeat_step=True)
    for k, want in expected.items():
        torch.testing.assert_close(model.state_dict()[k], want, rtol=1e-12, atol=1e-12)
    assert all(s["step"] == 2 for s in optimizer.state.values())  # two optimizer steps for one batch

    single = nn.Linear(6, 3, dtype=torch.float64)  # the plain step (clipped once) is another update
    single.load_state_dict(start)
    one_engine_step(single, x, y, repeat_step=False)
    assert (single.weight - model.weight).abs().max() > 1e-4


def test_repeat_step_refuses_the_fp16_grad_scaler_and_a_missing_clip(tmp_path):
    model = nn.Linear(4, 2)
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    before = model.weight.detach().clone()
    with pytest.raises(RecipeError, match="optim.repeat_step.*fp16 grad scaler.*train.amp=bf16 or fp32"):
        one_engine_step(model, x, y, repeat_step=True, scaler=torch.amp.GradScaler("cpu", enabled=True))
    assert torch.equal(model.weight, before)  # refused before anything was computed or applied
    with pytest.raises(RecipeError, match="'optim.repeat_step' = true.*'optim.clip_grad', which is not set"):
        load_recipe(IMAGE, ["optim.repeat_step=true", "optim.clip_grad=null"])


def test_export_ema_without_ema_is_refused_by_name():
    with pytest.raises(RecipeError, match="'train.export_ema' = true but 'train.ema' = false.*train.ema: true"):
        load_recipe(IMAGE, ["train.export_ema=true", "train.ema=false"])


def test_export_ema_exports_the_folded_ema_not_the_live_weights(tmp_path):
    from safetensors.torch import load_file

    import pathway
    from pathway.train.checkpoint import list_checkpoints, read_state
    from pathway.train.demo_data import make_demo_data
    from pathway.train.engine import train
    from pathway.train.evaluate import fold_checkpoint
    from pathway.train.model import build_adapter, build_model

    data = make_demo_data("image", tmp_path / "data", per_class=8)
    recipe = load_recipe(IMAGE, [f"data.root={data}", f"output.dir={tmp_path}", "output.name=ema", "model.embed_dim=16",
                                 "model.depth=2", "model.num_heads=2", "data.batch_size=16", "train.epochs=1",
                                 "train.max_steps=3", "optim.lr=0.05", "optim.warmup_epochs=0", "output.plots=false",
                                 "pathway.lambda_init=0.2", "train.ema=true", "train.ema_decay=0.9",
                                 "train.export_ema=true"])
    result = train(recipe, progress=False)

    state = read_state(list_checkpoints(recipe.run_dir / "checkpoints")[-1], ("model", "ema", "recipe"))
    adapter = build_adapter(recipe)
    example = adapter.dataset("train", True)[0][0][None]

    def folded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model, _ = build_model(recipe, adapter, example=example, log=lambda _: None)
        model.load_state_dict(tensors, strict=True)
        assert pathway.is_connected(model)  # the fold is not trivial
        pathway.fold(model)
        return model.state_dict()

    ema = folded({k.removeprefix("module."): v for k, v in state["ema"].items()})
    live = folded(state["model"])
    exported = load_file(str(recipe.run_dir / "model.safetensors"))
    assert set(exported) == set(ema)
    for k, v in exported.items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=1e-6, msg=k)
    assert max((exported[k] - live[k]).abs().max().item() for k in exported) > 1e-3  # not the live weights
    fold_checkpoint(list_checkpoints(recipe.run_dir / "checkpoints")[-1], tmp_path / "folded.safetensors")
    assert all(torch.equal(v, load_file(str(tmp_path / "folded.safetensors"))[k]) for k, v in exported.items())

    rows = [r for r in map(json.loads, (recipe.run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "eval"]
    row = rows[-1]
    assert result["weights"] == "ema" and result["best"]["weights"] == "ema"
    assert result["best"]["top1"] == max(r["ema_top1"] for r in rows)  # the best evaluation is the EMA's
    assert result["metrics"]["top1"] == row["ema_top1"] and result["metrics"]["loss"] == row["ema_loss"]
    assert result["live_metrics"]["top1"] == row["top1"] and math.isfinite(result["live_metrics"]["loss"])
