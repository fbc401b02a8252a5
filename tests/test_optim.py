"""The engine's optimizer: lambda in the layer-wise lr decay, the fix setting (LARS, probe head, frozen body),
and the options that do not fit a task. Tiny connected models (width 16, depth 3), CPU, no data."""

from __future__ import annotations

import pytest
import torch

import pathway
from pathway.adapters import registry as adapters
from pathway.errors import OptionError
from pathway.train.config import Recipe
from pathway.train.model import build_transformer
from pathway.train.optim import LarsWithAdamW, build_mixup, build_optimizer

DEPTH, DECAY = 3, 0.5


def recipe(**optim) -> Recipe:
    r = Recipe()
    r.model.embed_dim, r.model.depth, r.model.num_heads, r.model.drop_path = 16, DEPTH, 2, 0.0
    for key, value in optim.items():
        setattr(r.optim, key, value)
    return r


def connected(r: Recipe, head: str = "linear"):
    torch.manual_seed(0)
    spec = adapters.get("timeseries").spec(3, in_chans=2, length=32, patch_size=8, head=head)
    target, aux = build_transformer(r, spec), build_transformer(r, spec, aux=True)
    pathway.connect(target, aux, train_aux=False)
    return target


def lambda_scales(optimizer, model) -> dict[str, float]:
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    return {name: scale_of[id(p)] for name, p in pathway.lambdas(model).items()}


def test_lambda_of_block_i_gets_block_i_layer_decay():
    r = recipe(lr=1e-3, lambda_lr=1e-2, layer_decay=DECAY)
    model = connected(r)
    scales = lambda_scales(build_optimizer(model, r, 1e-3, log=lambda _: None), model)
    assert len(scales) == 4 * DEPTH  # qkv, proj, fc1, fc2 per block
    n_layers = DEPTH + 1
    for name, scale in scales.items():
        block = int(name.split(".")[1])
        assert scale == pytest.approx(10 * DECAY ** (n_layers - (block + 1))), name
    flat = lambda_scales(build_optimizer(model, r, 1e-3, log=lambda _: None, lambda_layer_decay=False), model)
    assert list(flat.values()) == pytest.approx([10.0] * len(flat))


def test_fix_setting_trains_only_the_probe_head_and_lambda_with_lars():
    r = recipe(lr=0.5, lambda_lr=1e-3, weight_decay=0.0)
    r.pathway["freeze_target"], r.pathway["train_aux"] = True, False
    model = connected(r, head="probe")
    opt = build_optimizer(model, r, 0.5, log=lambda _: None, kind="lars")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    lambda_names = {n for n, p in model.named_parameters() if any(p is q for q in pathway.lambdas(model).values())}
    assert trained == {"head.fc.weight", "head.fc.bias"} | lambda_names and len(lambda_names) == 4 * DEPTH
    assert isinstance(opt, LarsWithAdamW) and {id(p) for g in opt.adamw.param_groups for p in g["params"]} == {
        id(p) for p in pathway.lambdas(model).values()}
    assert isinstance(model.head.bn, torch.nn.BatchNorm1d) and not model.head.bn.affine

    # one step of MAE's LARS (util/lars.py) by hand on the head: trust ratio on the matrix, plain step on the bias
    x = torch.randn(4, 2, 32)
    model(x).square().sum().backward()
    w, b = model.head.fc.weight, model.head.fc.bias
    gw, gb, w0, b0 = w.grad.clone(), b.grad.clone(), w.detach().clone(), b.detach().clone()
    for g in opt.param_groups:
        g["lr"] = 0.5 * g["lr_scale"]
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * (0.001 * w0.norm() / gw.norm()) * gw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)
    assert all(p.abs().max() > 0 for p in pathway.lambdas(model).values())  # AdamW moved lambda off 0

    baseline = recipe(lr=0.5, lambda_lr=1e-3)
    baseline.pathway["freeze_target"] = True
    baseline.aux.enabled = False
    plain = build_transformer(
        baseline, adapters.get("timeseries").spec(3, in_chans=2, length=32, patch_size=8, head="probe")
    )
    build_optimizer(plain, baseline, 0.5, log=lambda _: None, kind="lars")
    assert {n for n, p in plain.named_parameters() if p.requires_grad} == {"head.fc.weight", "head.fc.bias"}


def test_lars_needs_a_lambda_lr_and_fix_setting_refuses_a_trained_aux():
    r = recipe(lr=0.5, weight_decay=0.0)
    r.pathway["freeze_target"], r.pathway["train_aux"] = True, False
    with pytest.raises(OptionError, match="optim.lambda_lr"):
        build_optimizer(connected(r), r, 0.5, log=lambda _: None, kind="lars")
    r.pathway["train_aux"] = True
    with pytest.raises(OptionError, match="pathway.train_aux"):
        build_optimizer(connected(r), r, 0.5, log=lambda _: None)
    with pytest.raises(OptionError, match="sgd"):
        build_optimizer(connected(recipe()), recipe(), 0.5, log=lambda _: None, kind="sgd")


def test_batch_mixup_on_multilabel_or_segmentation_is_refused_by_name():
    r = recipe()
    r.train.mixup = 0.5
    with pytest.raises(OptionError, match=r"train\.mixup=0\.5 .*data\.options\.mixup"):
        build_mixup(r, 4, "multilabel")
    with pytest.raises(OptionError, match=r"train\.mixup"):
        build_mixup(r, 4, "segmentation")
    assert build_mixup(r, 4, "classification") is not None
    r.train.mixup, r.train.label_smoothing = 0.0, 0.1
    with pytest.raises(OptionError, match="train.label_smoothing"):
        build_mixup(r, 4, "multilabel")
    assert build_mixup(r, 4, "classification") is None  # smoothing without mixup: the loss applies it


def test_a_lambda_before_the_body_takes_layer_0():
    r = recipe(lr=1e-3, lambda_lr=1e-2, layer_decay=DECAY)
    spec = adapters.get("timeseries").spec(3, in_chans=2, length=32, patch_size=8)
    target, aux = build_transformer(r, spec), build_transformer(r, spec, aux=True)
    pathway.connect(target, aux, train_aux=False, segments=["pre", "body"], kinds=["linear", "conv"])
    scales = lambda_scales(build_optimizer(target, r, 1e-3, log=lambda _: None), target)
    assert scales["tokenizer.proj.weight"] == pytest.approx(10 * DECAY ** (DEPTH + 1))  # the patch embedding's layer
    assert scales["blocks.0.attn.qkv.weight"] == pytest.approx(10 * DECAY ** DEPTH)
