"""``pathway.align``: a permutation of the aux's units is a symmetry (its output is unchanged), weight and
activation matching recover a hidden permutation, connect(align=...) folds exactly, and what cannot be
aligned is refused by name."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import pathway
from pathway.align import AlignError, Permutation, align, apply_permutation
from pathway.train.config import load_recipe
from pathway.train.model import build_adapter, build_transformer

WIDTH, DEPTH, HEADS = 16, 2, 4


def _engine_vit(seed: int) -> nn.Module:
    recipe = load_recipe("recipes/demo/image.yaml", [f"model.embed_dim={WIDTH}", f"model.depth={DEPTH}",
                                                     f"model.num_heads={HEADS}", "data.num_classes=10"])
    torch.manual_seed(seed)
    return build_transformer(recipe, build_adapter(recipe, need_data=False)).eval()


def _random_permutation(seed: int) -> Permutation:
    g = torch.Generator().manual_seed(seed)
    return Permutation(torch.randperm(WIDTH, generator=g),
                       tuple(torch.randperm(HEADS, generator=g) for _ in range(DEPTH)),
                       tuple(torch.randperm(4 * WIDTH, generator=g) for _ in range(DEPTH)))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_a_permutation_is_a_symmetry_of_the_whole_model(images):
    model = _engine_vit(0)
    before = model(images)
    outside = apply_permutation(model, _random_permutation(1))
    assert torch.allclose(model(images), before, atol=1e-5)
    assert set(outside) == {"tokenizer.pos_embed", "tokenizer.proj.weight", "tokenizer.proj.bias", "norm.weight",
                            "norm.bias", "head.fc.weight"}


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_matching_recovers_a_hidden_permutation_and_keeps_the_function(images, method):
    target = _engine_vit(0)
    aux = copy.deepcopy(target)
    apply_permutation(aux, _random_permutation(2))
    before = aux(images)
    report = align(target, aux, method, inputs=images)
    assert torch.allclose(aux(images), before, atol=1e-5)  # same function
    for (name, t), (_, a) in zip(target.named_parameters(), aux.named_parameters()):
        assert torch.equal(t, a), name                     # and back in the target's basis
    assert report.cosine_after == pytest.approx(1.0) and report.objective_after > report.objective_before
    assert report.residual_moved > WIDTH // 2 and sum(report.mlp_moved) > WIDTH
    assert "weight-matching objective" in str(report) and report.to_dict()["method"] == method


def test_connect_align_on_another_init_improves_the_objective_and_folds_exactly(images):
    target, aux = _engine_vit(0), _engine_vit(3)
    before = aux(images)
    report = pathway.connect(target, aux, align="weights", target_inputs=images, aux_inputs=images)
    assert torch.allclose(aux(images), before, atol=1e-5)
    note = next(f for f in report.flags if f.startswith("align (weights)"))
    assert "->" in note
    with torch.no_grad():
        for scale in pathway.lambdas(target).values():
            scale.fill_(0.3)
    connected = target(images)
    pathway.fold(target)
    assert torch.allclose(target(images), connected, atol=1e-5)


def test_alignment_raises_the_objective_between_two_inits():
    target, aux = _engine_vit(0), _engine_vit(4)
    report = align(target, aux)
    assert report.objective_after > report.objective_before and report.iterations >= 1


def test_refusals_name_the_problem():
    target = _engine_vit(0)
    with pytest.raises(AlignError, match="not one of"):
        align(target, _engine_vit(1), "sideways")
    narrow = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, num_classes=0)
    with pytest.raises(AlignError, match="2 blocks and the aux 3"):
        align(target, narrow)
    bert_like = nn.Sequential(nn.Linear(WIDTH, WIDTH))
    with pytest.raises(AlignError, match="no timm-style blocks"):
        align(target, bert_like)
    with pytest.raises(AlignError, match="needs inputs"):
        align(target, _engine_vit(1), "activations")
    with pytest.raises(AlignError, match="module in memory"):
        align(target, "some/folder")
    scaled = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=DEPTH, num_classes=0, init_values=0.1)
    with pytest.raises(AlignError, match="ls1.gamma"):
        align(scaled, scaled)
