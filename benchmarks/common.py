"""Timing helpers shared by the benchmark sections.

Every figure is reported as a ratio against an anchor measured in the same run, on the same inputs:
these machines are shared, so absolute numbers drift between runs, ratios much less.
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

# COCO-like JPEG sizes (height, width) for the loader and training benchmarks.
COCO_SIZE = (480, 640)


@dataclass
class Row:
    """One line of a benchmark table: our figure, the anchor's, and their ratio (higher is better)."""
    section: str
    name: str
    ours: float          # items per second (or what `unit` says)
    anchor: float        # the same for the anchor
    anchor_name: str
    unit: str = "images/s"
    target: float | None = None  # the ratio the issue asks for, if any
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours / self.anchor if self.anchor else float("nan")

    def as_dict(self):
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, device="cpu", warmup=2, min_time=1.0, min_calls=3, max_calls=10_000):
    """Median seconds per call of fn(), over repeats after `warmup` calls, at least `min_time` total."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < min_time and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def device_seconds_per_call(fn, device, warmup=3, calls=40, flush_bytes=512 << 20):
    """GPU time of one fn() call, median over `calls`, from CUDA events around each call, with the
    L2 cache flushed before each (a read of `flush_bytes`, more than any L2; H100: 50 MB).

    What a kernel's bandwidth is judged by. seconds_per_call times a call and a synchronisation
    on the host: for a kernel of a few tens of microseconds that is mostly Python, the launch and
    the round trip of the synchronisation. Here the flush keeps the GPU busy while the host issues
    the call, so the events enclose the call's kernels and no host time; and the inputs come from
    memory, not from the cache, as in training, where a batch is touched once per stage. The flush
    reads (a sum) rather than writes, so that the call does not pay for writing back the flush's
    dirty lines; the previous call's dirty lines are written back during the flush."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device_seconds_per_call needs a CUDA device, got {device}")
    with torch.cuda.device(device):
        flush = torch.ones(flush_bytes // 4, dtype=torch.float32, device=device)
        total = torch.empty((), dtype=torch.float32, device=device)
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
        for start, end in zip(starts, ends):
            torch.sum(flush, dim=0, out=total)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
    ms = sorted(start.elapsed_time(end) for start, end in zip(starts, ends))
    return ms[len(ms) // 2] / 1e3


def interleaved(fns, device="cpu", rounds=5, **kw):
    """Times several functions in alternating rounds so machine noise hits them alike.

    Returns the median over rounds of each one's seconds per call."""
    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(seconds_per_call(fn, device, **kw))
    return {name: sorted(v)[len(v) // 2] for name, v in per.items()}


def copy_bandwidth(device, nbytes=256 << 20):
    """The card's achievable copy bandwidth in bytes/s (read + write), measured with a device copy
    of `nbytes` (GPU time from events on CUDA)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if torch.device(device).type == "cuda":
        s = device_seconds_per_call(lambda: dst.copy_(src), device, calls=20)
    else:
        s = seconds_per_call(lambda: dst.copy_(src), device, warmup=3, min_time=0.5)
    return 2 * nbytes / s


def bench_dataset(num_images: int, image_size=COCO_SIZE, cache: str | None = None):
    """(dataset, store) of `num_images` synthetic JPEG scenes of `image_size` (height, width),
    generated once into d3ssl's cache (or `cache`).

    The images are read as a plain folder and the ground truth straight from its JSON, so the
    benchmarks need no pycocotools (the GPU machines lack it). The proposals are the scenes'
    ground-truth boxes: what a loader or a training step does with proposals does not depend on
    where they came from, and selective search on every image would dominate the setup."""
    from d3ssl.data.datasets import ImageFolder
    from d3ssl.data.proposals import ProposalStore, write_store
    from d3ssl.data.synthetic import default_cache_root, ensure_synthetic

    cache = cache or os.path.join(default_cache_root(), "bench")
    root = ensure_synthetic(cache, seed=0, num_train=num_images, num_val=0, image_size=tuple(image_size))
    ds = ImageFolder(os.path.join(root, "train"))
    path = os.path.join(root, "train-gt.proposals")
    if not os.path.isfile(path):
        with open(os.path.join(root, "annotations", "instances_train.json")) as f:
            gt = json.load(f)
        images = {im["file_name"]: im for im in gt["images"]}
        per_image = {}
        for a in gt["annotations"]:
            x, y, w, h = a["bbox"]
            per_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
        boxes, sizes = [], []
        for key in ds.keys:
            im = images[key]
            b = np.array(per_image.get(im["id"], []), np.float32).reshape(-1, 4)
            boxes.append(b if len(b) else np.array([[0, 0, im["width"], im["height"]]], np.float32))
            sizes.append((im["width"], im["height"]))
        write_store(path, ds.keys, boxes, np.array(sizes), np.zeros(len(ds), np.uint8))
    return ds, ProposalStore(path)
