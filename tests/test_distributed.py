"""torchrun with 2 processes (gloo on the CPU): the ranks stay in sync and only rank 0 writes."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from train import checkpoint as ckpt
from train.logging import read_log


@pytest.mark.slow
def test_two_process_gloo_run_stays_in_sync(tmp_path):
    from d3ssl.data.synthetic import ensure_synthetic
    data = ensure_synthetic(root=str(tmp_path / "data"), num_train=16, num_val=4, image_size=(64, 80),
                            workers=1)
    args = ["--data", data, "--out", str(tmp_path), "--name", "ddp",
            "--model.arch", "resnet18", "--view.size", "64", "--model.roi_size", "4",
            "--model.proj_hidden", "32", "--model.pred_hidden", "32", "--model.proj_dim", "16",
            "--model.queue_size", "64", "--data.batch_size", "2", "--data.workers", "0",
            "--data.proposal_workers", "1", "--run.epochs", "1", "--run.max_steps", "3",
            "--run.log_every", "1", "--run.progress", "false", "--run.oknn", "false",
            "--run.threads", "1", "--run.debug_checksum", "true"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "train.run", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = tmp_path / "ddp"
    sums = [json.loads((run / f"checksum.rank{r}").read_text()) for r in (0, 1)]
    # Parameters (student and EMA teacher) and buffers (the queue, filled from both ranks, and the
    # BN statistics) are identical on both ranks after the steps.
    assert sums[0]["params"] == sums[1]["params"]
    assert sums[0]["buffers"] == sums[1]["buffers"]
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
    assert start["base_lr"] == pytest.approx(1.0 * 4 / 256)
    assert [s for s, _ in ckpt.list_checkpoints(str(run))] == [3]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(run)))
    # The queue holds teacher features of both ranks: 2 teacher views x 2 ranks x 2 images x K boxes
    # per step at most (valid boxes only), written for 3 steps.
    filled = int(state["model"]["queue_filled"])
    assert 0 < filled <= min(64, 3 * 2 * 2 * 2 * 4) and filled > 3 * 2 * 2 * 2  # > one box per image
