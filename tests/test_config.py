"""Recipes: typed schema, extends, --set overrides, and errors that name the file, key and allowed values."""

import dataclasses
from pathlib import Path

import pytest

import pathway
from pathway.train.config import RecipeError, check_adapter, check_data, load_recipe, parse_overrides, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_extends_and_overrides(tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "base.yaml", "data: {adapter: image, root: data, options: {img_size: 32}}\n"
                                  "model: {embed_dim: 64, depth: 4, num_heads: 4}\noptim: {blr: 1.0e-3}\n")
    child = write(tmp_path / "ablation.yaml", "extends: base.yaml\nmodel: {depth: 2}\n"
                                              "data: {options: {patch_size: 4}}\npathway: {exclude: ['mlp']}\n")
    r = load_recipe(child, ["optim.blr=2e-3", "train.epochs=3", "pathway.lambda_init=0.1"])
    assert (r.model.embed_dim, r.model.depth, r.model.num_heads) == (64, 2, 4)  # base, child, base
    assert r.data.options == {"img_size": 32, "patch_size": 4}  # adapter options merge key by key
    assert r.data.root == str((tmp_path / "data").resolve())  # relative to the file that names it
    assert r.optim.blr == pytest.approx(2e-3) and isinstance(r.optim.blr, float)  # '2e-3' is text in YAML 1.1
    assert r.train.epochs == 3 and r.pathway["exclude"] == ["mlp"] and r.pathway["lambda_init"] == 0.1
    assert r.run_name == "ablation"
    # the resolved recipe round-trips through its dict (what checkpoints and recipe.yaml hold)
    again = recipe_from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()
    assert r.connect_options()["exclude"] == ["mlp"]
    assert set(r.pathway) == {f.name for f in dataclasses.fields(pathway.Options)} - {"target_inputs", "aux_inputs"}


@pytest.mark.parametrize("text, override, expected", [
    ("train: {epoch: 3}\n", None, "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("trian: {epochs: 3}\n", None, "unknown key 'trian' (did you mean 'train'?)"),
    ("train: {epochs: three}\n", None, "'train.epochs' = 'three' (str); expected int"),
    ("train: {amp: off}\n", None, "'train.amp' = False (bool); expected 'auto' | 'bf16' | 'fp16' | 'fp32'"),
    ("pathway: {depth: backwards}\n", None, "'pathway': depth='backwards' is not one of ['equal'"),
    ("pathway: {dpeth: uniform}\n", None, "'pathway': unknown option(s) ['dpeth']"),
    ("pathway: {pairs: {a: b}, train_aux: maybe}\n", None, "'pathway.train_aux' = 'maybe' (str); expected bool"),
    ("pathway: {target_inputs: 3}\n", None, "'pathway.target_inputs' is set by the engine"),
    ("optim: {blr: -1}\n", None, "'optim.blr' = -1.0; it must be > 0"),
    ("model: {embed_dim: 65}\n", None, "'model.embed_dim' = 65 is not divisible by 'model.num_heads' = 12"),
    ("train: {label_smoothing: 1.5}\n", None, "'train.label_smoothing' = 1.5; it must be in [0, 1)"),
    ("model: [1, 2]\n", None, "'model' must be a mapping"),
    ("", "optim.betas=0.9", "'optim.betas' = 0.9 (float); expected list[float]"),
])
def test_errors_name_file_key_and_allowed(tmp_path, text, override, expected):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override] if override else None)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_extends_cycle_and_missing_parent(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(RecipeError, match="nowhere.yaml"):
        load_recipe(tmp_path / "c.yaml")


def test_adapter_and_data_checks(tmp_path):
    r = load_recipe(write(tmp_path / "r.yaml", "data: {adapter: imgae, root: missing}\n"))
    with pytest.raises(RecipeError, match=r"'data.adapter' = 'imgae' is not a registered adapter; available: .*image"):
        check_adapter(r)
    with pytest.raises(RecipeError, match=r"'data.root' = .*missing' does not exist"):
        check_data(r)


def test_parse_overrides_nested_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d.e=null", "f.g="]) == {
        "a": {"b": 1, "c": ["x", "y"]}, "d": {"e": None}, "f": {"g": ""}}
    with pytest.raises(RecipeError, match="expected section.key=value"):
        parse_overrides(["novalue"])


# -- the global batch is the recipe's contract (issue 10, 2.3) ------------------------------------


def test_global_batch_fixes_accumulation_and_lr_whatever_the_world_size():
    from pathway.train.config import batch_plan
    from pathway.train.optim import base_lr

    recipe = load_recipe(ROOT / "recipes/paper/imagenet_mae_baseline.yaml")
    one, eight = batch_plan(recipe, 1), batch_plan(recipe, 8)
    assert (one.per_process, one.accum_steps, one.global_batch) == (128, 8, 1024)
    assert (eight.per_process, eight.accum_steps, eight.global_batch) == (128, 1, 1024)  # main: 8192, lr 8x
    assert base_lr(recipe, eight.global_batch) == pytest.approx(5e-4 * 1024 / 256)
    with pytest.raises(RecipeError, match=r"'data.global_batch' = 1024 .* 'data.batch_size' = 128 on 3 process"):
        batch_plan(recipe, 3)


def test_global_batch_and_accum_steps_are_not_both_set():
    with pytest.raises(RecipeError, match="'data.global_batch' = 1024 and 'optim.accum_steps' = 4 are both set"):
        load_recipe(ROOT / "recipes/paper/imagenet_mae_baseline.yaml", ["optim.accum_steps=4"])


def test_without_a_global_batch_accumulation_is_as_given():
    from pathway.train.config import batch_plan

    recipe = load_recipe(ROOT / "recipes/demo/image.yaml", ["optim.accum_steps=3"])
    assert batch_plan(recipe, 2).global_batch == recipe.data.batch_size * 3 * 2


def test_every_paper_recipe_states_its_global_batch():
    recipes = sorted((ROOT / "recipes/paper").rglob("*.yaml"))
    assert recipes and all(load_recipe(p).data.global_batch for p in recipes)


def test_a_section_holding_only_a_comment_inherits(tmp_path):
    """`model:` with only a comment under it is YAML null: the parent's values stay (they were reset to defaults)."""
    write(tmp_path / "base.yaml", "model: {embed_dim: 64, depth: 4, num_heads: 4}\noptim: {lr: 1.0e-3}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nmodel:\n  # depth: 2   (tried, kept for later)\n"
                                           "optim: {lr: null}\n")
    r = load_recipe(child)
    assert (r.model.embed_dim, r.model.depth, r.model.num_heads) == (64, 4, 4)
    assert r.optim.lr is None  # a null value (not a section) still replaces: MAE's blr rule applies again
