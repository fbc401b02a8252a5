"""Data-loading throughput per adapter, and the share of a training step it costs (prints, asserts nothing).

For each adapter: samples/s through a DataLoader with 2 workers; then, for one batch, the time to load
it in the main process (no workers: the whole cost) against one training step (forward, backward,
AdamW) of the engine's model with a ViT-Ti body (192 wide, 12 blocks) on that batch, connected to an
aux of the same shape. share = load / (load + step): what loading would cost a step if nothing overlapped it.

Files are written into a temporary folder with the same writers the tests use (``tests/make_files.py``):
images 224^2 PNG, 10 s wav at 16 kHz (-> 1024 x 128 fbank), 8192-point binary PLY clouds (-> 1024 points),
64-frame 128^2 mp4 (-> 16 frames at rate 4, 112^2) and 3 x 512 time series. Training transforms are on.
Run: ``.venv/bin/python benchmarks/bench_data_loading.py``.

``--epoch-start``: the first log window of each epoch (its first ``2 x workers`` batches) through the engine's
loader pieces (``SeededItems``, ``EpochSampler``, ``collate``), with workers kept across epochs (what
``make_loader`` builds) and forked again at every epoch (the engine before issue 19). Epoch 0 starts the workers
in both; the later epochs show what the re-fork costs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import make_files as mf  # noqa: E402

import pathway.adapters.registry as adapters  # noqa: E402

CASES = {
    # name: (files per class, writer(path, i), extension, adapter options)
    "image": (32, lambda p, i: mf.write_image(p, size=224, seed=i), "png", {"img_size": 224}),
    "audio": (16, lambda p, i: mf.write_audio(p, seconds=10.0, freq=200 + 50 * i), "wav", {}),
    "point": (32, lambda p, i: mf.write_point_cloud(p, n=8192, seed=i), "ply", {"num_points": 1024}),
    "video": (8, lambda p, i: mf.write_video(p, frames=64, size=128, seed=i), "mp4", {"img_size": 112}),
    "timeseries": (64, lambda p, i: mf.write_series(p, channels=3, length=512, seed=i), "npy", {"length": 512}),
}


def load_and_step_seconds(adapter, batch_size: int) -> tuple[float, float]:
    """Median of 3: one batch loaded in this process, and one connected training step on it."""
    import statistics

    import pathway
    from pathway.train.model import TransformerModel

    def model() -> TransformerModel:
        return TransformerModel(adapter.tokenizer(192), adapter.head(192), 192, 12, 3)

    net = model()
    pathway.connect(net, model(), target_inputs=adapter.example_input()[None],
                    aux_inputs=adapter.example_input()[None])
    optimizer = torch.optim.AdamW(pathway.param_groups(net, lr=1e-4, weight_decay=0.05))
    dataset = adapter.dataset("train", train=True)
    loads, steps = [], []
    for r in range(4):
        start = time.perf_counter()
        items = [dataset[(r * batch_size + i) % len(dataset)] for i in range(batch_size)]
        x, y = torch.utils.data.default_collate(items)
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        with pathway.cached():
            logits = net(x)
            if adapter.task == "multilabel":
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
            else:  # classification, or per-point segmentation (logits [B, N, C])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten().long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps.append(time.perf_counter() - start)
    return statistics.median(loads[1:]), statistics.median(steps[1:])


def write_files(name: str, root: Path):
    """The case's files under ``root`` (two classes) and its adapter."""
    per_class, write, ext, options = CASES[name]
    for c in ("a", "b"):
        for i in range(per_class):
            write(root / "train" / c / f"{i}.{ext}", i)
    return adapters.get(name)(root, **options)


def epoch_start_rates(dataset, *, persistent: bool, workers: int, batch_size: int, epochs: int) -> list[float]:
    """Samples/s over the first ``2 x workers`` batches of each epoch (iterator creation included)."""
    from pathway.train.data import EpochSampler, SeededItems, collate

    items = SeededItems(dataset, seed=0)
    sampler = EpochSampler(len(items), seed=0, shuffle=True)
    loader = DataLoader(items, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                        drop_last=True, persistent_workers=persistent, prefetch_factor=2)
    window = 2 * workers
    rates = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        batches = iter(loader)
        for _ in range(window):
            next(batches)
        rates.append(window * batch_size / (time.perf_counter() - start))
        for _ in batches:  # the rest of the epoch, as the loop reads it
            pass
    return rates


def epoch_start(name: str = "image", workers: int = 2, batch_size: int = 8, epochs: int = 4) -> None:
    print(f"torch {torch.__version__}, {name}: first {2 * workers} batches of {batch_size} of each epoch, "
          f"{workers} workers")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_files(name, Path(tmp) / name).dataset("train", train=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for persistent in (False, True):
                rates = epoch_start_rates(dataset, persistent=persistent, workers=workers, batch_size=batch_size,
                                          epochs=epochs)
                print(f"{'persistent' if persistent else 'forked per epoch':17s} samples/s by epoch: "
                      + "  ".join(f"{r:7.1f}" for r in rates), flush=True)


def main(workers: int = 2, batch_size: int = 8) -> None:
    print(f"torch {torch.__version__}, DataLoader num_workers={workers}, batch_size={batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            adapter = write_files(name, Path(tmp) / name)
            loader = DataLoader(adapter.dataset("train", train=True), batch_size=batch_size, num_workers=workers,
                                shuffle=True, persistent_workers=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                next(iter(loader))  # start the workers, import the readers
                start = time.perf_counter()
                n = sum(len(y) for _, y in loader)
                seconds = time.perf_counter() - start
            shape = tuple(adapter.dataset("train", train=False)[0][0].shape)
            load, step = load_and_step_seconds(adapter, batch_size)
            print(f"{name:10s} {n:4d} samples x {shape}: {n / seconds:8.1f} samples/s ({seconds:.2f} s); "
                  f"one batch: load {1000 * load:7.1f} ms vs ViT-Ti step {1000 * step:7.1f} ms "
                  f"-> share {100 * load / (load + step):4.1f} %", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epoch-start", action="store_true",
                        help="the first window of each epoch, workers kept vs forked again per epoch")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.epoch_start:
        epoch_start(workers=args.workers)
    else:
        main(workers=args.workers)
