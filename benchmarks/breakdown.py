"""Where the time goes, from torch.profiler: the region stage, and the training step fed by the CPU
loader next to the same step fed by a batch kept on the device (the benchmark's ceiling).

  python benchmarks/breakdown.py [--device cpu|cuda] [--quick] [--steps N] [--what stage,step,dali,worker,ops]

For the stage (batch 64 at 224 and 112, the Batch contract's dtype): per call, the host time, the
operations and kernels by total time and count, and for region_erase and composite their kernel
time per stage call as a share of the card's copy bandwidth (one read and one write of the views). For the step:
per step, the wall time and where the main thread spent it (labelled phases: waiting for the loader,
the region stage, forward, backward, reading the loss, which waits for the forward on the GPU, the
optimiser and the teacher update), the operations each phase sends to torch's dispatcher (on a GPU,
kernel launches), and on a GPU how busy the GPU was and where the host synchronised with it (torch's
sync debug mode; reading the loss through an event is not counted). For the DALI graph (`dali`, not
in the default; needs NVIDIA DALI): images/s within epochs of the graph cut after each of its stages
(the source alone, + decode, + resizes, + colour, + normalisation), of the loader's Batch and of the
loader followed by the region stage. For one CPU-loader worker (`worker`, not in the default): its
time per image by phase on one thread (reading the file, decoding, views and colour, and collating
a batch either as normalised float32 views or as the uint8 pixels that GPU-bound batches carry).
For the paper's step's operations (`ops`, not in the default; any device): the operations one step
of ResNet-50-C4 sends to torch's dispatcher, per phase and the most frequent per phase, as a GPU
step issues them (multi-tensor LARS, bf16 autocast) but counted wherever this runs, on small images
(the count does not depend on the image size): on a GPU the eager step is bound by them.
The throughput benchmark (benchmarks/throughput.py) says how fast; this says why.
"""
import argparse
import contextlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.common import copy_bandwidth, sync  # noqa: E402


PARTS = ("stage", "step", "dali", "worker", "ops")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where to run (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--what", default="stage,step",
                   help="comma-separated: stage, step, dali, worker, ops (default: stage,step)")
    p.add_argument("--steps", type=int, default=6, help="profiled training steps per feed (default: 6)")
    p.add_argument("--quick", action="store_true", help="small inputs (a smoke test of the script)")
    p.add_argument("--rows", type=int, default=18, help="rows of each table (default: 18)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no GPU is visible to torch")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    args.what = ",".join(w.strip() for w in args.what.split(",") if w.strip())
    if not args.what:
        p.error(f"--what: name at least one of {', '.join(PARTS)}")
    unknown = set(args.what.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--what: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def _activities(device):
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])


def _device_work(event):
    """A kernel or copy on the GPU. record_function ranges also appear as GPU-side events spanning
    their whole range, idle time included (user annotations): not work."""
    return event.device_type.name == "CUDA" and not getattr(event, "is_user_annotation", False)


def _sort_key(device, events):
    if device != "cuda":
        return "self_cpu_time_total"
    newer = len(events) and hasattr(events[0], "self_device_time_total")
    return "self_device_time_total" if newer else "self_cuda_time_total"


