"""DDP through torchrun: 2 CPU processes (gloo) train a connected model; both ranks end with identical weights."""

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
            "pathway.lambda_init=0.1", "optim.accum_steps=2"]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
            "-m", "pathway", "train", str(ROOT / "recipes/demo/image.yaml"), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["replica_max_abs_diff"] == 0.0  # per-tensor checksums of rank 1 equal rank 0's
    assert result["fold_max_abs_diff"] < 1e-5
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    weights = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
