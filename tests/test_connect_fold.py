"""Injection and fold: exact equivalences, gradients, training modes, save/load, optimizer groups."""

from __future__ import annotations

import copy
import io
import os
import pickle

import pytest
import torch
import torch.nn as nn
import toy_models as toys

import pathway
from pathway.inject import materialise
from pathway.modules import owners, plain_parameters

CASES = [  # (name, make target, make aux, example input)
    ("timm_vit", lambda: toys.timm_vit(), lambda: toys.timm_vit(classes=0), lambda: torch.randn(2, 3, 32, 32)),
    ("tv_vit_mha", lambda: toys.tv_vit(), lambda: toys.tv_vit(), lambda: torch.randn(2, 3, 32, 32)),
    ("functional_F_linear", lambda: toys.FunctionalNet(), lambda: toys.FunctionalNet(), lambda: toys.tokens()),
    ("no_bias", lambda: toys.FunctionalNet(bias=False), lambda: toys.FunctionalNet(bias=False), lambda: toys.tokens()),
    ("encoder_layer", lambda: toys.EncoderNet(), lambda: toys.EncoderNet(), lambda: toys.tokens()),
    ("gpt2_conv1d", lambda: toys.hf_gpt2(), lambda: toys.hf_bert(), lambda: torch.randint(0, 100, (2, 6))),
]


def forward(model, x):
    out = model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def set_lambdas(model, value=None):
    for lam in pathway.lambdas(model).values():
        lam.data.copy_(torch.full_like(lam, value) if value is not None else torch.randn_like(lam) * 0.5)


def by_hand(target, aux, report):
    """A plain copy of the target whose weights were set to W + lambda * W_aux by hand."""
    plain = copy.deepcopy(target)
    pathway.fold(plain)            # only to get plain modules back; weights reset below
    params = plain_parameters(aux)
    lambdas = pathway.lambdas(target)
    with torch.no_grad():
        for pair in report.pairs:
            module, name = owners(plain, pair.target)[0]
            original = target.get_submodule(pair.target.rpartition(".")[0]).parametrizations[name].original
            getattr(module, name).copy_(original + lambdas[pair.target] * materialise(pair, params))
    return plain