def _device_us(event):
    """An averaged event's own device time in microseconds (attribute names vary across torch)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def profile_stage(args):
    from benchmarks.sections.region import make_batch
    from d3ssl.augment.stage import RegionStage
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bsz, sizes, calls = (8, (64,), 3) if args.quick else (64, (224, 112), 10)
    bandwidth = copy_bandwidth(device) if device == "cuda" else None
    stage = RegionStage()
    for size in sizes:
        batch = make_batch(bsz, size, device, dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        held = None
        for _ in range(3):
            held = stage(batch, gen)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            held = stage(batch, gen)
        host = (time.perf_counter() - t0) / calls
        sync(device)
        wall = (time.perf_counter() - t0) / calls
        with profile(activities=_activities(device)) as prof:
            for _ in range(calls):
                held = stage(batch, gen)
            sync(device)
        del held
        events = prof.key_averages()
        print(f"\n== region stage, B={bsz} S={size} {dtype} channels_last on {device}: "
              f"{host * 1e3:.2f} ms of host time per call, {wall * 1e3:.2f} ms until the device is done")
        print(events.table(sort_by=_sort_key(device, events), row_limit=args.rows))
        if device == "cuda":
            try:  # the profiler's event attributes vary across torch versions: never fail the run here
                _device_summary(events, batch, calls, bandwidth)
            except Exception as e:  # noqa: BLE001
                print(f"(device summary unavailable: {type(e).__name__}: {e})")


def _device_summary(events, batch, calls, bandwidth):
    """Launches and device time per stage call; region_erase's and composite's kernel time as a
    share of the copy bandwidth."""
    launches = sum(e.count for e in events if _device_us(e) > 0 and _device_work(e))
    busy = sum(_device_us(e) for e in events if _device_work(e)) / calls
    print(f"kernels and copies per call: {launches / calls:.0f}; device busy {busy:.0f} us per call")

    def nbytes(*views):  # one read and one write of each
        return 2 * sum(v.numel() * v.element_size() for v in views)
    moved = {"d3ssl::region_erase": nbytes(batch.view1, batch.view2_small),  # x1_hat, x2s_hat
             "d3ssl::composite": nbytes(batch.view2)}                      # x3
    for op, nb in moved.items():
        # a CPU-side op event carries the device time of the kernels it launched
        us = sum(float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))
                 for e in events if e.key == op) / calls
        if us > 0 and bandwidth:
            print(f"{op}: {us:.1f} us of kernel time per stage call, "
                  f"{nb / (us * 1e-6) / bandwidth:.2f} of copy bandwidth (one read and one write)")


def profile_step(args):
    from benchmarks.sections import train as T
    from d3ssl.data.loader import make_loader
    from train.step import loader_options
    device = args.device
    ns = argparse.Namespace(device=device, quick=args.quick or device == "cpu", compile=False)
    cfg = T._config(ns, "d3ssl")
    if args.quick:
        cfg.data.batch_size, cfg.data.workers = 4, 1
    # the throughput benchmark's data (whole epochs of many batches); 16 images with --quick
    dataset, store = T._data(cfg, 16 if args.quick else None)
    stepper = T._Stepper(cfg, len(dataset))
    stepper.phase = phase = record_function  # label the step's phases for the profiler
    loader = make_loader(dataset, store, backend="cpu", batch_size=cfg.data.batch_size,
                         workers=cfg.data.workers, view_cfg=cfg.view, seed=0, device=stepper.device,
                         **loader_options(stepper.device, stepper.dtype))
    stream = T._cycle(loader)
    fixed = next(stream).to(stepper.device, dtype=stepper.view_dtype)

    def fetch():
        with phase("wait for the loader"):
            return next(stream)

    feeds = {"fed by the CPU loader": ("fed", fetch), "batch on the device (ceiling)": ("ceiling", lambda: fixed)}
    for label, (source, get) in feeds.items():
        for _ in range(3):
            stepper(source, get)
        sync(device)
        with profile(activities=_activities(device)) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                with phase("step"):
                    stepper(source, get)
            sync(device)
            wall = (time.perf_counter() - t0) / args.steps
        events = prof.key_averages()
        print(f"\n== training step ({cfg.model.arch}, {cfg.view.size} px, batch {cfg.data.batch_size}), "
              f"{label}, on {device}: {wall * 1e3:.1f} ms per step "
              f"({cfg.data.batch_size / wall:.1f} images/s)")
        from train.step import PHASES
        for name in ("wait for the loader",) + PHASES:
            hits = [e for e in events if e.key == name]
            if hits:
                ms = sum(e.cpu_time_total for e in hits) / 1e3 / args.steps
                print(f"  {name:<22} {ms:8.2f} ms per step of the main thread ({ms / (wall * 1e3):5.1%})")
        if device == "cuda":
            try:  # (see profile_stage)
                busy = sum(_device_us(e) for e in events if _device_work(e)) / 1e3 / args.steps
                print(f"  GPU busy {busy:.1f} ms per step ({busy / (wall * 1e3):.1%} of the wall time)")
            except Exception as e:  # noqa: BLE001
                print(f"  (GPU busy time unavailable: {type(e).__name__}: {e})")
        _count_ops(stepper, source, get)
        if device == "cuda":
            _count_syncs(stepper, source, get, args.steps)
        print(events.table(sort_by=_sort_key(device, events), row_limit=args.rows))
    del stream, loader


def _count_ops(stepper, source, get, top=0):
    """Runs one more step and prints the operations it sends to torch's dispatcher, per phase, but
    views and the profiler's own: each one counted launches at least one kernel on a GPU (a
    multi-tensor one can launch several). top: also the `top` most frequent of each phase."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode
    label = ["other"]
    counts = collections.Counter()
    names = collections.defaultdict(collections.Counter)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace != "profiler" and not func.is_view:
                counts[label[0]] += 1
                names[label[0]][func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def phase(name):
        outer, label[0] = label[0], name
        try:
            yield
        finally:
            label[0] = outer

    labelled, stepper.phase = stepper.phase, phase
    try:
        with Count():
            stepper(source, get)
    finally:
        stepper.phase = labelled
    print(f"  operations per step at torch's dispatcher (no views): {sum(counts.values())} ("
          + ", ".join(f"{name} {n}" for name, n in counts.most_common()) + ")")
    for phase, _ in counts.most_common() if top else ():
        print(f"    {phase}: " + ", ".join(f"{op} {n}" for op, n in names[phase].most_common(top)))


def count_paper_step_ops(args):
    """The paper's step (ResNet-50-C4, its heads, queue and region stage) as train/run.py builds it,
    fed one small batch on args.device: its dispatcher operations per phase as a GPU step issues them
    (multi-tensor LARS, bf16 autocast), after two warm-up steps."""
    from benchmarks.sections import train as T
    from d3ssl.data.loader import make_loader
    from train.config import make_config
    size, roi = (64, 4) if args.quick else (96, 6)
    cfg = make_config("default", {"model.arch": "resnet50", "view.size": size, "model.roi_size": roi,
                                  "data.batch_size": 2, "run.device": args.device, "run.seed": 0})
    dataset, store = T._data(cfg, 8)
    stepper = T._Stepper(cfg, len(dataset))
    stepper.dtype = torch.bfloat16          # autocast as on a GPU (none on a CPU by default)
    for group in stepper.opt.param_groups:
        group["foreach"] = True             # multi-tensor LARS as on a GPU (a CPU loops by default)
    loader = make_loader(dataset, store, backend="cpu", batch_size=2, workers=0, view_cfg=cfg.view,
                         seed=0, device=stepper.device)
    batch = next(iter(loader)).to(stepper.device, dtype=stepper.view_dtype)
    for _ in range(2):
        stepper("paper", lambda: batch)
    print(f"\n== the paper's step (ResNet-50-C4, D3SSL), operations as a GPU step issues them, "
          f"counted on {args.device}")
    _count_ops(stepper, "paper", lambda: batch, top=8)


def _count_syncs(stepper, source, get, steps):
    """Runs `steps` more steps under torch's CUDA sync debug mode and prints the host
    synchronisations it reports per step, by the innermost line of the project's own code on the
    stack (torch raises them deep inside its modules; those of the backward come back to the
    thread that called it)."""
    import collections
    import traceback
    import warnings
    sites = collections.Counter()
    here = os.path.abspath(__file__)

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1]
                if os.path.abspath(f.filename).startswith(ROOT + os.sep) and os.path.abspath(f.filename) != here]
        frame = ours[-1] if ours else None
        sites[f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}" if frame
              else f"{filename}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                stepper(source, get)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"  host synchronisations (sync debug mode): {sum(sites.values()) / steps:.1f} per step"
          + "".join(f"\n    {n / steps:.1f} per step at {site}" for site, n in sites.most_common(8)))


