"""kill -9 in the middle of an epoch, then --resume: the run ends with the same weights as one never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def command(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    sets = [f"data.root={data}", f"output.dir={out}", f"output.name={name}", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "data.batch_size=16", "train.epochs=1", "train.max_steps=12",
            "train.checkpoint_every=1", "train.keep_last=2", "train.log_every=1", "optim.warmup_epochs=0.2",
            "train.label_smoothing=0.1", "train.mixup=0.8", "pathway.lambda_init=0.1"]
    args = [sys.executable, "-m", "pathway", "train", str(ROOT / "recipes/demo/image.yaml"), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    from pathway.train.demo_data import make_demo_data

    data = make_demo_data("image", tmp_path / "data", per_class=30)  # 240 training images: 15 steps per epoch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(data, tmp_path, "whole"), check=True, env=env, cwd=ROOT, capture_output=True)

    ckpts = tmp_path / "cut" / "checkpoints"
    proc = subprocess.Popen(command(data, tmp_path, "cut"), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts / "ckpt-00000005.pt").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # it really died before the end
    killed_at = max(int(p.stem.split("-")[1]) for p in ckpts.glob("ckpt-*.pt"))
    assert 5 <= killed_at < 12

    # without --resume the folder is protected
    refused = subprocess.run(command(data, tmp_path, "cut"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(command(data, tmp_path, "cut", "--resume"), env=env, cwd=ROOT, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpts}" in resumed.stdout

    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert whole.keys() == cut.keys()
    diffs = {k: (whole[k] - cut[k]).abs().max().item() for k in whole}
    assert max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}
    # the metrics log has each step once, in order, after the resume
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert steps == list(range(1, 13))
    assert torch.isfinite(torch.stack([v.float().abs().max() for v in cut.values()])).all()
