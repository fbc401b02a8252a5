"""Cost of a pathway: training step, inference after fold, peak memory, connect/fold time.

Variants, measured side by side (interleaved rounds in one process, so drift hits all alike):
  plain       the timm model
  connected   pathway.connect (parametrization, pathway.layer.AddScaled: lambda's gradient as one
              reduction), each step inside pathway.cached()
  addcmul     the same with the plain formula torch.addcmul(W, lambda, W_aux) and autograd's own
              backward (the parametrization before AddScaled), for the side-by-side comparison
  uncached    connected without cached() (MHA-style modules read weights several times)
  frozen_aux  connected with train_aux=False (no aux gradient, no optimizer state for it)
  reference   the official approach: each paired Linear replaced by a subclass computing
              F.linear(x, W + s * W_aux, b)
A step is forward + backward + AdamW. Memory is measured per variant in a fresh subprocess: the peak
(CPU: peak RSS; CUDA: torch.cuda.max_memory_allocated) and beside it the persistent state, split into
parameters, gradients and optimizer state. Prints ratios to plain; asserts nothing.

    python benchmarks/bench_overhead.py [--models vit_small_patch16_224 vit_base_patch16_224] [--batch 16]
    python benchmarks/bench_overhead.py --models --rounds 10     # the pathway op alone, AddScaled vs addcmul
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import pathway

VARIANTS = ("plain", "connected", "addcmul", "uncached", "frozen_aux", "reference")
CONNECTED = ("connected", "addcmul", "uncached", "frozen_aux")


class AddcmulPathway(pathway.PathwayWeight):
    """The parametrization with the plain formula, autograd deriving its backward (for comparison only)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(weight, self.scale.to(weight.dtype), self.aux_weight)


