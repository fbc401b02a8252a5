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
    return {"base": base, "user": user, "data": data}


def _snapshot(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            out[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def _train(*sets: str, recipe: str = DEMO, flags: tuple[str, ...] = ()) -> list[str]:
    return ["train", recipe, *flags, *[a for s in (*SMALL, *sets) for a in ("--set", s)]]


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