@pytest.mark.parametrize("name, make_target, make_aux, make_x", CASES, ids=[c[0] for c in CASES])
def test_connect_then_fold_is_exact(name, make_target, make_aux, make_x):
    target, aux, x = make_target().eval(), make_aux().eval(), make_x()
    with torch.no_grad():   # zero-initialised heads (torchvision) must not hide errors
        for p in [*target.parameters(), *aux.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    keys, names = list(target.state_dict()), [n for n, _ in target.named_parameters()]
    n_params = sum(p.numel() for p in target.parameters())
    cls_before = {n: type(m) for n, m in target.named_modules()}
    with torch.no_grad():
        plain_out = forward(target, x)
    report = pathway.connect(target, aux)
    assert pathway.is_connected(target) and len(pathway.lambdas(target)) == len(report.pairs)
    with torch.no_grad():
        assert torch.equal(forward(target, x), plain_out)          # lambda = 0: exactly the plain model
    set_lambdas(target)
    with torch.no_grad():
        connected_out = forward(target, x)
        hand_out = forward(by_hand(target, aux, report), x)
    assert not torch.allclose(connected_out, plain_out, atol=1e-3)
    torch.testing.assert_close(connected_out, hand_out, atol=1e-5, rtol=1e-5)

    assert pathway.fold(target) is target
    with torch.no_grad():
        torch.testing.assert_close(forward(target, x), connected_out, atol=1e-5, rtol=1e-5)
    assert not pathway.is_connected(target)
    assert list(target.state_dict()) == keys                       # in the original order: weight before bias
    assert [n for n, _ in target.named_parameters()] == names
    assert sum(p.numel() for p in target.parameters()) == n_params
    assert {n: type(m) for n, m in target.named_modules()} == cls_before
    fresh = make_target()
    fresh.load_state_dict(target.state_dict(), strict=True)
    pickle.loads(pickle.dumps(target))                             # parametrized modules cannot be pickled
    torch.save(target, io.BytesIO())


def test_gradients_reach_lambda_and_aux_weights():
    target = toys.timm_vit()
    pathway.connect(target, toys.timm_vit())
    target(torch.randn(2, 3, 32, 32)).sum().backward()
    pw = target.blocks[0].attn.qkv.parametrizations.weight[0]
    assert pw.scale.grad is not None and pw.scale.grad.abs() > 0
    assert pw.aux_weight.grad is not None       # zero at lambda = 0, but present: DDP sees it used
    assert target.blocks[0].attn.qkv.parametrizations.weight.original.grad.abs().sum() > 0


def test_frozen_aux_fixed_lambda_and_fixed_target_modes():
    target = toys.timm_vit()
    pathway.connect(target, toys.timm_vit(), train_aux=False, train_lambda=True, freeze_target=True)
    pw = target.blocks[0].mlp.fc1.parametrizations.weight[0]
    assert not pw.aux_weight.requires_grad and pw.scale.requires_grad
    assert not target.blocks[0].mlp.fc1.parametrizations.weight.original.requires_grad
    trainable = {id(p) for g in pathway.param_groups(target, 1e-3, 0.05) for p in g["params"]}
    assert id(pw.aux_weight) not in trainable and id(pw.scale) in trainable
    target(torch.randn(2, 3, 32, 32)).sum().backward()
    assert pw.aux_weight.grad is None and pw.scale.grad is not None
    pathway.fold(target)
    assert target.blocks[0].mlp.fc1.weight.requires_grad          # restored as it was before connect

    fixed = toys.timm_vit()
    pathway.connect(fixed, toys.timm_vit(), train_lambda=False, lambda_init=1e-2)
    assert all(not lam.requires_grad and lam.item() == pytest.approx(1e-2) for lam in pathway.lambdas(fixed).values())


def test_per_channel_lambda_and_lambda_init_by_depth():
    target = toys.hf_gpt2().eval()
    pathway.connect(target, toys.hf_gpt2(), lambda_shape="channel",
                    lambda_init=lambda name, block: 0.1 * (block + 1))
    lams = pathway.lambdas(target)
    assert lams["h.0.attn.c_attn.weight"].shape == (1, 192)      # Conv1D stores [in, out]: channels last
    assert lams["h.1.mlp.c_fc.weight"].flatten()[0].item() == pytest.approx(0.2)
    x = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        before = target(x).last_hidden_state
    pathway.fold(target)
    with torch.no_grad():
        torch.testing.assert_close(target(x).last_hidden_state, before, atol=1e-5, rtol=1e-5)


def test_several_pathways_add_up_and_fold():
    target, aux1, aux2 = toys.timm_vit(), toys.timm_vit(), toys.timm_vit()
    w = target.blocks[0].mlp.fc1.weight.detach().clone()
    reports = pathway.connect(target, [aux1, aux2])
    assert len(reports) == 2 and len(pathway.lambdas(target)) == 16
    lams = pathway.lambdas(target)
    lams["blocks.0.mlp.fc1.weight#0"].data.fill_(0.5)
    lams["blocks.0.mlp.fc1.weight#1"].data.fill_(-0.25)
    expected = w + 0.5 * aux1.blocks[0].mlp.fc1.weight - 0.25 * aux2.blocks[0].mlp.fc1.weight
    torch.testing.assert_close(target.blocks[0].mlp.fc1.weight, expected)
    pathway.connect(target, toys.timm_vit())                          # connecting again adds a third
    assert len(pathway.lambdas(target)) == 24
    pathway.fold(target)
    torch.testing.assert_close(target.blocks[0].mlp.fc1.weight, expected)


def test_tied_target_weight_keeps_its_tie():
    target = toys.TiedNet()
    report = pathway.connect(target, toys.TiedNet())
    assert any(p.target == "blocks.0.up.weight" for p in report.pairs)
    set_lambdas(target, 0.3)
    x = toys.tokens()
    with torch.no_grad():
        out = target(x)
    pathway.fold(target)
    with torch.no_grad():
        torch.testing.assert_close(target(x), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    target = toys.timm_vit()
    pathway.connect(target, toys.timm_vit())
    set_lambdas(target, 0.1)
    with torch.autocast("cpu", dtype=dtype):
        out = target(torch.randn(2, 3, 32, 32))
    assert out.dtype == dtype
    out.float().sum().backward()
    lam = pathway.lambdas(target)["blocks.0.attn.qkv.weight"]
    assert lam.grad is not None and lam.grad.dtype == torch.float32 and torch.isfinite(lam.grad)


def test_torch_compile():
    target = toys.timm_vit()
    pathway.connect(target, toys.timm_vit())
    set_lambdas(target, 0.1)
    x = torch.randn(2, 3, 32, 32)
    eager = target(x)
    compiled = torch.compile(target)
    out = compiled(x)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert pathway.lambdas(target)["blocks.0.attn.qkv.weight"].grad is not None


def test_ddp_sees_no_unused_parameters(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        target = toys.timm_vit()
        pathway.connect(target, toys.timm_vit())
        model = DDP(target, find_unused_parameters=False)
        opt = torch.optim.AdamW(pathway.param_groups(target, 1e-3, 0.05))
        for _ in range(2):           # an unused parameter fails on the second step
            opt.zero_grad()
            model(torch.randn(2, 3, 32, 32)).sum().backward()
            opt.step()
        assert pathway.lambdas(target)["blocks.0.attn.qkv.weight"].item() != 0.0
    finally:
        dist.destroy_process_group()


def test_state_dict_round_trip_and_save_load(tmp_path):
    target, aux = toys.tv_vit(), toys.tv_vit()
    pathway.connect(target, aux)
    set_lambdas(target)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = target(x)
    copy_ = toys.tv_vit()
    pathway.connect(copy_, toys.tv_vit())
    copy_.load_state_dict(target.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), out)

    path = tmp_path / "connected.safetensors"
    pathway.save(target, path)
    restored = pathway.load(toys.tv_vit(), path)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), out)
    pathway.fold(restored)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(pathway.PathwayError, match="plain target"):
        pathway.load(copy_, path)