def profile_dali(args):
    """The DALI graph stage by stage (benchmarks/sections/loader_dali.py's graph_stage_rates), on
    COCO-sized JPEGs with the loader benchmark's sizes: on a GPU 32 batches of 64 per epoch, 8 workers."""
    from benchmarks.common import COCO_SIZE, bench_dataset
    from benchmarks.sections.loader import loader_sizes
    from benchmarks.sections.loader_dali import graph_stage_rates
    from d3ssl.data.dali import dali_available

    if not dali_available():
        print("\n== DALI graph: NVIDIA DALI is not installed (pip install -e .[dali]); skipped")
        return
    gpu = args.device == "cuda"
    workers, batch, batches = loader_sizes(args.device, args.quick)
    dataset, store = bench_dataset(batch * batches)
    print(f"\n== DALI {'GPU graph' if gpu else 'CPU-only mode'}, cut after each stage: batch {batch}, "
          f"{batches} batches per epoch, {workers} workers, {COCO_SIZE[0]}-{COCO_SIZE[1]} px JPEGs; "
          "images/s within epochs")
    rates = graph_stage_rates(dataset, store, device=args.device, workers=workers, batch_size=batch,
                              epochs=2 if args.quick else 3)
    print(f"  {'up to':<24} {'images/s':>10} {'ms / batch':>11}")
    for name, rate in rates.items():
        print(f"  {name:<24} {rate:>10.0f} {batch * 1e3 / rate:>11.2f}")


