"""The stack users train with: FSDP2 (2 gloo processes on the CPU) and PEFT LoRA on connected models.

accelerate and Lightning run as examples (tests/test_examples.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from toy_models import hf_bert, timm_vit

import pathway

ROOT = Path(__file__).resolve().parents[1]
peft = pytest.importorskip("peft")


@pytest.mark.slow
def test_fsdp2_sharded_steps_fold_to_the_one_process_result():
    """examples/fsdp2.py: per-channel lambda, scalar lambda (kept out of the sharding) and a frozen aux."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
            str(ROOT / "examples/fsdp2.py"), "--steps", "2"]
    run = subprocess.run(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.findall(r"fsdp2 (.+): 2 ranks, 2 steps; max \|sharded - one process\| after fold = (\S+); "
                       r"frozen aux without grads: (\w+)", run.stdout)
    assert [f[0] for f in found] == ["{'lambda_shape': 'channel'}", "scalar lambda", "{'train_aux': False}"]
    assert all(float(diff) < 1e-5 and frozen == "True" for _, diff, frozen in found), found


def _lora(model: nn.Module, modules: str) -> nn.Module:
    """LoRA on a connected model: get_peft_model freezes every base tensor, lambda included; lambda trains again."""
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules))
    for lam in pathway.lambdas(wrapped).values():
        lam.requires_grad_(True)
    return wrapped


def _train_fold_merge(wrapped: nn.Module, batch: dict, output_of, loss_of) -> float:
    """3 steps; then fold the pathway and merge LoRA: max |plain model's output - trained model's output|."""
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.endswith(".scale") for n in trainable), sorted(trainable)[:6]
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    optimizer = torch.optim.AdamW(pathway.param_groups(wrapped, lr=1e-2, weight_decay=0.0, lambda_lr=1e-2))
    for _ in range(3):
        loss = loss_of(output_of(wrapped(**batch)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = {n for n, p in wrapped.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable        # lambdas and LoRA trained; target and aux weights did not move
    wrapped.eval()
    with torch.no_grad():
        trained = output_of(wrapped(**batch))
        pathway.fold(wrapped)        # first: PEFT's merge writes into base_layer.weight.data, a computed tensor here
        plain = wrapped.merge_and_unload()
        merged = output_of(plain(**batch))
    assert not pathway.is_connected(plain) and not any(".lora_" in n for n, _ in plain.named_parameters())
    return (merged - trained).abs().max().item()


def test_lora_on_a_connected_timm_vit_trains_lambda_and_lora_then_merges_exactly():
    torch.manual_seed(0)
    target = timm_vit(depth=2, dim=32, heads=2, classes=4)
    pathway.connect(target, timm_vit(depth=2, dim=32, heads=2, classes=0), lambda_init=0.1, train_aux=False,
                    freeze_target=True)
    wrapped = _lora(target, r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$")
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    difference = _train_fold_merge(wrapped, {"x": x}, lambda logits: logits,
                                   lambda logits: nn.functional.cross_entropy(logits, y))
    assert difference < 1e-5


def test_lora_on_a_connected_hf_bert_trains_lambda_and_lora_then_merges_exactly():
    torch.manual_seed(0)
    target = hf_bert(depth=2, dim=32, heads=2)
    torch.manual_seed(1)
    pathway.connect(target, hf_bert(depth=2, dim=32, heads=2), lambda_init=0.1, train_aux=False, freeze_target=True)
    wrapped = _lora(target, ["query", "key", "value", "dense"])
    goal = torch.randn(4, 32)
    difference = _train_fold_merge(wrapped, {"input_ids": torch.randint(0, 100, (4, 12))},
                                   lambda out: out.pooler_output, lambda pooled: (pooled - goal).pow(2).mean())
    assert difference < 1e-5


def test_connect_on_a_lora_wrapped_model_says_how_to_order_the_two():
    wrapped = peft.get_peft_model(timm_vit(depth=2, dim=32, heads=2), peft.LoraConfig(r=4, target_modules=["qkv"]))
    with pytest.raises(pathway.PathwayError) as error:
        pathway.connect(wrapped, timm_vit(depth=2, dim=32, heads=2, classes=0),
                        target_inputs=torch.randn(1, 3, 32, 32))
    assert "get_peft_model" in str(error.value) and "merge_and_unload" in str(error.value)
    assert "base_model.model.blocks.0.attn.qkv" in str(error.value)
    assert not pathway.is_connected(wrapped)


def test_tensorboard_mirrors_the_jsonl_rows_and_a_resume_cuts_both(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pathway.train.engine import JsonlLog
    from pathway.train.tracking import TensorBoard

    def run(steps: range, resume_from: int | None, scale: float) -> None:
        board = TensorBoard.open(tmp_path, main=True, enabled=None)
        log = board.mirror(JsonlLog(tmp_path / "metrics.jsonl", True))
        lam_log = board.mirror(JsonlLog(tmp_path / "lambdas.jsonl", True), prefix="lambda")
        if resume_from is not None:
            log.truncate_after(resume_from)
            lam_log.truncate_after(resume_from)
        for step in steps:
            log.write(kind="train", step=step, epoch=0, loss=scale / step, lr=1e-3, data_wait=0.1, note="text")
            lam_log.write(step=step, **{"blocks.0.attn.qkv.weight": 0.01 * step})
        log.write(kind="eval", step=steps[-1], epoch=0, top1=50.0 * scale)

    run(range(1, 5), None, 1.0)          # steps 1-4, then killed; resumed from its step-2 checkpoint
    run(range(3, 7), 2, 2.0)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/data_wait", "eval/top1", "lambda/blocks.0.attn.qkv.weight"} <= tags
    assert "train/note" not in tags and "train/epoch" not in tags
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert loss == pytest.approx({1: 1.0, 2: 0.5, 3: 2 / 3, 4: 0.5, 5: 0.4, 6: 2 / 6})   # 3 and 4 from the resumed run
    assert [e.step for e in events.Scalars("eval/top1")] == [6]                          # step 4's eval was cut
    jsonl = [r["step"] for r in JsonlLog(tmp_path / "metrics.jsonl", True).rows() if r["kind"] == "train"]
    assert jsonl == [1, 2, 3, 4, 5, 6]


def test_tensorboard_asked_for_without_the_package_is_refused_by_name(tmp_path, monkeypatch):
    from pathway.train import tracking

    monkeypatch.setattr(tracking, "_installed", lambda: False)
    with pytest.raises(pathway.PathwayError, match="pip install tensorboard"):
        tracking.TensorBoard.open(tmp_path, main=True, enabled=True)
    assert tracking.TensorBoard.open(tmp_path, main=True, enabled=None).folder is None
