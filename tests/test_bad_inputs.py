"""The CLI over a table of wrong inputs, made on purpose as a new user would: each one ends in a short message
that names the problem, a non-zero exit, no traceback, and no file of the user's touched (not even a run folder
is created)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pathway.train.cli import main
from pathway.train.demo_data import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes/demo/timeseries.yaml")
SMALL = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "data.batch_size=4"]
TRAINED = ["model.depth=2", "train.max_steps=2", "train.log_every=1", "output.name=trained", "data.val_split=",
           "output.plots=false"]  # the fixture's run: no evaluation, no plots (fast)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A user's folder of their own files, demo data the project owns, and broken files of every kind."""
    base = tmp_path_factory.mktemp("bad_inputs")
    user = base / "my_data"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "keep.txt").write_text("mine\n")
    (user / "train.csv").write_text("a,b\n1,2\n")
    data = make_demo_data("timeseries", base / "demo", per_class=4)
    files = {
        "broken": "data: [1, 2\n",
        "cycle_a": "extends: cycle_b.yaml\n",
        "cycle_b": "extends: cycle_a.yaml\n",
        "toplevel": "extends: " + DEMO + "\ntrian: {epochs: 1}\n",
    }
    for name, text in files.items():
        (base / f"{name}.yaml").write_text(text)
    (base / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    save_file({"something.else": torch.zeros(2)}, str(base / "foreign.safetensors"))
    torch.save({"model": {}}, base / "half.pt")
    (base / "runs" / "empty" / "checkpoints").mkdir(parents=True)
    (base / "exists.safetensors").write_text("the user's file\n")
    (user / "myexp").mkdir()  # looks like a run folder (recipe + log), but it is the user's
    (user / "myexp" / "recipe.yaml").write_text("my own notes on a recipe\n")
    (user / "myexp" / "metrics.jsonl").write_text('{"mine": 1}\n')
    (base / "latin1.yaml").write_bytes(f"extends: {DEMO}\ndescription: caf\xe9\n".encode("latin-1"))
    (base / "loop_a").symlink_to(base / "loop_b")
    (base / "loop_b").symlink_to(base / "loop_a")
    (base / "recipes.d").mkdir()
    (base / "dangling").symlink_to(base / "nothing-here")
    # a finished run to resume with a changed recipe (its folder, under runs/, is watched too)
    assert main(_train(f"data.root={data}", "data.demo=false", f"output.dir={base / 'runs'}", *TRAINED,
                       flags=("--no-progress",))) == 0
    return {"base": base, "user": user, "data": data}


def _snapshot(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            out[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def _train(*sets: str, recipe: str = DEMO, flags: tuple[str, ...] = ()) -> list[str]:
    return ["train", recipe, *flags, *[a for s in (*SMALL, *sets) for a in ("--set", s)]]


def _resume(w: dict[str, Path], *changed: str) -> list[str]:
    """The fixture's finished run, started again with ``changed`` recipe values."""
    return _train(*_data(w), f"output.dir={w['base'] / 'runs'}", *TRAINED, *changed, flags=("--no-progress",))


def _data(w: dict[str, Path]) -> list[str]:
    """The fixture's data set, used as data the user names (not made again as demo data)."""
    return [f"data.root={w['data']}", "data.demo=false"]


# (id, argv built from the fixture's paths, what the message must say)
CASES = [
    ("missing recipe file", lambda w: ["train", str(w["base"] / "nope.yaml")], "file not found"),
    ("broken YAML", lambda w: ["train", str(w["base"] / "broken.yaml")], "not valid YAML"),
    ("cyclic extends", lambda w: ["train", str(w["base"] / "cycle_a.yaml")], "'extends' forms a cycle"),
    ("unknown section", lambda w: ["train", str(w["base"] / "toplevel.yaml")],
     "unknown key 'trian' (did you mean 'train'?)"),
    ("unknown key", lambda w: _train("train.epoch=3"), "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("wrong type", lambda w: _train("train.epochs=three"), "'train.epochs' = 'three' (str); expected int"),
    ("negative lr", lambda w: _train("optim.blr=-1"), "'optim.blr' = -1.0; it must be > 0"),
    ("width not divisible by heads", lambda w: _train("model.embed_dim=65"),
     "'model.embed_dim' = 65 is not divisible by 'model.num_heads' = 2"),
    ("smoothing out of range", lambda w: _train("train.label_smoothing=2"),
     "'train.label_smoothing' = 2.0; it must be in [0, 1)"),
    ("bad override syntax", lambda w: _train("train.epochs"), "expected section.key=value"),
    ("unknown connect option", lambda w: _train("pathway.dpeth=uniform"), "'pathway': unknown option(s) ['dpeth']"),
    ("bad connect choice", lambda w: _train("pathway.depth=sideways"), "depth='sideways' is not one of"),
    ("connect option of the wrong type", lambda w: _train("pathway.train_aux=maybe"), "'pathway.train_aux' = 'maybe'"),
    ("unknown adapter", lambda w: _train("data.adapter=smell"), "'data.adapter' = 'smell' is not a registered adapter"),
    ("mixup on segmentation", lambda w: _train("data.adapter=point_part", "train.mixup=0.5"),
     "train.mixup does not fit part segmentation"),
    ("batch mixup on multi-label audio", lambda w: _train("data.adapter=audio", "train.mixup=0.5"),
     "train.mixup=0.5 does not fit a multi-label task"),
    ("missing data", lambda w: _train("data.demo=false", f"data.root={w['base'] / 'nowhere'}"), "does not exist"),
    ("demo data into the user's folder", lambda w: _train(f"data.root={w['user']}"),
     "holds files pathway did not write"),
    ("same, in a dry run", lambda w: _train(f"data.root={w['user']}", flags=("--dry-run",)),
     "holds files pathway did not write"),
    ("run folder is the user's folder", lambda w: _train(*_data(w), f"output.dir={w['base']}",
                                                        "output.name=my_data"), "holds files pathway did not write"),
    ("fp16 autocast on the CPU", lambda w: _train(*_data(w), "train.device=cpu", "train.amp=fp16",
                                                 f"output.dir={w['base'] / 'runs'}"),
     "'train.amp' = 'fp16' on the CPU"),
    ("batch larger than the data", lambda w: _train(*_data(w), "data.batch_size=100000",
                                                   f"output.dir={w['base'] / 'runs'}"), "make no full optimizer step"),
    ("corrupt target checkpoint", lambda w: _train(*_data(w),
                                                  f"model.checkpoint={w['base'] / 'garbage.pt'}",
                                                  f"output.dir={w['base'] / 'runs'}"), "garbage.pt"),
    ("resume of an empty run folder", lambda w: _train(*_data(w), f"output.dir={w['base'] / 'runs'}",
                                                      "output.name=empty", flags=("--resume",)), "holds no checkpoint"),
    ("eval of a foreign weights file", lambda w: ["eval", DEMO, "--weights", str(w["base"] / "foreign.safetensors"),
                                                  *[a for s in (*SMALL, *_data(w))
                                                    for a in ("--set", s)]],
     "foreign.safetensors"),
    ("fold of a file that is not a checkpoint", lambda w: ["fold", str(w["base"] / "garbage.pt"), "-o",
                                                          str(w["base"] / "out.safetensors")],
     "garbage.pt is unreadable"),
    ("fold of a checkpoint without its recipe", lambda w: ["fold", str(w["base"] / "half.pt"), "-o",
                                                          str(w["base"] / "out.safetensors")],
     "not a training checkpoint"),
    ("fold over an existing file", lambda w: ["fold", str(w["base"] / "half.pt"), "-o",
                                             str(w["base"] / "exists.safetensors")], "exists already"),
    ("inspect with three models", lambda w: ["inspect", "a", "b", "c"], "give one recipe, or two models"),
    ("inspect of an unknown timm model", lambda w: ["inspect", "timm:vit_nope", "timm:vit_tiny_patch16_224"],
     "timm has no model 'vit_nope'"),
    ("demo data into the user's folder (demo-data)", lambda w: ["demo-data", "timeseries", str(w["user"])],
     "holds files pathway did not write"),
    ("experiment into the user's folder", lambda w: ["experiment", "--quick", "--out", str(w["user"])],
     "holds files pathway did not write"),
    # issue 18, training side
    ("a user's folder holding recipe.yaml and metrics.jsonl", lambda w: _train(*_data(w), f"output.dir={w['user']}",
                                                                             "output.name=myexp"),
     "holds files pathway did not write"),
    ("infinite base lr", lambda w: _train("optim.blr=.inf"), "'optim.blr' = inf; it must be a finite number"),
    ("an lr that diverges to NaN", lambda w: _train(*_data(w), "optim.lr=1e30", "model.depth=2",
                                                    f"output.dir={w['base'] / 'scratch'}", flags=("--no-progress",)),
     "loss is nan at step"),
    ("an MLP of zero width", lambda w: _train("model.mlp_ratio=1e-9"), "gives an MLP of int(1e-09 x 16) = 0 units"),
    ("infinite mlp_ratio", lambda w: _train("model.mlp_ratio=.inf"), "'model.mlp_ratio' = inf"),
    ("infinite warm-up", lambda w: _train("optim.warmup_epochs=.inf"), "'optim.warmup_epochs' = inf"),
    ("patch of zero steps", lambda w: _train("data.options.patch_size=0"),
     "patch_size=0 must be a whole number >= 1 (data.options.patch_size)"),
    ("seed beyond the per-item seeds", lambda w: _train("train.seed=100000000000000000000000"),
     "'train.seed' = 100000000000000000000000; it must be in [0, 1_000_000)"),
    ("a model larger than memory", lambda w: _train(*_data(w), "model.embed_dim=400000000",
                                                    f"output.dir={w['base'] / 'runs'}"), "GiB in fp32"),
    ("a latin-1 recipe file", lambda w: ["train", str(w["base"] / "latin1.yaml")], "not UTF-8 text (byte 0xe9"),
    ("resume with fewer heads", lambda w: _resume(w, "model.num_heads=1"), "model.num_heads: 2 -> 1"),
    ("resume with another width", lambda w: _resume(w, "model.embed_dim=32"), "model.embed_dim: 16 -> 32"),
    ("resume without the aux", lambda w: _resume(w, "aux.enabled=false"), "aux.enabled: True -> False"),
    ("data.root a symlink loop", lambda w: _train("data.demo=false", f"data.root={w['base'] / 'loop_a'}"),
     "is a symlink loop"),
    ("NaN lambda_init", lambda w: _train("pathway.lambda_init=.nan"), "lambda_init=nan is not a finite number"),
    # more of our own
    ("a folder given as the recipe", lambda w: ["train", str(w["base"] / "recipes.d")], "is a folder; name a recipe"),
    ("a checkpoint given as the recipe", lambda w: ["train", str(w["base"] / "garbage.pt")], "not valid YAML"),
    ("a run name that climbs out of output.dir", lambda w: _train("output.name=../escape"),
     "'output.name' = '../escape' is not a folder name"),
    ("an absolute run name", lambda w: _train("output.name=/tmp/elsewhere"), "is not a folder name"),
    ("an infinite Adam beta", lambda w: _train("optim.betas=[0.9, .inf]"), "'optim.betas[1]' = inf"),
    ("a fractional channel count", lambda w: _train("data.options.in_chans=2.5"),
     "in_chans=2.5 must be a whole number >= 1"),
    ("a negative series length", lambda w: _train("data.options.length=-128"), "length=-128 must be a whole number"),
    ("a negative seed", lambda w: _train("train.seed=-1"), "'train.seed' = -1"),
    ("a negative checkpoint interval", lambda w: _train("train.checkpoint_minutes=-5"),
     "'train.checkpoint_minutes' = -5.0; it must be >= 0"),
    ("an aux MLP of zero width", lambda w: _train("aux.mlp_ratio=0.01"), "'aux.mlp_ratio' = 0.01 gives an MLP"),
    ("resume with another schedule", lambda w: _resume(w, "train.epochs=7"), "train.epochs: 5 -> 7"),
    ("resume with another lr", lambda w: _resume(w, "optim.blr=1e-2"), "optim.blr: 0.005 -> 0.01"),
    ("resume with other adapter options", lambda w: _resume(w, "data.options.patch_size=8"),
     "data.options.patch_size: 16 -> 8"),
    ("data.root a link to nothing", lambda w: _train("data.demo=false", f"data.root={w['base'] / 'dangling'}"),
     "is a symlink to"),
]


@pytest.mark.parametrize("argv_of, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_nothing_is_touched(world, argv_of, expected, capsys):
    watched = (world["user"], world["base"] / "runs", world["data"])
    before = _snapshot(*watched) | {"exists": (world["base"] / "exists.safetensors").read_text()}
    code = main(argv_of(world))
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    assert err.startswith("pathway ") and len(err.strip().splitlines()) <= 2, err
    after = _snapshot(*watched) | {"exists": (world["base"] / "exists.safetensors").read_text()}
    assert after == before
    assert not (world["base"] / "out.safetensors").exists()


def test_wrong_subcommand_is_argparse_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["trian", DEMO])
    assert exit_.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


def test_pretrain_under_torchrun_is_refused(monkeypatch, tmp_path):
    """pretrain has no DDP: with WORLD_SIZE > 1 it refuses instead of training each rank alone."""
    import torch.distributed as dist

    from pathway.train.config import load_recipe
    from pathway.train.pretrain import pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as under torchrun, where the group exists
    recipe = load_recipe(ROOT / "recipes/demo/point_mae.yaml", [f"data.root={tmp_path / 'd'}",
                                                                 f"output.dir={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match="pathway pretrain runs in one process, but 2 were started"):
        pretrain(recipe, progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "d").exists()


def test_global_batch_no_batch_size_fits_names_the_process_counts():
    from pathway.train.config import RecipeError, batch_plan, load_recipe

    recipe = load_recipe(DEMO, ["data.global_batch=4", "data.batch_size=2"])
    with pytest.raises(RecipeError, match=r"multiple of the number of processes, which may be one of \[1, 2, 4\]"):
        batch_plan(recipe, 8)