class ReferenceLinear(nn.Linear):
    """The official M2PT layer: a Linear whose forward adds the scaled aux weight."""

    def __init__(self, linear: nn.Linear, aux_weight: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.load_state_dict(linear.state_dict())
        self.aux_weight = nn.Parameter(aux_weight.detach().clone())
        self.scale = nn.Parameter(torch.zeros((), device=linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + self.scale * self.aux_weight, self.bias)


def build(name: str, variant: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=100).to(device)
    if variant in CONNECTED:
        pathway.connect(model, timm.create_model(name, num_classes=0).to(device), train_aux=variant != "frozen_aux")
        if variant == "addcmul":
            for module in model.modules():
                if isinstance(module, pathway.PathwayWeight):
                    module.__class__ = AddcmulPathway
    elif variant == "reference":
        aux = timm.create_model(name, num_classes=0).to(device)
        for path, module in list(model.named_modules()):
            if path.startswith("blocks.") and isinstance(module, nn.Linear):
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child,
                        ReferenceLinear(module, aux.get_submodule(path).weight))
    return model


def step_fn(model: nn.Module, variant: str, device: str, batch: int):
    opt = torch.optim.AdamW(pathway.param_groups(model, lr=1e-4, weight_decay=0.05))
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    cache = pathway.cached if variant in ("connected", "addcmul", "frozen_aux") else contextlib.nullcontext

    def step() -> None:
        with amp, cache():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step.optimizer = opt
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(calls: dict[str, Callable[[], None]], device: str, rounds: int) -> dict[str, float]:
    """Median seconds of each call: one warm-up call each, then ``rounds`` rounds calling each in turn, so every
    variant sees the same machine state (thermal, other load) and the ratios are side by side."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            sync(device)
            t = time.perf_counter()
            call()
            sync(device)
            times[key].append(time.perf_counter() - t)
    return {key: statistics.median(ts) for key, ts in times.items()}


def time_steps(name: str, device: str, batch: int, rounds: int) -> dict[str, float]:
    steps = {v: step_fn(build(name, v, device), v, device, batch) for v in VARIANTS}
    return interleaved_medians(steps, device, rounds)


def time_pathway_op(device: str, rounds: int) -> dict[str, float]:
    """``W + lambda * W_aux`` forward + backward alone, on the weights of one ViT-B block (fp32).

    The step times above include the whole model; this isolates what AddScaled changes: lambda's
    gradient as one dot product instead of a full-size ``grad * W_aux`` and a sum.
    """
    from pathway.layer import AddScaled

    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    tensors = [[torch.randn(s, device=device, requires_grad=True) for _ in range(2)] for s in shapes]
    scales = [torch.zeros((), device=device, requires_grad=True) for _ in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    formulas = {"AddScaled": AddScaled.apply, "addcmul": lambda w, s, a: torch.addcmul(w, s, a)}

    def run(formula) -> None:
        for (weight, aux), scale, grad in zip(tensors, scales, grads):
            torch.autograd.backward(formula(weight, scale, aux), grad)

    return interleaved_medians({key: partial(run, formula) for key, formula in formulas.items()}, device, rounds * 4)


def time_inference(name: str, device: str, batch: int, rounds: int) -> dict[str, float]:
    plain = build(name, "plain", device).eval()
    folded = build(name, "connected", device).eval()
    for lam in pathway.lambdas(folded).values():
        lam.data.fill_(0.1)
    pathway.fold(folded)
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.no_grad():
        return interleaved_medians({"plain": partial(plain, x), "folded": partial(folded, x)}, device, rounds)


def connect_fold_time(name: str, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    target = timm.create_model(name, num_classes=100).to(device)
    aux = timm.create_model(name, num_classes=0).to(device)
    x = torch.randn(1, 3, 224, 224, device=device)
    with torch.no_grad():
        target.eval()(x)
        sync(device)
        t = time.perf_counter()
        target(x)
        sync(device)
        forward = time.perf_counter() - t
    t = time.perf_counter()
    pathway.connect(target, aux)
    connect = time.perf_counter() - t
    t = time.perf_counter()
    pathway.fold(target)
    fold = time.perf_counter() - t
    return {"forward_batch1": forward, "connect": connect, "fold": fold}


def peak_memory(name: str, variant: str, device: str, batch: int) -> dict[str, float]:
    """Two training steps in this (fresh) process: peak bytes, and the persistent state's bytes.

    On the CPU the peak is the process's peak RSS, which the activations set; the allocator reuses
    memory freed by activations for later tensors, so the state (parameters, gradients, optimizer
    state, each counted exactly) says what a pathway adds that stays.
    """
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build(name, variant, device)
    step = step_fn(model, variant, device, batch)
    step()
    step()
    sync(device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optim = sum(t.numel() * t.element_size() for s in step.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_rss()
    return {"peak": float(peak), "state": float(params + grads + optim), "params": float(params),
            "grads": float(grads), "optim": float(optim)}


def _peak_rss() -> float:
    """This process image's peak RSS in bytes: ``VmHWM``. ``ru_maxrss`` survives ``fork`` + ``exec``, so
    every variant's subprocess reported the parent's peak (the same figure for all: what the README
    showed before 2026-12-04)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def memory_table(name: str, device: str, batch: int) -> dict[str, dict[str, float]]:
    out = {}
    for v in VARIANTS:
        cmd = [sys.executable, "-P", __file__, "--memory-of", v, "--models", name, "--batch", str(batch),
               "--device", device]
        out[v] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["vit_small_patch16_224", "vit_base_patch16_224"],
                        help="timm models to step; none (--models with no name) measures only the pathway op")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(peak_memory(args.models[0], args.memory_of, args.device, args.batch)))
        return
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; batch {args.batch}; median of {args.rounds} rounds"
          + ("; bf16 autocast" if args.device == "cuda" else "; fp32"))
    results = {}
    for name in args.models:
        steps = time_steps(name, args.device, args.batch, args.rounds)
        memory = memory_table(name, args.device, args.batch)
        infer = time_inference(name, args.device, args.batch, args.rounds)
        cf = connect_fold_time(name, args.device)
        results[name] = {"step_s": steps, "peak_bytes": memory, "inference_s": infer, "connect_fold_s": cf}
        print(f"\n{name}")
        print(f"  {'variant':<10} {'step (s)':>9} {'vs plain':>9} {'peak (MiB)':>11} {'vs plain':>9} "
              f"{'state (MiB)':>12} {'vs plain':>9} {'params':>7} {'grads':>7} {'optim':>7}")
        for v in VARIANTS:
            m, p = memory[v], memory["plain"]
            print(f"  {v:<10} {steps[v]:9.3f} {steps[v] / steps['plain']:9.3f} {m['peak'] / 2**20:11.0f} "
                  f"{m['peak'] / p['peak']:9.3f} {m['state'] / 2**20:12.0f} {m['state'] / p['state']:9.3f} "
                  f"{m['params'] / 2**20:7.0f} {m['grads'] / 2**20:7.0f} {m['optim'] / 2**20:7.0f}")
        print(f"  connected vs reference step: {steps['connected'] / steps['reference']:.3f}; "
              f"connected vs addcmul (the plain formula): {steps['connected'] / steps['addcmul']:.3f}")
        print(f"  inference: folded {infer['folded']:.3f}s vs plain {infer['plain']:.3f}s "
              f"(ratio {infer['folded'] / infer['plain']:.3f})")
        print(f"  connect {cf['connect']:.2f}s, fold {cf['fold']:.3f}s "
              f"(a batch-1 forward takes {cf['forward_batch1']:.2f}s)")
    op = time_pathway_op(args.device, args.rounds)
    results["pathway_op_s"] = op
    print(f"\nW + lambda * W_aux forward + backward, one ViT-B block's weights: AddScaled "
          f"{op['AddScaled'] * 1e3:.2f} ms, addcmul {op['addcmul'] * 1e3:.2f} ms "
          f"(ratio {op['AddScaled'] / op['addcmul']:.3f})")
    print("\njson:", json.dumps(results))


if __name__ == "__main__":
    main()