def test_param_groups():
    target = toys.timm_vit(depth=2)
    pathway.connect(target, toys.timm_vit(depth=2))
    groups = pathway.param_groups(target, lr=1e-3, weight_decay=0.05, lambda_lr=1e-2, layer_decay=0.5)
    by_name = {g["name"]: g for g in groups}
    lam = by_name["lambda"]
    assert lam["weight_decay"] == 0.0 and lam["lr"] == pytest.approx(1e-2) and len(lam["params"]) == 8
    assert all(p.dim() == 0 for p in lam["params"])
    assert by_name["decay_layer1"]["lr"] == pytest.approx(1e-3 * 0.5 ** 2)       # blocks.0, 3 layers
    assert by_name["no_decay_layer0"]["weight_decay"] == 0.0                     # cls_token, pos_embed
    assert by_name["decay_layer3"]["lr_scale"] == 1.0                            # head
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(p.dim() >= 2 for p in target.parameters() if id(p) in decayed)
    pw = target.blocks[1].attn.qkv.parametrizations.weight[0]
    assert id(pw.aux_weight) in decayed                                           # as the official code
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in target.parameters() if p.requires_grad)


def test_fold_refuses_a_plain_model():
    with pytest.raises(pathway.NotConnectedError):
        pathway.fold(nn.Linear(2, 2))


def test_fold_keeps_float64_exact_and_folds_modules_with_several_weights():
    target = toys.timm_vit().double()
    before = target.blocks[0].attn.qkv.weight.detach().clone()
    pathway.connect(target, toys.timm_vit().double())
    pathway.fold(target)
    assert torch.equal(target.blocks[0].attn.qkv.weight, before)       # lambda 0: no rounding through fp32

    for make in (toys.BareNet, lambda: nn.MultiheadAttention(16, 2, vdim=8, batch_first=True)):
        target, aux = make(), make()
        if make is toys.BareNet:
            options = {"target_inputs": toys.tokens(1, 5, 8)}
        else:   # one attention module, no repeated blocks: its weights are all "pre"; separate q/k/v weights
            qkv = (torch.randn(1, 5, 16), torch.randn(1, 5, 16), torch.randn(1, 5, 8))
            options = {"target_inputs": qkv, "aux_inputs": qkv, "segments": ("pre",)}
        report = pathway.connect(target, aux, **options)
        set_lambdas(target, 0.2)
        assert len(report.pairs) == 4
        pathway.fold(target)
        assert not pathway.is_connected(target)