def profile_worker(args):
    """One CPU-loader worker's time per image by phase, on one thread as in a worker, over the
    loader benchmark's COCO-sized JPEGs: 224-px views (112 with --quick), median of three passes
    (the two collates alternate which goes first). Outside a worker the collates write ordinary
    memory; in one they write fresh shared memory, which the main process then pins, four times
    the bytes for float32 views: costs this leaves out, so it understates what uint8 saves."""
    import statistics

    import cv2

    from benchmarks.common import COCO_SIZE, bench_dataset
    from benchmarks.sections.loader import loader_sizes
    from d3ssl.data.colour import ColourConfig
    from d3ssl.data.cpu_loader import ViewDataset, collate
    from d3ssl.data.datasets import decode_image
    from d3ssl.data.views import ViewConfig

    _, batch, batches = loader_sizes(args.device, args.quick)
    dataset, store = bench_dataset(batch * batches)
    view_cfg = ViewConfig(size=112 if args.quick else 224)
    views = ViewDataset(dataset, store, view_cfg, ColourConfig(), seed=0)
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    times = {name: [] for name in ("read the file", "decode", "views and colour", "collate, float32",
                                   "collate, uint8")}
    try:
        for rep in range(3):
            start = rep * batch % len(dataset)
            idx = [(start + i) % len(dataset) for i in range(batch)]
            t0 = time.perf_counter()
            raw = [dataset.read_bytes(i) for i in idx]
            t1 = time.perf_counter()
            images = [decode_image(b) for b in raw]
            t2 = time.perf_counter()
            samples = [views.make_views(img, i, 0) + ([],) for img, i in zip(images, idx)]
            t3 = time.perf_counter()
            collates = {}
            for normalise in ((True, False) if rep % 2 == 0 else (False, True)):
                t = time.perf_counter()
                collate(samples, normalise=normalise)
                collates[normalise] = time.perf_counter() - t
            for name, secs in zip(times, (t1 - t0, t2 - t1, t3 - t2, collates[True], collates[False])):
                times[name].append(secs / batch)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    print(f"\n== one CPU-loader worker, one thread: {COCO_SIZE[0]}-{COCO_SIZE[1]} px JPEGs, "
          f"{view_cfg.size}-px views, batches of {batch}; ms per image, median of 3 passes")
    for name, v in ms.items():
        print(f"  {name:<20} {v:>7.2f}")
    common = ms["read the file"] + ms["decode"] + ms["views and colour"]
    f32, u8 = common + ms["collate, float32"], common + ms["collate, uint8"]
    print(f"  a worker's images/s: {1e3 / f32:.0f} handing over float32 views, {1e3 / u8:.0f} handing over "
          f"uint8 pixels ({f32 / u8:.2f}x)")


def main(argv=None):
    args = parse_args(argv)
    import d3ssl  # noqa: F401  (fails early with a clear message if the library is not built)
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {torch.get_num_threads()} threads"))
    what = args.what.split(",")
    if "stage" in what:
        profile_stage(args)
    if "step" in what:
        profile_step(args)
    if "dali" in what:
        profile_dali(args)
    if "worker" in what:
        profile_worker(args)
    if "ops" in what:
        count_paper_step_ops(args)


if __name__ == "__main__":
    main()
