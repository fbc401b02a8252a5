"""Cost of one training step of the engine's model: plain target, connected (W + lambda * W_aux) with and
without ``pathway.cached()``, and the folded model. Prints medians; asserts nothing.

    python benchmarks/bench_engine.py [--dim 192 --depth 6 --batch 32 --repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch

import pathway
from pathway.tokenizers import ImagePatchTokenizer
from pathway.adapters.heads import ClassificationHead
from pathway.train.model import TransformerModel


def make(dim: int, depth: int) -> TransformerModel:
    return TransformerModel(ImagePatchTokenizer(32, 4, 3, dim), ClassificationHead(dim, 10), dim, depth, max(1, dim // 64))


def step_time(model, x, y, cached: bool, repeats: int) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        with pathway.cached() if cached else nullcontext():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(a.batch, 3, 32, 32), torch.randint(0, 10, (a.batch,))
    plain = make(a.dim, a.depth)
    connected = copy.deepcopy(plain)
    pathway.connect(connected, make(a.dim, a.depth), target_inputs=x[:1], aux_inputs=x[:1], lambda_init=0.1)
    base = step_time(plain, x, y, False, a.repeats)
    rows = [("plain target", base), ("connected", step_time(connected, x, y, False, a.repeats)),
            ("connected + pathway.cached()", step_time(connected, x, y, True, a.repeats))]
    pathway.fold(connected)
    rows.append(("folded", step_time(connected, x, y, False, a.repeats)))
    print(f"D={a.dim} depth={a.depth} batch={a.batch} tokens=64, {torch.get_num_threads()} threads, "
          f"median of {a.repeats} fwd+bwd+AdamW steps")
    for name, ms in rows:
        print(f"  {name:<30} {ms:8.1f} ms   x{ms / base:.2f}")


if __name__ == "__main__":
    main()
