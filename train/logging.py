"""Run logs: a JSONL file (one record per logged step), TensorBoard events, and a loss/lr plot.

Only rank 0 creates a :class:`RunLogger`; every other rank gets :class:`NullLogger`.
"""
from __future__ import annotations

import json
import math
import os
import time


class NullLogger:
    def log(self, record: dict):
        pass

    def event(self, kind: str, **fields):
        pass

    def close(self):
        pass


class RunLogger:
    """Appends to ``<run>/log.jsonl`` and writes TensorBoard scalars to ``<run>/tensorboard``.

    A record is a flat dict with at least ``step``; numeric fields other than step/epoch become
    TensorBoard scalars ``train/<name>``. On resume pass `start_step` (the checkpoint's step) so
    TensorBoard drops the events past it that the interrupted run had written, and keeps the
    checkpoint's own (the JSONL keeps them all; readers take the last record of each step, see
    :func:`read_log`).
    """

    def __init__(self, run_dir: str, start_step: int = 0, tensorboard: bool = True):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "log.jsonl")
        self._f = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                     purge_step=start_step + 1 if start_step > 0 else None)

    def log(self, record: dict):
        record = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps(record, default=_plain) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if k in ("step", "epoch", "time", "kind") or not isinstance(v, (int, float)):
                    continue
                if isinstance(v, bool) or not math.isfinite(float(v)):
                    continue
                self._tb.add_scalar(f"train/{k}", v, record["step"])

    def event(self, kind: str, **fields):
        """A non-step record (start, resume, stop, eval results)."""
        self._f.write(json.dumps({"time": round(time.time(), 3), "kind": kind, **fields},
                                 default=_plain) + "\n")
        if self._tb is not None and kind == "oknn":
            for k, v in fields.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"oknn/{k}", v, fields.get("step", 0))

    def close(self):
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def read_log(path: str) -> list[dict]:
    """The step records of a log.jsonl, one per step (the last one written wins), sorted by step."""
    by_step = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if "kind" not in rec and "step" in rec:
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_lr(log_path: str, out_png: str) -> str | None:
    """Loss and learning rate against step, from the JSONL log, as a PNG (matplotlib Agg)."""
    records = read_log(log_path)
    records = [r for r in records if "loss" in r]
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax1 = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax1.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(steps, [r.get("lr", float("nan")) for r in records], color="tab:orange", label="lr")
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax1.set_title(os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
