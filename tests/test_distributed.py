"""torchrun with 2 processes (gloo on the CPU): the ranks stay in sync and only rank 0 writes."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from train import checkpoint as ckpt
from train.logging import read_log


def _tiny_ddp_run(tmp_path, name, *extra):
    """(torchrun command, environment) of a 2-process gloo run of a tiny preset on 16 synthetic
    images (batch 2 per rank: 4 steps per epoch)."""
    from d3ssl.data.synthetic import ensure_synthetic
    data = ensure_synthetic(root=str(tmp_path / "data"), num_train=16, num_val=4, image_size=(64, 80),
                            workers=1)
    args = ["--data", data, "--out", str(tmp_path), "--name", name,
            "--model.arch", "resnet18", "--view.size", "64", "--model.roi_size", "4",
            "--model.proj_hidden", "32", "--model.pred_hidden", "32", "--model.proj_dim", "16",
            "--model.queue_size", "64", "--data.batch_size", "2", "--data.workers", "0",
            "--data.proposal_workers", "1", "--run.log_every", "1", "--run.progress", "false",
            "--run.oknn", "false", "--run.threads", "1", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train.run", *args]
    return cmd, {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _run_in_sync(tmp_path, name, steps, *extra):
    """Runs `steps` steps of the tiny 2-process run; asserts that it succeeded and that parameters
    (student and EMA teacher) and buffers (the queue, filled from both ranks, and the BN statistics)
    are identical on both ranks after them. Returns the run folder."""
    cmd, env = _tiny_ddp_run(tmp_path, name, "--run.epochs", "1", "--run.max_steps", str(steps),
                             "--run.debug_checksum", "true", *extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = tmp_path / name
    sums = [json.loads((run / f"checksum.rank{r}").read_text()) for r in (0, 1)]
    assert sums[0]["params"] == sums[1]["params"]
    assert sums[0]["buffers"] == sums[1]["buffers"]
    return run


@pytest.mark.slow
def test_two_process_gloo_run_stays_in_sync(tmp_path):
    run = _run_in_sync(tmp_path, "ddp", steps=3)
    # The steps happened: 16 images / (2 ranks x batch 2) = 4 per epoch, stopped at 3.
    records = read_log(str(run / "log.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    # Only rank 0 writes: one log line per step, one start event, one checkpoint set.
    lines = [json.loads(line) for line in open(run / "log.jsonl")]
    assert sum(1 for r in lines if r.get("kind") == "start") == 1
    assert sum(1 for r in lines if r.get("step") == 1 and "kind" not in r) == 1
    start = next(r for r in lines if r.get("kind") == "start")
    assert start["world_size"] == 2 and start["steps_per_epoch"] == 4
    # The learning rate follows the global batch (2 ranks x 2 images).
    lr_per_256 = json.loads((run / "config.json").read_text())["optim"]["lr_per_256"]
    assert start["base_lr"] == pytest.approx(lr_per_256 * 4 / 256)
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [3]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(run)))
    # The queue holds teacher features of both ranks: 2 teacher views x 2 ranks x 2 images x K boxes
    # per step at most (valid boxes only), written for 3 steps.
    filled = int(state["model"]["queue_filled"])
    assert 0 < filled <= min(64, 3 * 2 * 2 * 2 * 4) and filled > 3 * 2 * 2 * 2  # > one box per image



@pytest.mark.slow
def test_two_process_gloo_run_with_compile_stays_in_sync(tmp_path):
    """--compile under torchrun: the DDP-wrapped method compiled (inductor, CPU) trains the same
    steps on both ranks, and they end in sync."""
    run = _run_in_sync(tmp_path, "ddpc", 2, "--compile")
    assert [r["step"] for r in read_log(str(run / "log.jsonl"))] == [1, 2]
    assert json.loads((run / "config.json").read_text())["run"]["compile"] is True


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


def _rank_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks' processes in /proc")
def test_sigterm_to_one_rank_stops_both_after_the_same_step(tmp_path):
    """SIGTERM to rank 1 only: the ranks agree on it through the step's all-reduce and both leave
    the loop after the same step (a rank leaving alone would leave the other waiting in a collective
    for ever); rank 0 saves and says so."""
    import signal
    import time
    cmd, env = _tiny_ddp_run(tmp_path, "term", "--run.epochs", "100", "--run.ckpt_every", "1000")
    log = tmp_path / "term" / "log.jsonl"
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and not (
                    log.is_file() and read_log(str(log))):
                time.sleep(0.5)
            assert proc.poll() is None and log.is_file(), (tmp_path / "out.txt").read_text()[-4000:]
            ranks = {_rank_of(p): p for p in _children(proc.pid)}
            assert 1 in ranks, ranks
            os.kill(ranks[1], signal.SIGTERM)
            assert proc.wait(timeout=180) == 0, (tmp_path / "out.txt").read_text()[-4000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp_path / "out.txt").read_text()
    assert "SIGTERM (another rank): saved step" in text, text[-4000:]
    last = read_log(str(log))[-1]["step"]
    events = [json.loads(line) for line in open(log)]
    assert events[-1]["kind"] == "stop" and events[-1]["step"] == last
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "term"))][-1] == last


@pytest.mark.slow
def test_two_process_run_evaluates_oknn_on_rank_0_after_the_group_is_gone(tmp_path):
    """Under DDP the end-of-run O-KNN runs once, on rank 0, after the process group is destroyed
    (nothing in it may need the group any more), and its result reaches the log."""
    cmd, env = _tiny_ddp_run(tmp_path, "ddp_oknn", "--run.epochs", "1", "--run.max_steps", "2",
                             "--run.oknn", "true", "--run.oknn_random_draws", "1", "--run.oknn_image_size", "64",
                             "--run.oknn_k", "3")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("O-KNN top-1: trained") == 1, proc.stdout[-2000:]   # rank 0 only
    lines = [json.loads(line) for line in open(tmp_path / "ddp_oknn" / "log.jsonl")]
    oknn = [r for r in lines if r.get("kind") == "oknn"]
    assert len(oknn) == 1 and oknn[0]["step"] == 2
