"""Training throughput: the full D3SSL step fed by each loader backend vs fed by data already on the device.

One step = region stage (PRC, PRM, RBJ, de-positioning) -> five views through student and teacher ->
loss -> backward -> LARS step -> teacher EMA: the trainer's own step (train/step.py's TrainStep, whose
docstring gives the order: the loss is read after the forward while the backward runs, the next
step's batch copy and region stage are queued behind the backward). The anchor is the same step
fed by one batch kept on the device (the model-only ceiling), timed in the same run, so the ratio
fed / ceiling is the share of the ceiling the loader lets training reach (target 0.95). SoCo's step
(its own augmentations and BYOL objective) is reported against D3SSL's ceiling for comparison.

Settings: on a GPU (no --quick) ResNet-50-C4 at 224 px, batch 64, bf16, channels_last, fed from 640x480
JPEGs; with --quick, or on a CPU, ResNet-18-C4 at small views of 160x128 JPEGs so the section finishes
in a minute or two.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import torch

from benchmarks.common import COCO_SIZE, Row, bench_dataset, interleaved
from train.step import TrainStep, loader_options, view_dtype


def _config(args, method):
    from train.config import make_config
    gpu = args.device == "cuda"
    # roi_size is set with the view size (the paper's 14 at 224 px; even, ~view/16 otherwise): the
    # `default` preset's value belongs to its own views.
    if gpu and not args.quick:
        over = {"model.arch": "resnet50", "view.size": 224, "model.roi_size": 14, "data.batch_size": 64,
                "data.workers": 8, "model.queue_size": 65536}
    elif gpu:
        over = {"model.arch": "resnet18", "view.size": 112, "model.roi_size": 6, "data.batch_size": 64,
                "data.workers": 8}
    else:
        over = {"model.arch": "resnet18", "view.size": 64, "model.roi_size": 4, "data.batch_size": 8,
                "data.workers": 1, "model.proj_hidden": 512, "model.pred_hidden": 512}
    over.update({"model.method": method, "run.device": args.device, "run.seed": 0})
    return make_config("default", over)


# Batches per epoch of the loader-fed runs on a GPU. A DataLoader worker builds whole batches and
# torch restarts every epoch at worker 0, so an epoch of few batches leaves workers idle and ends
# by waiting for whole batches: with the 256 images used until 2026-11-27 (4 batches of 64) at most
# 4 of the 8 workers ever had work, capping the fed rate however fast the step (benchmarks/
# RESULTS.md). A training epoch over COCO is ~460 batches of 256.
MIN_BATCHES_PER_EPOCH = 32


def num_images(cfg) -> int:
    """Images of the benchmark's dataset: on a GPU, at least MIN_BATCHES_PER_EPOCH batches and four
    batches per loader worker per epoch (the loader benchmark's 2,048 at batch 64 and 8 workers).
    The queue never holds more features than the data has: K per image, 8,192 at 2,048 images."""
    if cfg.run.device == "cpu":
        return 64
    return cfg.data.batch_size * max(MIN_BATCHES_PER_EPOCH, 4 * cfg.data.workers)


def _data(cfg, num: int | None = None):
    """COCO-sized JPEGs for the full-size GPU run (what the loaders must keep up with); small ones
    for the small presets. `num` images (default num_images(cfg))."""
    return bench_dataset(num or num_images(cfg), image_size=COCO_SIZE if cfg.view.size >= 224 else (128, 160))


class _Stepper:
    """Training's own step (train/step.py's TrainStep) on a model, optimiser and region stage built
    as train/run.py builds them; one TrainStep per feed, so that each keeps its own prepared batch."""

    def __init__(self, cfg, num_images, compile=False):
        from train.run import amp_dtype, build_model, configure_backends, make_optimizer, make_region_stage
        self.cfg = cfg
        self.device = torch.device(cfg.run.device)
        configure_backends(cfg, self.device)
        self.dtype = amp_dtype(cfg, self.device)
        self.model = build_model(cfg, num_images, self.device, world=1)
        self.model.train()
        self.forward = torch.compile(self.model) if compile else self.model
        self.opt = make_optimizer(cfg, self.model, lr=0.01)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.gen = torch.Generator(device=self.device)
        self.stage = make_region_stage(cfg)
        self.view_dtype = view_dtype(self.device, self.dtype)
        self._steps = {}   # feed name -> (TrainStep, number of its last step)
        # phase(name) -> context manager around each phase of a step (benchmarks/breakdown.py labels
        # them for the profiler); none by default.
        self.phase = lambda name: contextlib.nullcontext()

    def __call__(self, source, next_batch):
        """One step fed by `source` (a name; `next_batch()` gives its next batch): its views were
        prepared by the previous call on the same source, and it prepares the next ones."""
        if source not in self._steps:
            self._steps[source] = (TrainStep(
                method=self.model, forward=self.forward, optimizer=self.opt, scaler=self.scaler,
                stage=self.stage, generator=self.gen, device=self.device, amp_dtype=self.dtype,
                seed=self.cfg.run.seed), -1)
        step, number = self._steps[source]
        number += 1
        self._steps[source] = (step, number)
        step.phase = self.phase
        result = step(number, lambda: (0, next_batch()), 0.99)
        if result.skipped:  # a step without the update would be timed as a fast one
            raise RuntimeError(f"train benchmark: the loss was not finite at step {number} ({source})")
        return result


def _backends(args):
    if args.backend == "both":
        out = ["cpu"]
        try:
            import d3ssl.data.dali  # noqa: F401
            import nvidia.dali  # noqa: F401
            out.append("dali")
        except ImportError:
            print("train: DALI backend not available; measuring the cpu backend only")
        return out
    return [args.backend]


def run(args):
    from d3ssl.data.loader import make_loader
    if args.device == "cpu" and args.threads is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    cfg = _config(args, "d3ssl")
    dataset, store = _data(cfg)
    kw = dict(warmup=2, min_time=0.5 if args.quick or args.device == "cpu" else 2.0, min_calls=3)
    rounds = 2 if args.quick or args.device == "cpu" else 3
    rows = []

    d3ssl_step = _Stepper(cfg, len(dataset), compile=args.compile)
    fixed = None
    soco_cfg = _config(args, "soco")
    soco_step = _Stepper(soco_cfg, len(dataset), compile=args.compile)
    bs = cfg.data.batch_size
    ceilings = {}
    for backend in _backends(args):
        loader = make_loader(dataset, store, backend=backend, batch_size=bs, workers=cfg.data.workers,
                             view_cfg=cfg.view, seed=0, device=d3ssl_step.device,
                             **loader_options(d3ssl_step.device, d3ssl_step.dtype))
        stream = _cycle(loader)
        if fixed is None:
            # (Taken from the worker-fed loader: decoding in this process before the workers fork
            # can deadlock OpenCV inside them.)
            fixed = next(stream).to(d3ssl_step.device, dtype=d3ssl_step.view_dtype)
        fns = {"fed": lambda: d3ssl_step("fed", lambda: next(stream)),
               "ceiling": lambda: d3ssl_step("ceiling", lambda: fixed)}
        if not ceilings:
            fns["soco"] = lambda: soco_step("ceiling", lambda: fixed)
        t = interleaved(fns, device=args.device, rounds=rounds, **kw)
        ceilings.setdefault("d3ssl", t["ceiling"])
        ceilings.setdefault("soco", t.get("soco"))
        rows.append(Row("train", f"d3ssl step fed by {backend} loader", bs / t["fed"], bs / t["ceiling"],
                        "same step, batch on device", target=0.95,
                        extra={"arch": cfg.model.arch, "view": cfg.view.size, "batch": bs,
                               "amp": str(d3ssl_step.dtype), "compiled": bool(args.compile)}))
        del stream, loader
    rows.append(Row("train", "soco step (batch on device)", bs / ceilings["soco"], bs / ceilings["d3ssl"],
                    "d3ssl step, batch on device"))
    return rows


def _cycle(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader
