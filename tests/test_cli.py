"""The pathway command: help, --dry-run on every recipe under recipes/ (demo and paper), clean errors,
eval and fold of a finished run, python -m pathway."""

import subprocess
import sys
from pathlib import Path

import pytest

from pathway.train.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as code:
        main(["--help"])
    assert code.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "pretrain", "eval", "fold", "inspect", "demo-data", "--dry-run", "torchrun"):
        assert command in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "--set KEY=VALUE" in text and "--dry-run" in text


def test_recipes_are_found():
    assert any(p.parts[-2] == "demo" for p in RECIPES)
    assert len(RECIPES) >= 6


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_dry_run_every_recipe(recipe, capsys):
    assert main(["train", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"recipe {recipe.resolve()}")
    assert "target: TransformerModel" in out and ("optim: AdamW lr" in out or "optim: LARS" in out)
    assert "batch: world size 1, per-process batch" in out and "global batch" in out
    assert ("pathway: TransformerModel <- TransformerModel" in out or "aux: disabled" in out
            or "pathway: no connect" in out)


def test_dry_run_of_a_demo_pairs_every_body_weight(capsys):
    assert main(["train", str(ROOT / "recipes/demo/point.yaml"), "--dry-run", "--set", "model.depth=3"]) == 0
    out = capsys.readouterr().out
    assert "coverage    12/12 target body weights paired" in out
    assert "built on meta" in out or "built on cpu" in out  # the CPU where an op has no meta kernel (point grouping)
    assert main(["pretrain", str(ROOT / "recipes/demo/point_mae.yaml"), "--dry-run"]) == 0
    assert "loss chamfer" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["train", str(ROOT / "recipes/demo/image.yaml"), "--dry-run", "--set", "train.epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.epoch'" in err and "Traceback" not in err
    assert main(["train", str(ROOT / "recipes/demo/image.yaml"), "--set", "data.adapter=nope"]) == 2
    assert "not a registered adapter" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_inspect_two_timm_models(capsys):
    argv = ["inspect", "timm:vit_tiny_patch16_224", "timm:vit_tiny_patch16_224", "--set", "pathway.match=name"]
    assert main(argv) == 0
    assert "48/48" in capsys.readouterr().out  # 12 blocks x (qkv, proj, fc1, fc2)


@pytest.mark.slow
def test_train_then_eval_and_fold_from_the_command_line(tmp_path, capsys):
    import json

    from safetensors.torch import load_file, save_file

    from pathway.provenance import sha256_file
    from pathway.train.config import load_recipe
    from pathway.train.model import build_adapter, build_transformer

    data = tmp_path / "data"
    assert main(["demo-data", "timeseries", str(data)]) == 0
    sets = [f"data.root={data}", f"output.dir={tmp_path}", "output.name=ts", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "train.epochs=1", "train.max_steps=4", "pathway.lambda_init=0.1"]
    recipe = str(ROOT / "recipes/demo/timeseries.yaml")
    aux = tmp_path / "aux.safetensors"  # an aux checkpoint in the engine's own keys, hashed into the provenance
    plain = load_recipe(Path(recipe), sets)
    aux_model = build_transformer(plain, build_adapter(plain), aux=True)
    save_file({k: v.contiguous() for k, v in aux_model.state_dict().items()}, str(aux))
    sets += [f"aux.checkpoint={aux}", "aux.checkpoint_format=pathway"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", recipe, "--no-progress", *args]) == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert final.startswith("final: top1")
    run = tmp_path / "ts"
    # the folded file evaluates to the connected model's final numbers
    assert main(["eval", recipe, "--weights", str(run / "model.safetensors"), *args]) == 0
    evaluated = capsys.readouterr().out.strip()
    assert evaluated.split(", loss")[0] == final.removeprefix("final: ").split(", loss")[0]
    with pytest.MonkeyPatch.context() as env:  # under torchrun only rank 0 prints the metrics line
        env.setenv("RANK", "1")
        assert main(["eval", recipe, "--weights", str(run / "model.safetensors"), *args]) == 0
    assert capsys.readouterr().out == ""
    # fold a training checkpoint: same tensors as the run's own folded model
    ckpt = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert main(["fold", str(ckpt), "-o", str(tmp_path / "folded.safetensors")]) == 0
    a, b = load_file(str(tmp_path / "folded.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert json.loads((run / "result.json").read_text())["fold_max_abs_diff"] < 1e-5
    # both folded files say how they were made: the aux file and its sha256, every pair and its lambda
    lambdas = json.loads((run / "lambdas.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    for folded in (run / "model.safetensors", tmp_path / "folded.safetensors"):
        assert main(["inspect", str(folded)]) == 0
        shown = capsys.readouterr().out
        assert f"from {aux}" in shown and f"aux.safetensors  sha256 {sha256_file(aux)}" in shown
        fc2 = next(line for line in shown.splitlines() if line.startswith("  blocks.1.mlp.fc2.weight "))
        assert "pairs (8):" in shown and "<- blocks.1.mlp.fc2.weight" in fc2
        assert f"lambda {lambdas['blocks.1.mlp.fc2.weight']:+.6g}" in fc2


def test_python_dash_m_pathway():
    run = subprocess.run([sys.executable, "-m", "pathway", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "Multimodal Pathway" in run.stdout


def test_dry_run_prints_the_batch_plan_for_the_world_size(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert main(["train", str(ROOT / "recipes/paper/imagenet_mae_baseline.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch: world size 8, per-process batch 128, accumulation 1, global batch 1024" in out
    assert "optim: AdamW lr 0.002 (blr 0.0005 x 1024 / 256)" in out


def test_dry_run_refuses_a_global_batch_the_world_does_not_divide(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["train", str(ROOT / "recipes/paper/imagenet_mae_baseline.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'data.global_batch' = 1024 is not a whole number of micro-batches" in err and len(err.splitlines()) <= 2


def test_rehearse_prints_one_closing_line(capsys):
    assert main(["train", str(ROOT / "recipes/paper/imagenet_mae_baseline.yaml"), "--rehearse", "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("rehearsal ok: imagenet_mae_baseline (imagenet layout")


def test_world_without_rehearse_is_refused(capsys):
    assert main(["train", str(ROOT / "recipes/paper/imagenet_mae_baseline.yaml"), "--world", "2"]) == 2
    assert "--world and --keep go with --rehearse" in capsys.readouterr().err