def test_compiled_model_keeps_the_users_names(tmp_path):
    target = toys.timm_vit()
    compiled = torch.compile(target, backend="eager")
    pathway.connect(compiled, toys.timm_vit())
    assert all(not name.startswith("_orig_mod") for name in pathway.lambdas(compiled))
    groups = {g["name"]: g for g in pathway.param_groups(compiled, 1e-3, 0.05)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert id(target.pos_embed) not in decayed and len(groups["lambda"]["params"]) == 8
    pathway.save(compiled, tmp_path / "c.safetensors")
    restored = pathway.load(toys.timm_vit(), tmp_path / "c.safetensors")
    assert set(pathway.lambdas(restored)) == set(pathway.lambdas(compiled))


def test_bf16_model_folds_to_exactly_what_it_computed():
    target = toys.timm_vit().to(torch.bfloat16).eval()
    pathway.connect(target, toys.timm_vit().to(torch.bfloat16))
    set_lambdas(target, 0.1234567)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        connected = target(x)
        pathway.fold(target)
        assert torch.equal(target(x), connected)


def test_a_connected_aux_gives_its_effective_weights():
    aux, inner = toys.timm_vit(classes=0), toys.timm_vit(classes=0)
    pathway.connect(aux, inner)
    set_lambdas(aux, 1.0)
    target = toys.timm_vit()
    pathway.connect(target, aux)
    built = dict(pathway_aux_tensors(target))
    fc2 = aux.blocks[1].mlp.fc2
    assert torch.equal(built["blocks.1.mlp.fc2.weight"], fc2.weight)            # W + 1 * W_inner, as aux computes
    assert not torch.equal(built["blocks.1.mlp.fc2.weight"], fc2.parametrizations.weight.original)


def pathway_aux_tensors(model):
    from pathway.modules import pathway_sites

    return [(name, pathways[-1].aux_weight) for name, _, _, pathways in pathway_sites(model)]


def test_save_pretrained_writes_a_folder_from_pretrained_loads_to_the_same_outputs(tmp_path):
    from transformers import BertModel

    target = toys.hf_bert(dim=32, heads=2).eval()
    pathway.connect(target, toys.hf_bert(dim=32, heads=2))
    set_lambdas(target)
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        expected = target(ids).last_hidden_state
    target.save_pretrained(tmp_path)
    plain = BertModel.from_pretrained(tmp_path).eval()          # a plain model holding the effective weights
    assert not pathway.is_connected(plain)
    with torch.no_grad():
        assert torch.equal(plain(ids).last_hidden_state, expected)
    # the plain keys beside the connected state are skipped by a connected model, unless its own state is missing
    with pytest.raises(RuntimeError, match=r"Missing key\(s\)[^\n]*parametrizations\.weight\.original"):
        target.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("scale_shape", [(), (6, 1), (1, 5), (6, 1, 1, 1)], ids=["scalar", "rows", "cols", "conv"])
def test_custom_gradient_matches_the_plain_formula(scale_shape):
    from pathway.layer import AddScaled

    shape = (6, 5) if len(scale_shape) < 3 else (6, 5, 2, 2)
    weight, aux = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    scale = torch.randn(scale_shape, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (weight, scale, aux)]
    assert torch.autograd.gradcheck(AddScaled.apply, inputs)
    plain = [t.clone().requires_grad_() for t in (weight, scale, aux)]
    grad = torch.randn(shape, dtype=torch.float64)
    torch.autograd.backward(AddScaled.apply(*inputs), grad)
    torch.autograd.backward(plain[0] + plain[1] * plain[2], grad)
    for mine, reference in zip(inputs, plain):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-12, atol=1e-12)
