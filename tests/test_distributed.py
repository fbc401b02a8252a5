"""Multi-process correctness on 2 CPU processes (gloo), without a GPU: per-rank randomness, the stop on a
non-finite loss, distributed evaluation, the process group's teardown; and, in one process, persistent loader
workers, the default worker count, SyncBatchNorm's conversion, the data-wait share of a log window.

The two processes are started once for the module (``two_ranks``) and run every scenario; each test reads
its part of what they reported."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from torch import nn

SEED = 7


class Numbered(torch.utils.data.Dataset):
    """Item i: a feature row drawn under the item's seed (so a sharded run must load the same rows) and a label;
    the items in ``unreadable`` are ``LeftOut``, as an evaluation set gives a file it could not read."""

    def __init__(self, n: int, dim: int = 6, classes: int = 3, views: int = 1, unreadable: tuple[int, ...] = ()
                 ) -> None:
        self.n, self.dim, self.classes, self.views, self.unreadable = n, dim, classes, views, unreadable

    def __len__(self) -> int:
        return self.n * self.views

    def __getitem__(self, i: int):
        from pathway.adapters.base import LeftOut

        if i in self.unreadable:
            return LeftOut()
        x = torch.randn(self.dim)
        y = (i // self.views) % self.classes
        return (x, y, i // self.views) if self.views > 1 else (x, y)


def model_draws(seed: int, rank: int) -> dict:
    """What a rank's training randomness draws after the engine's seeding: the build (same everywhere), then its
    own stream: the first mixup/CutMix parameters (timm Mixup, built by the engine's build_mixup), a drop-path
    mask and a dropout mask."""
    from timm.models.vision_transformer import Block

    from pathway.train.cluster.seeding import seed_everything, seed_rank_streams
    from pathway.train.config import recipe_from_dict
    from pathway.train.optim import build_mixup

    seed_everything(seed)
    block = Block(16, 2, drop_path=0.5, proj_drop=0.5).train()  # built identically on every rank
    seed_rank_streams(seed, rank)
    mixup = build_mixup(recipe_from_dict({"train": {"mixup": 0.8, "cutmix": 1.0}}), 10, "classification")
    lam, cutmix = mixup._params_per_batch()  # the draws mixup(x, y) makes for a batch
    drop_path = (block.drop_path1(torch.ones(32, 1, 1)) > 0).flatten().tolist()
    dropout = (block.mlp.drop2(torch.ones(32)) > 0).tolist()
    return {"lam": float(lam), "cutmix": bool(cutmix), "drop_path": drop_path, "dropout": dropout,
            "weights": float(block.attn.qkv.weight.detach().sum())}


def nonfinite_stop(rank: int, world: int) -> dict:
    """Train a DDP Linear with engine.optimizer_step (2 micro-batches a step); rank 1's loss is NaN at step 3.
    Returns the step at which this rank stopped and whether its weights are finite."""
    import torch.distributed as dist

    from pathway.train.engine import Context, optimizer_step

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    net = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = Context(torch.device("cpu"), rank, world)
    step = 0

    class Stopped(Exception):
        pass

    def loss_of(batch):
        loss = net(batch).pow(2).mean()
        return (loss * float("nan") if rank == 1 and step == 3 else loss), batch.shape[0]

    def stop(value: float) -> None:
        raise Stopped

    batches = iter([torch.randn(2, 4) for _ in range(20)])
    stopped_at = None
    try:
        while step < 8:
            optimizer_step(net, batches, loss_of, optimizer, scaler, ctx, 2, 1.0, stop)
            step += 1
    except Stopped:
        stopped_at = step
    dist.barrier()
    return {"stopped_at": stopped_at, "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}


def stop_agreement(rank: int, world: int) -> dict:
    """Five engine.optimizer_step calls carrying a StopAgreement: rank 0's checkpoint clock is due at step 1,
    rank 1 receives SIGTERM before step 3. Returns the (stop, due) each step agreed and the all-reduces made."""
    import signal

    import torch.distributed as dist

    from pathway.train.cluster.preempt import CheckpointClock, StopAgreement, StopSignals
    from pathway.train.engine import Context, optimizer_step

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stops, clock = StopSignals(), CheckpointClock(60.0)  # not entered: received is set by hand below
    agreement = StopAgreement(stops, clock)
    real, calls = dist.all_reduce, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def nonfinite(value: float) -> None:
        raise AssertionError(f"loss {value}")

    agreed = []
    dist.all_reduce = counted
    try:
        for step in range(5):
            if rank == 0 and step == 1:
                clock.last -= 3600  # an hour since the last checkpoint, on this rank's clock only
            if rank == 1 and step == 3:
                stops.received = signal.SIGTERM
            optimizer_step(model, iter([torch.randn(2, 4)]), lambda b: (model(b).pow(2).mean(), b.shape[0]),
                           optimizer, scaler, Context(torch.device("cpu"), rank, world), 1, None, nonfinite,
                           agreement=agreement)
            agreed.append([agreement.stop, agreement.due])
            if agreement.due:
                clock.saved()  # the engine's save() resets the clock on every rank
    finally:
        dist.all_reduce = real
    return {"agreed": agreed, "all_reduces": len(calls)}


def scenarios() -> tuple[tuple[str, Numbered], ...]:
    """11 items; 5 items x 3 views; 11 items of which 0, 2, 5 and 7 are unreadable: under 2 ranks a whole batch
    of 2 on each rank (rank 0's first, rank 1's second) is empty, and the shares read (4 and 3 items) differ in
    length, which gather_rows must keep paired (logits with their targets)."""
    left_out = Numbered(11, unreadable=(0, 2, 5, 7))
    return ("single", Numbered(11)), ("views", Numbered(5, views=3)), ("left_out", left_out)


def sharded_evaluation(rank: int, world: int) -> dict:
    """engine.evaluate over this rank's share of each of the scenarios, as the engine runs it."""
    from pathway.train.data import make_loader
    from pathway.train.engine import Context, evaluate

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    ctx = Context(torch.device("cpu"), rank, world)
    out = {}
    for name, data in scenarios():
        loader, _ = make_loader(data, batch_size=2, num_workers=0, seed=SEED, shuffle=False, rank=rank, world=world)
        out[name] = evaluate(model, loader, ctx, "top1", "classification")
    return out


def one_process_evaluation() -> dict:
    from pathway.train.data import make_loader
    from pathway.train.engine import Context, evaluate

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    out = {}
    for name, data in scenarios():
        loader, _ = make_loader(data, batch_size=4, num_workers=0, seed=SEED, shuffle=False)
        out[name] = evaluate(model, loader, Context(torch.device("cpu")), "top1", "classification")
    return out


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from pathway.train.cluster.distributed import release
    from pathway.train.engine import Context

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    report = {"draws": [model_draws(SEED, rank), model_draws(SEED, rank)],  # the same run twice
              "stop": nonfinite_stop(rank, world), "evaluation": sharded_evaluation(rank, world),
              "agreement": stop_agreement(rank, world)}
    release(Context(torch.device("cpu"), rank, world, owns_group=False))  # a group it did not start is left alone
    report["kept_foreign_group"] = dist.is_initialized()
    release(Context(torch.device("cpu"), rank, world, owns_group=True))
    report["destroyed_own_group"] = not dist.is_initialized()
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import pathway.train.engine  # noqa: F401  imported once here: the forked ranks start with it

    # fork, not spawn: a spawned rank imports torch, timm and the engine again (about 5 s of CPU each)
    mp.start_processes(_rank_main, args=(2, port, str(out)), nprocs=2, start_method="fork")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ranks_draw_their_own_mixup_and_drop_path_and_a_run_repeats_exactly(two_ranks):
    first = [r["draws"][0] for r in two_ranks]
    assert first[0]["weights"] == first[1]["weights"]  # the model is built alike on every rank
    assert first[0]["lam"] != first[1]["lam"]  # issue 19: both ranks drew 0.4785
    assert first[0]["drop_path"] != first[1]["drop_path"] and first[0]["dropout"] != first[1]["dropout"]
    for rank in two_ranks:  # a pure function of (seed, world size): the same run twice draws the same
        assert rank["draws"][0] == rank["draws"][1]
    assert first[0] == model_draws(SEED, 0)  # rank 0 draws what a one-process run draws


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_that_step(two_ranks):
    assert [r["stop"] for r in two_ranks] == [{"stopped_at": 3, "finite": True}] * 2


def test_a_stop_or_a_due_checkpoint_on_one_rank_is_agreed_by_all_in_the_step_all_reduce(two_ranks):
    expected = [[False, False], [False, True], [False, False], [True, False], [True, False]]
    assert [r["agreement"]["agreed"] for r in two_ranks] == [expected] * 2
    assert [r["agreement"]["all_reduces"] for r in two_ranks] == [5, 5]  # one collective per step, loss included


def test_sharded_evaluation_equals_one_process(two_ranks):
    alone = one_process_evaluation()
    for rank in two_ranks:
        for name, _ in scenarios():  # shares of 6 and 5 items; of 5 items x 3 views; of 4 and 3 items read
            got, want = dict(rank["evaluation"][name]), dict(alone[name])
            assert got.pop("loss") == pytest.approx(want.pop("loss"), rel=1e-6)  # summed in another order
            assert got == want and set(got) == {"top1"}  # 3 classes: no top5


def test_the_process_group_is_destroyed_only_by_its_creator(two_ranks):
    assert all(r["kept_foreign_group"] and r["destroyed_own_group"] for r in two_ranks)


# -- one process ----------------------------------------------------------------------------------------


class Pid(torch.utils.data.Dataset):
    """A random value, the process that loaded the item, and whether that process ignores SIGTERM."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        import signal

        return torch.rand(1), os.getpid(), signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_loader_workers_persist_across_epochs_keep_their_epoch_seeds_and_ignore_stop_signals():
    from pathway.train.data import make_loader, set_epoch

    def epochs(workers: int) -> tuple[list, set, set]:
        loader, sampler = make_loader(Pid(), batch_size=2, num_workers=workers, seed=SEED, shuffle=True)
        values, pids, ignored = [], set(), set()
        for epoch in range(3):
            set_epoch(loader, sampler, epoch)
            for x, pid, ignores_sigterm in loader:
                values.append(x)
                pids.update(pid.tolist())
                ignored.update(ignores_sigterm.tolist())
        return values, pids, ignored

    inline, _, _ = epochs(0)
    worked, pids, ignored = epochs(1)
    assert len(pids) == 1 and os.getpid() not in pids  # one worker process served every epoch
    assert ignored == {True}  # every loader's workers leave the stop signals to the main process
    assert all(torch.equal(a, b) for a, b in zip(inline, worked, strict=True))  # the epoch reached the worker
    assert not torch.equal(inline[0], inline[2])  # and each epoch draws anew


@pytest.mark.parametrize("cores, local_processes, cuda, workers", [
    (16, 1, True, 15),  # the H200 machine: 14 fed ViT-B/16; one process keeps a core
    (96, 8, True, 11),  # an 8-GPU node
    (256, 1, True, 16),  # capped
    (2, 1, False, 1), (64, 1, False, 4),  # on the CPU the step needs the cores
    (2, 2, False, 0),  # two CPU processes on two cores: load in the process
])
def test_default_worker_count_is_the_process_share_of_the_cores(monkeypatch, cores, local_processes, cuda, workers):
    from pathway.train import data

    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    assert data.default_workers(cuda) == workers


def test_batchnorm_becomes_syncbatchnorm_only_for_ddp_on_gpus():
    from pathway.train.cluster.distributed import sync_batchnorm
    from pathway.train.engine import Context

    def point_head() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    cpu, gpus = Context(torch.device("cpu"), 0, 2), Context(torch.device("cuda", 0), 0, 2)
    head = point_head()
    keys, weight = list(head.state_dict()), head[1].weight
    assert isinstance(sync_batchnorm(head, cpu)[1], nn.BatchNorm1d)  # SyncBatchNorm runs on GPUs only
    converted = sync_batchnorm(head, gpus)  # the conversion itself touches no device
    assert isinstance(converted[1], nn.SyncBatchNorm) and list(converted.state_dict()) == keys
    assert converted[1].weight is weight  # the optimizer's parameters stay the model's
    single = point_head()
    assert isinstance(sync_batchnorm(single, Context(torch.device("cuda", 0)))[1], nn.BatchNorm1d)  # no DDP


def test_a_slow_loader_shows_as_data_wait():
    from pathway.train.engine import Context
    from pathway.train.throughput import Window

    def slow(n: int):
        for i in range(n):
            time.sleep(0.02)
            yield i

    window = Window()
    for _ in window.batches(slow(5)):
        window.add(8)
    row = window.row(Context(torch.device("cpu")))
    assert row["data_wait"] > 0.9 and 0 < row["samples_per_s"] < 8 / 0.02

    for _ in window.batches(range(5)):  # a loader that always has the batch ready
        time.sleep(0.02)  # the step
        window.add(8)
    with window.paused():  # an evaluation: left out of the window
        time.sleep(0.2)
    row = window.row(Context(torch.device("cpu")))
    assert row["data_wait"] < 0.1 and row["samples_per_s"] > 40 / 0.2
