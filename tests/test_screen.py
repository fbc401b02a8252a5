"""``pathway screen`` detects an effect that exists and does not invent one.

Positive control: a donor of the target's architecture trained from the target's own initialisation (it shares
the target's basis: issue 22 measured +23 points for it at demo scale). It must rank first, its Bonferroni
interval against both placebos above zero. Negative control: a randomly initialised donor; it must not be
called helpful, and its Bonferroni interval against the baseline must contain zero. Tiny models, tiny data."""

from __future__ import annotations

import json

import pytest
import torch

from pathway.screen import ScreenDesignError, parse_candidate, screen
from pathway.screen.design import design_conditions, planned_comparisons
from pathway.train.config import load_recipe
from pathway.train.demo_data import make_demo_data
from pathway.train.model import build_adapter, build_transformer

RECIPE = "recipes/demo/image.yaml"


def _save(model: torch.nn.Module, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def controls(tmp_path_factory):
    """The screen of a shared-basis donor and a random donor on a tiny frozen target; returns its result."""
    from pathway.train.engine import train

    tmp = tmp_path_factory.mktemp("screen")
    root = make_demo_data("image", tmp / "data", per_class=40)
    size = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", f"data.root={root}", "data.demo=false",
            "data.options.img_size=8", "data.batch_size=32", "output.plots=false", "train.eval_every=100",
            "train.checkpoint_epochs=100"]
    recipe = load_recipe(RECIPE, size)
    adapter = build_adapter(recipe)
    torch.manual_seed(100)
    start = _save(build_transformer(recipe, adapter), tmp / "T0.safetensors")
    torch.manual_seed(200)
    random_donor = _save(build_transformer(recipe, adapter), tmp / "random.safetensors")
    donor = train(load_recipe(RECIPE, [*size, f"model.checkpoint={start}", "aux.enabled=false", f"output.dir={tmp}",
                                       "output.name=donor", "train.epochs=12", "optim.blr=0.05"]), progress=False)
    result = screen(RECIPE, [f"shared={donor['model']}:pathway", f"random={random_donor}:pathway"], seeds=4,
                    steps=40, out=tmp / "out", log=lambda line: None,
                    overrides=[*size, f"model.checkpoint={start}", "optim.blr=0.3", "optim.lambda_lr=0.3",
                               "train.epochs=12"])
    return result, tmp / "out"


@pytest.mark.slow
def test_a_shared_basis_donor_ranks_first_above_both_placebos(controls):
    result, _ = controls
    first = result["ranking"][0]
    assert first["candidate"] == "shared" and first["verdict"] == "helps: above its placebos"
    for against in ("shared~gauss", "shared~rows"):
        c = next(c for c in result["comparisons"] if c["candidate"] == "shared" and c["against"] == against)
        assert c["ci_bonferroni"][0] > 0, c


@pytest.mark.slow
def test_a_random_donor_is_not_called_helpful(controls):
    result, _ = controls
    entry = next(r for r in result["ranking"] if r["candidate"] == "random")
    assert entry["verdict"] != "helps: above its placebos"
    base = next(c for c in result["comparisons"] if c["candidate"] == "random" and c["against"] == "baseline")
    assert base["ci_bonferroni"][0] <= 0 <= base["ci_bonferroni"][1]


@pytest.mark.slow
def test_the_screen_writes_its_three_files_and_shares_seeds(controls):
    result, out = controls
    assert json.loads((out / "screen.json").read_text()) == json.loads(json.dumps(result))
    md = (out / "screen.md").read_text()
    assert "| shared - shared~rows |" in md and "Bonferroni" in md and "**helps: above its placebos**" in md
    assert (out / "screen.png").stat().st_size > 10_000
    assert {tuple(c["seeds"]) for c in result["conditions"]} == {(0, 1, 2, 3)}
    assert [c["kind"] for c in result["conditions"]].count("placebo") == 4
    assert (out / ".pathway-owned").read_text().strip() == "screen"


def test_design_names_conditions_and_comparisons(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    a = parse_candidate(f"a={tmp_path / 'a.safetensors'}:pathway")
    b = parse_candidate(f"b={tmp_path}:transformers")
    assert (a.format, b.format) == ("pathway", "transformers")
    conditions = design_conditions([a, b], ["fix"], ["all", "mlp"], align=True)
    names = [c.name for c in conditions]
    assert names[:6] == ["baseline", "a", "a+align", "a~gauss", "a~rows", "a@mlp"]
    assert "b+align" not in names and "b~rows@mlp" in names   # a Hugging Face donor is not aligned
    pairs = planned_comparisons(conditions)
    assert ("a+align", "a") in pairs and ("a+align", "a~gauss") in pairs and ("b@mlp", "b~gauss@mlp") in pairs
    assert len(pairs) == 3 + 4 + 3 + 4 + 3 + 3


@pytest.mark.parametrize("spec, message", [
    ("nameless", "NAME=PATH"), ("baseline=x", "not 'baseline'"), ("a=/no/such/file", "does not exist")])
def test_bad_candidates_are_refused_with_the_fix(spec, message):
    with pytest.raises(ScreenDesignError, match=message):
        parse_candidate(spec)


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    spec = f"a={tmp_path / 'a.safetensors'}"
    with pytest.raises(ScreenDesignError, match="2 distinct seeds"):
        screen(RECIPE, [spec], seeds=1, out=tmp_path / "out")
    with pytest.raises(ScreenDesignError, match="--layers 'heads'"):
        screen(RECIPE, [spec], layers="all,heads", out=tmp_path / "out")
    with pytest.raises(ScreenDesignError, match="--setting"):
        screen(RECIPE, [spec], setting="frozen", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
