"""The DALI loader against the CPU loader: images/s of the full view construction (read, decode, both
views, view2_small, colour augmentation, normalisation, Batch on the training device), plus the region
stage when the project has it (d3ssl.augment.stage.region_stage), measured in the same run with the
same worker count, on COCO-sized images (synthetic scenes, 480-640 px a side).

DALI runs its GPU graph when args.device is cuda, else its CPU-only mode. The loader section calls
:func:`dali_rows`; ``run(args)`` runs this comparison on its own::

    python -c "import benchmarks.throughput as t, benchmarks.sections.loader_dali as s; \
               t.print_table(s.run(t.parse_args(['--quick'])))"
"""
from __future__ import annotations

import os
import time

import torch

from benchmarks.common import COCO_SIZE, Row, bench_dataset, interleaved, sync


def _region_stage():
    try:
        from d3ssl.augment.stage import region_stage
    except ImportError:
        return None
    return region_stage


def _timed_epoch_fn(batches, device):
    """One call = one epoch: `batches()` yields the size of each batch as it is ready; returns images
    seen. ``epoch.arrivals`` holds, per call, the host time at which each batch was ready (the last
    once the device is done) and the batch size."""
    def epoch():
        n, times = 0, []
        for size in batches():
            n += size
            times.append(time.perf_counter())
        sync(device)
        times[-1] = time.perf_counter()  # the last batch counts once the device is done
        epoch.arrivals.append((times, n // max(len(times), 1)))
        return n
    epoch.arrivals = []
    return epoch


def _epoch_fn(loader, device, region_stage):
    """Epochs of `loader`, with the region stage issued on every batch (see :func:`_timed_epoch_fn`)."""
    state = {"epoch": 0}
    generator = torch.Generator(device=device).manual_seed(0)

    def batches():
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        for batch in loader:
            if region_stage is not None:
                region_stage(batch, generator)
            yield batch.size
    return _timed_epoch_fn(batches, device)


def steady_rate(arrivals, skip: int) -> float:
    """Images/s within epochs, after each epoch's first `skip` batches (the pipeline filling after
    the epoch boundary): the median over the timed epochs of (batches after `skip`) x batch size /
    (time from batch `skip` to the last)."""
    rates = sorted((len(t) - 1 - skip) * bs / (t[-1] - t[skip]) for t, bs in arrivals
                   if len(t) > skip + 1 and t[-1] > t[skip])
    return rates[len(rates) // 2] if rates else float("nan")


def dali_rows(args, dataset, store, *, workers: int, batch_size: int, view_cfg=None) -> list[Row]:
    """DALI (GPU graph on cuda, CPU-only mode otherwise) vs the CPU loader, same workers, same run."""
    from d3ssl.data.dali import dali_available
    from d3ssl.data.loader import make_loader

    if not dali_available():
        print("loader_dali: NVIDIA DALI is not installed (pip install -e .[dali]); skipped")
        return []
    device = torch.device(args.device)
    region_stage = _region_stage()
    # Both deliver what training takes on this device (bf16 views on a GPU: train.step.loader_options),
    # so neither side normalises or moves more bytes than the other.
    from train.step import loader_options
    kw = dict(batch_size=batch_size, workers=workers, view_cfg=view_cfg, seed=0, drop_last=True,
              **loader_options(device, torch.bfloat16))
    cpu = make_loader(dataset, store, backend="cpu", device=device, **kw)
    dali = make_loader(dataset, store, backend="dali", device=device, **kw)
    images = len(cpu) * batch_size
    fns = {"cpu": _epoch_fn(cpu, device, region_stage), "dali": _epoch_fn(dali, device, region_stage)}
    t0 = time.perf_counter()
    for f in fns.values():     # start the workers and build the pipeline outside the timing
        f()
    startup = time.perf_counter() - t0
    for f in fns.values():
        f.arrivals.clear()
    secs = interleaved(fns, device=str(device), rounds=2 if args.quick else 3, warmup=0, min_time=0.0,
                       min_calls=1)
    # An epoch here is a few dozen batches, and each begins with the pipeline (DALI) or the workers'
    # prefetch (DataLoader) filling again; a COCO epoch is ~1,850 batches of 64. Also reported: the
    # rate within epochs, past their first quarter.
    skip = max(1, len(cpu) // 4)
    steady = {name: steady_rate(f.arrivals, skip) for name, f in fns.items()}
    mode = "GPU graph" if device.type == "cuda" else "CPU-only mode"
    what = "views + region stage" if region_stage is not None else "views"
    extra = {"workers": workers, "batch": batch_size, "images/epoch": images,
             "image size": f"{COCO_SIZE[0]}-{COCO_SIZE[1]} px", "first epochs incl. startup (s)":
             round(startup, 1),
             f"within an epoch, after its first {skip} batches (images/s)":
             f"DALI {steady['dali']:.0f}, CPU loader {steady['cpu']:.0f}, ratio "
             f"{steady['dali'] / steady['cpu']:.2f}"}
    if region_stage is None:
        extra["region stage"] = "not timed (d3ssl.augment.stage.region_stage not available)"
    if device.type == "cuda":
        extra["issue target"] = "DALI >= 3000 images/s on one H100 with at most 8 workers"
    else:
        extra["note"] = ("DALI's own CPU operators cost more than OpenCV's for the same work (its linear "
                         "resize ~0.85 ms per 224-px view even at scale 1): benchmarks/RESULTS.md")
    # the bar on a CPU-only machine: DALI's CPU mode at least as fast as the CPU loader
    return [Row("loader", f"DALI {mode} ({what}, {workers} workers)", images / secs["dali"],
                images / secs["cpu"], "CPU loader (OpenCV, DataLoader workers)",
                target=1.0 if device.type == "cpu" else None, extra=extra)]


def _pipeline_epoch_fn(pipe, device):
    """Epochs of a built DALI pipeline (run until the source ends, then reset; the outputs are
    dropped as they come; see :func:`_timed_epoch_fn`)."""
    def batches():
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                break
            yield len(outputs[0])
        pipe.reset()
    return _timed_epoch_fn(batches, device)


def graph_stage_rates(dataset, store, *, device, workers: int, batch_size: int,
                      epochs: int = 3) -> dict[str, float]:
    """Images/s within epochs (:func:`steady_rate`, median of `epochs` epochs after a first one that
    starts the workers) of the DALI graph cut after each of its stages
    (:data:`d3ssl.data.dali.GRAPH_STAGES`: the source's Python alone, + decode, + the three resizes,
    + colour, + normalisation), then of the loader (+ Batch on the device) and of the loader followed
    by the region stage, as the training step takes it. Each cut is timed alone, one after another.

    The cuts run in one pipeline whose stages overlap (the source's workers, DALI's CPU threads and
    the GPU), so a stage's cost shows as the drop in rate only where it is on the slowest path."""
    from d3ssl.data.dali import GRAPH_STAGES
    from d3ssl.data.loader import make_loader

    device = torch.device(device)
    kw = dict(batch_size=batch_size, workers=workers, seed=0, drop_last=True)
    region_stage = _region_stage()
    cuts = [(stage, lambda loader, stage=stage: _pipeline_epoch_fn(loader.pipeline(upto=stage), device))
            for stage in GRAPH_STAGES]
    cuts.append(("loader (Batch)", lambda loader: _epoch_fn(loader, device, None)))
    if region_stage is not None:
        cuts.append(("loader + region stage", lambda loader: _epoch_fn(loader, device, region_stage)))
    rates = {}
    for name, epoch_fn in cuts:
        loader = make_loader(dataset, store, backend="dali", device=device, **kw)
        epoch = epoch_fn(loader)
        for _ in range(epochs + 1):
            epoch()
        rates[name] = steady_rate(epoch.arrivals[1:], max(1, len(loader) // 4))
        del epoch
        loader.close()
    return rates


def run(args) -> list[Row]:
    workers = max(1, min(8, os.cpu_count() or 1))   # the bar: at most 8 CPU workers
    batch = 16 if args.quick else 64
    batches = 4 if args.quick else (32 if args.device == "cuda" else 8)
    dataset, store = bench_dataset(batch * batches)
    return dali_rows(args, dataset, store, workers=workers, batch_size=batch)
