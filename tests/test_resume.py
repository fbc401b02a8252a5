"""kill -9 in the middle of an epoch, then --resume: the run ends with the same weights as one never interrupted.

Run for every demo recipe: each modality brings its own augmentation randomness and data order,
which the checkpoint must restore exactly.
"""

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


STEPS = 12
DEMOS = [  # (recipe, items per class, extra settings)
    ("image", 30, ["train.label_smoothing=0.1", "train.mixup=0.8"]),
    ("point", 10, []),
    ("audio", 10, []),
    ("video", 10, []),
    ("timeseries", 10, []),
]


def command(recipe: str, data: Path, out: Path, name: str, extra_sets: list[str], *extra: str) -> list[str]:
    sets = [f"data.root={data}", f"output.dir={out}", f"output.name={name}", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "data.batch_size=4", "train.epochs=2", f"train.max_steps={STEPS}",
            "train.checkpoint_every=1", "train.keep_last=2", "train.log_every=1", "optim.warmup_epochs=0.2",
            "pathway.lambda_init=0.1", *extra_sets]
    args = [sys.executable, "-m", "pathway", "train", str(ROOT / f"recipes/demo/{recipe}.yaml"), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, per_class, extra_sets", DEMOS, ids=[d[0] for d in DEMOS])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(recipe, per_class, extra_sets, tmp_path):
    from pathway.train.demo_data import make_demo_data

    data = make_demo_data(recipe, tmp_path / "data", per_class=per_class)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(name: str, *extra: str) -> list[str]:
        return command(recipe, data, tmp_path, name, extra_sets, *extra)

    subprocess.run(cmd("whole"), check=True, env=env, cwd=ROOT, capture_output=True)

    ckpts = tmp_path / "cut" / "checkpoints"
    proc = subprocess.Popen(cmd("cut"), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    def saved_steps() -> list[int]:
        return [int(p.stem.split("-")[1]) for p in ckpts.glob("ckpt-*.pt")] if ckpts.exists() else []

    while time.time() < deadline and max(saved_steps(), default=0) < 3:   # keep_last=2 deletes older ones
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # it really died before the end
    killed_at = max(saved_steps())
    assert 3 <= killed_at < STEPS

    # without --resume the folder is protected
    refused = subprocess.run(cmd("cut"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(cmd("cut", "--resume"), env=env, cwd=ROOT, capture_output=True,
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
    assert steps == list(range(1, STEPS + 1))
    assert torch.isfinite(torch.stack([v.float().abs().max() for v in cut.values()])).all()
