"""The Python API over a table of wrong inputs, the twin of tests/test_bad_inputs.py (the CLI's): each call
ends in a named ``pathway.PathwayError`` whose message names the problem and the fix, and leaves the target as
it was (its tensors, its classes, connected or not)."""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import toy_models as toys
from safetensors.torch import load_file, save_file

import pathway
from pathway.source import SourceError


def llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**(config | overrides)))


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Hugging Face model folders: a good one, and one broken in each way a user's folder may be."""
    base = tmp_path_factory.mktemp("api_inputs")
    names = ("good", "intermediate", "kv_heads", "json", "model_type", "missing_tensor")
    llama().save_pretrained(base / "good")
    for name in names[1:]:
        shutil.copytree(base / "good", base / name)
    _config(base / "intermediate", intermediate_size=256)
    _config(base / "kv_heads", num_key_value_heads=3)
    (base / "json").joinpath("config.json").write_text('{"model_type": "llama",')
    _config(base / "model_type", model_type="llama_from_the_future")
    weights = base / "missing_tensor" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors.pop("model.layers.1.self_attn.o_proj.weight")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    (base / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    return {name: base / name for name in names} | {"pt": base / "garbage.pt"}


@functools.cache
def _models() -> tuple[nn.Module, nn.Module, nn.Module]:
    """A target, an aux and the target connected to it, built once; each case takes copies."""
    target, aux = toys.timm_vit(), toys.timm_vit(classes=0)
    connected = copy.deepcopy(target)
    pathway.connect(connected, copy.deepcopy(aux))
    return target, aux, connected


def _vit() -> nn.Module:
    return copy.deepcopy(_models()[0])


def _aux() -> nn.Module:
    return copy.deepcopy(_models()[1])


def _with(value: float) -> nn.Module:
    aux = _aux()
    with torch.no_grad():
        aux.blocks[1].mlp.fc2.weight[3, 5] = value
    return aux


def _connected(lam: float | None = None) -> nn.Module:
    target = copy.deepcopy(_models()[2])
    for scale in pathway.lambdas(target).values():
        scale.data.fill_(lam if lam is not None else 0.5)
    return target


def _fold_twice(target: nn.Module) -> None:
    pathway.fold(target)
    pathway.fold(target)


# (id, make the target, the wrong call on it, the error class, words the message must hold)
Case = tuple[str, Callable[[], nn.Module], Callable[[nn.Module, dict[str, Path]], object], type, list[str]]
CASES: list[Case] = [
    ("empty_aux_list", _vit, lambda t, f: pathway.connect(t, []), pathway.OptionError,
     ["empty list", "pass one aux model"]),
    ("aux_is_target", _vit, lambda t, f: pathway.connect(t, t), pathway.SelfConnectionError, ["the target itself"]),
    ("target_inside_a_list", _vit, lambda t, f: pathway.connect(t, [_aux(), t]), pathway.SelfConnectionError,
     ["the target itself"]),
    ("aux_not_a_model", _vit, lambda t, f: pathway.connect(t, 3), pathway.OptionError,
     ["nn.Module or the path", "not int"]),
    ("aux_float64", _vit, lambda t, f: pathway.connect(t, _aux().double()), pathway.DeviceMismatchError,
     ["torch.float64", "aux.to(torch.float32)"]),
    ("aux_on_meta", _vit, lambda t, f: pathway.connect(t, _aux().to("meta")), pathway.DeviceMismatchError,
     ["aux model is on the meta device", "no weights", "pathway.open_aux(path)"]),
    ("train_lambda_zero", _vit, lambda t, f: pathway.connect(t, _aux(), train_lambda=0), pathway.OptionError,
     ["train_lambda=0 must be True or False"]),
    ("freeze_target_string", _vit, lambda t, f: pathway.connect(t, _aux(), freeze_target="false"),
     pathway.OptionError, ["freeze_target='false' must be True or False"]),
    ("aux_nan", _vit, lambda t, f: pathway.connect(t, _with(math.nan)), pathway.NonFiniteError,
     ["'blocks.1.mlp.fc2.weight'", "1 NaN", "exclude=['blocks.1.mlp.fc2.weight']"]),
    ("aux_inf", _vit, lambda t, f: pathway.connect(t, _with(math.inf)), pathway.NonFiniteError,
     ["'blocks.1.mlp.fc2.weight'", "1 inf", "0 * inf is NaN"]),
    ("good_then_nan_aux", _vit, lambda t, f: pathway.connect(t, [_aux(), _with(-math.inf)]), pathway.NonFiniteError,
     ["'blocks.1.mlp.fc2.weight'"]),
    ("lambda_init_nan", _vit, lambda t, f: pathway.connect(t, _aux(), lambda_init=math.nan), pathway.OptionError,
     ["lambda_init", "nan", "finite"]),
    ("lambda_init_callable_inf", _vit, lambda t, f: pathway.connect(t, _aux(), lambda_init=lambda n, b: math.inf),
     pathway.OptionError, ["lambda_init gives inf for 'blocks.0.attn.qkv.weight'"]),
    ("lambda_init_string", _vit, lambda t, f: pathway.connect(t, _aux(), lambda_init="0.1"), pathway.OptionError,
     ["lambda_init", "must be a number"]),
    ("unknown_option", _vit, lambda t, f: pathway.connect(t, _aux(), lamda_init=0.1), pathway.OptionError,
     ["unknown option(s) ['lamda_init']"]),
    ("include_not_a_regex", _vit, lambda t, f: pathway.connect(t, _aux(), include=["attn.(qkv"]), pathway.OptionError,
     ["is not a regular expression"]),
    ("fold_twice", _connected, lambda t, f: _fold_twice(t), pathway.NotConnectedError, ["nothing to fold"]),
    ("fold_a_diverged_model", lambda: _connected(math.nan), lambda t, f: pathway.fold(t), pathway.NonFiniteError,
     ["non-finite", "blocks.0.attn.qkv.weight", "left connected"]),
    ("pickle_a_connected_model", _connected, lambda t, f: torch.save(t, io.BytesIO()), pathway.PicklingError,
     ["pathway.fold(model) first", "pathway.save(model, path)"]),
    ("pickle_dumps_a_connected_model", _connected, lambda t, f: pickle.dumps(t), pathway.PicklingError,
     ["cannot be pickled whole"]),
    ("param_groups_lr_string", _connected, lambda t, f: pathway.param_groups(t, lr="1e-3", weight_decay=0.05),
     pathway.OptionError, ["lr='1e-3'", "finite number"]),
    ("param_groups_lambda_lr_nan", _connected,
     lambda t, f: pathway.param_groups(t, lr=1e-3, weight_decay=0.05, lambda_lr=math.nan), pathway.OptionError,
     ["lambda_lr=nan"]),
    ("param_groups_negative_decay", _connected, lambda t, f: pathway.param_groups(t, lr=1e-3, weight_decay=-0.1),
     pathway.OptionError, ["weight_decay=-0.1", ">= 0"]),
    ("config_disagrees_with_files", _vit,
     lambda t, f: pathway.connect(t, f["intermediate"], on_shape_mismatch="select"), SourceError,
     ["'model.layers.0.mlp.gate_proj.weight'", "[384, 96] in the file but [256, 96]",
      "intermediate_size = 256", "intermediate_size = 384"]),
    ("kv_heads_disagree_with_files", _vit,
     lambda t, f: pathway.connect(t, f["kv_heads"], on_shape_mismatch="select"), SourceError,
     ["k_proj.weight", "[32, 96] in the file but [48, 96]", "num_key_value_heads = 3", "num_key_value_heads = 2"]),
    ("config_not_json", _vit, lambda t, f: pathway.connect(t, f["json"]), SourceError,
     ["config.json is not valid JSON", "save_pretrained"]),
    ("unknown_model_type", _vit, lambda t, f: pathway.connect(t, f["model_type"]), SourceError,
     ["config.json", "model_type 'llama_from_the_future'", "upgrade transformers", "architecture="]),
    ("unknown_timm_architecture", _vit,
     lambda t, f: pathway.open_aux(f["good"] / "model.safetensors", architecture="vit_nosuch_model"), SourceError,
     ["'vit_nosuch_model' is not a timm model name", "timm.list_models('vit*')"]),
    ("good_then_missing_tensor", _vit,
     lambda t, f: pathway.connect(t, [f["good"], f["missing_tensor"]], on_shape_mismatch="select"), SourceError,
     ["holds no tensor for aux weight 'layers.1.self_attn.o_proj.weight'"]),
    ("aux_path_missing", _vit, lambda t, f: pathway.connect(t, f["good"] / "nowhere"), SourceError,
     ["does not exist"]),
    ("pt_file_as_aux", _vit, lambda t, f: pathway.open_aux(f["pt"], architecture=_aux()), SourceError,
     ["only safetensors files", "weights_only=True"]),
]


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type], bool]:
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return tensors, {n: type(m) for n, m in model.named_modules()}, pathway.is_connected(model)


@pytest.mark.parametrize("name, make, call, error, words", CASES, ids=[c[0] for c in CASES])
def test_wrong_api_input_is_named_and_changes_nothing(folders, name, make, call, error, words):
    target = make()
    tensors, classes, connected = _state(target)
    with pytest.raises(error) as caught:
        call(target, folders)
    assert isinstance(caught.value, pathway.PathwayError)
    message = str(caught.value)
    for word in words:
        assert word in message, f"{name}: {word!r} not in {message!r}"
    assert "weights_only=False" not in message
    after, after_classes, after_connected = _state(target)
    if name != "fold_twice":   # its first fold is the right call; the second must change nothing more
        assert after.keys() == tensors.keys() and after_classes == classes and after_connected == connected
        assert all(torch.equal(after[k], tensors[k]) for k in tensors if not torch.isnan(tensors[k]).any())
