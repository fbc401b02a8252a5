"""DDP through torchrun: 2 CPU processes (gloo) train a connected model with mixup and loader workers; both ranks
end with identical weights, the evaluation is sharded, rank 0 alone prints and writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_gloo_run_keeps_replicas_identical(tmp_path):
    from pathway.train.demo_data import make_demo_data

    data = make_demo_data("image", tmp_path / "data", per_class=20)
    sets = [f"data.root={data}", f"output.dir={tmp_path}", "output.name=ddp", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "data.batch_size=8", "train.epochs=1", "train.max_steps=5", "train.log_every=1",
            "pathway.lambda_init=0.1", "optim.accum_steps=2", "train.mixup=0.8", "data.num_workers=1"]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
            "-m", "pathway", "train", str(ROOT / "recipes/demo/image.yaml"), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout and run.stdout.count("\nplan: ") == 1  # printed by rank 0 alone
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["replica_max_abs_diff"] == 0.0  # per-tensor checksums of rank 1 equal rank 0's
    assert result["fold_max_abs_diff"] < 1e-5
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert all(0.0 <= r["data_wait"] <= 1.0 and r["samples_per_s"] > 0 for r in train)
    evaluation = [r for r in rows if r["kind"] == "eval"]  # each rank scored its share of the split, gathered
    assert len(evaluation) == 1
    from pathway.train.config import load_recipe
    from pathway.train.engine import Context
    from pathway.train.evaluate import evaluate_weights

    recipe = load_recipe(ROOT / "recipes/demo/image.yaml", sets)
    alone = evaluate_weights(recipe, tmp_path / "ddp" / "model.safetensors", ctx=Context(torch.device("cpu")))
    assert alone["top1"] == evaluation[0]["top1"]  # the folded model, scored by one process
    assert alone["loss"] == pytest.approx(evaluation[0]["loss"], abs=1e-4)
    weights = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
