"""kill -9 in the middle of an epoch, then --resume: the run ends with the same weights as one never interrupted.

Run for every demo recipe: each modality brings its own augmentation randomness and data order,
which the checkpoint must restore exactly. Then the cluster's ways to stop a job: SIGTERM (the same command
continues the run), Ctrl-C, a full disk, a run killed before its export, a second run on the same folder, and a
run resumed on another number of processes.
"""

import json
import os
import signal
import subprocess
import sys
import threading
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


def _weights_differ(a: Path, b: Path) -> dict[str, float]:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    return {k: v for k, v in ((k, (first[k] - second[k]).abs().max().item()) for k in first) if v}


def _saved_steps(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("ckpt-*.pt")) if folder.exists() else []


def _send_when_logged(log: Path, rows: int, send) -> threading.Thread:
    """A thread that calls ``send()`` once ``log`` holds ``rows`` rows (the run is mid-epoch by then)."""
    def wait_and_send() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= rows):
            time.sleep(0.01)
        send()

    thread = threading.Thread(target=wait_and_send)
    thread.start()
    return thread


@pytest.fixture
def one_thread():
    """In-process runs with the intra-op threads of the subprocesses (OMP_NUM_THREADS=1): bit-identical sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(threads)


def test_sigterm_mid_epoch_then_the_same_command_matches_uninterrupted(tmp_path, one_thread, capsys):
    """SIGTERM (a preemption) ends the run, a subprocess, after its current step with a checkpoint and a line
    saying so; the very same command then continues it, to the weights of a run never stopped (bit-identical)."""
    from pathway.train.cli import main
    from pathway.train.demo_data import make_demo_data

    data = make_demo_data("timeseries", tmp_path / "data", per_class=20)  # 16 steps an epoch: none ends here
    argv = command("timeseries", data, tmp_path, "cut", ["train.checkpoint_every=0", "data.val_split=",
                                                         "output.plots=false"])  # only the signal checkpoints
    proc = subprocess.Popen(argv, env=one_thread, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = _send_when_logged(tmp_path / "cut" / "metrics.jsonl", 3, lambda: proc.send_signal(signal.SIGTERM))
    whole = [a if a != "output.name=cut" else "output.name=whole" for a in argv[3:]]  # in this process meanwhile
    assert main(whole) == 0
    sender.join()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGTERM after step" in err and "run the same command" in err
    stopped_at = _saved_steps(tmp_path / "cut" / "checkpoints")
    assert len(stopped_at) == 1 and 3 <= stopped_at[0] < STEPS, stopped_at  # the signal's checkpoint, nothing else
    assert not list((tmp_path / "cut" / "checkpoints").glob(".*tmp*"))  # nothing half-written
    assert not (tmp_path / "cut" / "model.safetensors").exists()

    capsys.readouterr()
    assert main(argv[3:]) == 0  # the same command
    assert f"resumed from {tmp_path / 'cut' / 'checkpoints'}" in capsys.readouterr().out
    assert _weights_differ(tmp_path / "whole" / "model.safetensors", tmp_path / "cut" / "model.safetensors") == {}


def _small(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    sets = [f"data.root={data}", "data.demo=false", f"output.dir={out}", f"output.name={name}", "model.embed_dim=16",
            "model.depth=2", "model.num_heads=2", "data.batch_size=4", "train.max_steps=4", "train.log_every=1",
            "output.plots=false", *extra]
    recipe = str(ROOT / "recipes/demo/timeseries.yaml")
    return ["train", recipe, "--no-progress", *[a for s in sets for a in ("--set", s)]]


def test_a_run_killed_before_its_export_finishes_it_and_a_locked_folder_is_refused(tmp_path, capsys):
    """Checkpoints come at the wall-clock interval. A run whose final checkpoint exists but whose export does
    not (kill -9 in between; or a finished run started again) exports when started again, with the same
    weights; while another process holds the run folder, a second run there is refused by name and changes
    nothing."""
    from pathway.train.cli import main
    from pathway.train.demo_data import make_demo_data

    data = make_demo_data("timeseries", tmp_path / "data", per_class=6)
    run = tmp_path / "runs" / "r"
    every_step = ("train.checkpoint_minutes=1e-6", "train.keep_last=10")  # the wall-clock interval, due each step
    assert main(_small(data, tmp_path / "runs", "r", *every_step)) == 0
    assert _saved_steps(run / "checkpoints") == [1, 2, 3, 4]
    first = load_file(str(run / "model.safetensors"))
    for written_by_export in ("model.safetensors", "result.json", "train.csv", "eval.csv"):
        (run / written_by_export).unlink()
    assert main(_small(data, tmp_path / "runs", "r", *every_step)) == 0  # was: KeyError: None at the best evaluation
    assert "resumed from" in capsys.readouterr().out
    again = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("best") == 1  # the end rows are written once, not again on top of the first

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"f = open({str(run / '.pathway-lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "f.seek(0); f.truncate(); f.write(f'pid {os.getpid()} on a test\\n'); f.flush()\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        assert main(_small(data, tmp_path / "runs", "r", *every_step)) == 2
        err = capsys.readouterr().err
        assert f"{run} is in use by another pathway run (pid {holder.pid} on a test)" in err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_says_how_to_continue(tmp_path, capsys):
    """Ctrl-C (SIGINT) finishes the current optimizer step, saves it, says where the run stopped: exit 130."""
    from pathway.train.cli import main
    from pathway.train.demo_data import make_demo_data

    data = make_demo_data("timeseries", tmp_path / "data", per_class=6)
    log = tmp_path / "runs" / "c" / "metrics.jsonl"
    presser = _send_when_logged(log, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    code = main(_small(data, tmp_path / "runs", "c", "train.max_steps=40", "data.val_split="))
    presser.join()
    err = capsys.readouterr().err
    assert code == 130 and "stopped by SIGINT after step" in err and "Traceback" not in err, err
    step = int(err.split("after step ")[1].split()[0])
    assert _saved_steps(tmp_path / "runs" / "c" / "checkpoints") == [step] and 2 <= step < 40
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the CLI's handlers are gone again


def test_a_full_disk_while_checkpointing_is_named_and_leaves_no_temp_file(tmp_path):
    """A write that fails part-way (here a file-size limit, as a full disk fails) keeps the earlier checkpoint,
    removes the partial file and names the file and the disk's free space (torch says 'unexpected pos')."""
    import resource

    from pathway.train import checkpoint as ckpt

    folder = tmp_path / "checkpoints"
    ckpt.save_checkpoint(folder, {"w": torch.ones(10)}, 1, keep_last=3)
    before = (folder / "ckpt-00000001.pt").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, hard))
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"could not write .*ckpt-00000002.pt .*MiB free on its disk"):
            ckpt.save_checkpoint(folder, {"w": torch.zeros(100_000)}, 2, keep_last=3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000001.pt"]
    assert (folder / "ckpt-00000001.pt").read_bytes() == before


def test_a_two_process_run_continues_on_one_process_with_its_global_batch(tmp_path, capsys):
    """2 gloo processes (started as torchrun starts them) stopped by SIGTERM: both ranks agree on the step and
    rank 0 saves; then the same command in 1 process keeps the global batch through accumulation and finishes.
    Without data.global_batch the batch would change with the process count: refused by name."""
    from pathway.train.checkpoint import read_state
    from pathway.train.cli import main
    from pathway.train.config import load_recipe
    from pathway.train.demo_data import make_demo_data
    from pathway.train.engine import Context, WorldSizeError, check_resumable

    data = make_demo_data("timeseries", tmp_path / "data", per_class=10)
    argv = _small(data, tmp_path / "runs", "ddp", "data.global_batch=8", "train.epochs=20", "train.max_steps=12",
                  "train.checkpoint_epochs=100", "data.val_split=")  # 4 steps an epoch; only the signal checkpoints
    ranks = [subprocess.Popen([sys.executable, "-m", "pathway", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"})
             for rank in range(2)]
    sender = _send_when_logged(tmp_path / "runs" / "ddp" / "metrics.jsonl", 2,
                               lambda: [r.send_signal(signal.SIGTERM) for r in ranks])  # as SLURM signals each task
    sender.join()
    outputs = [r.communicate(timeout=120) for r in ranks]
    assert [r.returncode for r in ranks] == [128 + signal.SIGTERM] * 2, outputs
    assert all("stopped by SIGTERM after step" in err and "Traceback" not in err for _, err in outputs), outputs
    (step,) = _saved_steps(tmp_path / "runs" / "ddp" / "checkpoints")
    assert 2 <= step < 12
    saved = read_state(tmp_path / "runs" / "ddp" / "checkpoints" / f"ckpt-{step:08d}.pt")
    assert saved["world"] == 2 and len(saved["rng"]) == 2

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "resumed on 1 process(es) a run saved from 2: global batch 8 = 4 per process x 2 accumulation" in out
    rows = [json.loads(line) for line in (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13))

    grown = load_recipe(ROOT / "recipes/demo/timeseries.yaml", ["data.batch_size=4"])  # no data.global_batch
    state = {"recipe": grown.to_dict(), "rng": [None, None]}
    with pytest.raises(WorldSizeError, match="written by 2 process.* global batch would change from 8 to 4"):
        check_resumable(state, grown, Context(torch.device("cpu")), tmp_path / "ckpt-00000001.pt")


def test_loader_and_logging_settings_may_change_on_resume_and_a_shaping_key_may_not():
    """A requeued job may get another machine: the worker count, the prefetch depth and TensorBoard logging are
    not part of what the checkpoints continue; the batch size is."""
    from pathway.train.checkpoint import recipe_changes
    from pathway.train.config import load_recipe

    image = ROOT / "recipes/demo/image.yaml"
    saved = load_recipe(image).to_dict()
    moved = load_recipe(image, ["data.num_workers=7", "data.prefetch_factor=6", "train.tensorboard=false"]).to_dict()
    assert recipe_changes(saved, moved) == []
    assert recipe_changes(saved, load_recipe(image, ["data.batch_size=5"]).to_dict()) == ["data.batch_size: 32 -> 5"]
