"""Loaders: Batches/s and images/s of full view construction (read, decode, both views, view2_small,
colour augmentation, normalisation, collation into a channels_last Batch), on COCO-sized images
(synthetic scenes, 480-640 px a side), each against its anchor in the same run, same worker count.

  --backend cpu   the CPU loader vs a plain PIL + torchvision-transforms loader doing the same views
                  (the SoCo-style loader: PIL decode, PIL resize/crop/flip, torchvision ColorJitter,
                  RandomGrayscale, PIL Gaussian blur and solarize, ToTensor, Normalize); on a GPU
                  also the CPU loader delivering to it with uint8 handover vs float32 views
  --backend dali  the DALI loader vs the CPU loader (benchmarks/sections/loader_dali.py, when present)
  --backend both  both of them
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import torch

from benchmarks.common import COCO_SIZE, Row, bench_dataset, interleaved

# ---- the anchor: SoCo-style PIL + torchvision transforms, same sampler, same batches ---------------

class _PilViews(torch.utils.data.Dataset):
    def __init__(self, dataset, store, view_cfg, seed):
        self.dataset, self.store, self.cfg, self.seed = dataset, store, view_cfg, seed
        self._colour = None

    def _transforms(self):
        from PIL import ImageFilter, ImageOps
        from torchvision import transforms as T

        from d3ssl.data.batch import IMAGENET_MEAN, IMAGENET_STD

        class Blur:       # SoCo's / MoCo v2's GaussianBlur on PIL images
            def __call__(self, img):
                return img.filter(ImageFilter.GaussianBlur(radius=float(np.random.uniform(0.1, 2.0))))

        class Solarize:
            def __call__(self, img):
                return ImageOps.solarize(img)

        jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
        norm = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        t1 = T.Compose([jitter, T.RandomGrayscale(0.2), Blur()])
        t2 = T.Compose([jitter, T.RandomGrayscale(0.2), T.RandomApply([Blur()], p=0.1),
                        T.RandomApply([Solarize()], p=0.2)])
        return t1, t2, norm

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        from PIL import Image

        from d3ssl.data.views import sample_seed, sample_views
        if self._colour is None:
            self._colour = self._transforms()
        t1, t2, norm = self._colour
        index, epoch = item
        img = Image.open(self.dataset.path(index)).convert("RGB")
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        p = sample_views(img.width, img.height, self.store.boxes(index), rng, self.cfg)
        s = self.cfg.size
        x0, y0, w, h = (int(v) for v in p.crop)
        v1 = img.resize((s, s), Image.BILINEAR)
        v2 = img.crop((x0, y0, x0 + w, y0 + h)).resize((s, s), Image.BILINEAR)
        if p.flip1:
            v1 = v1.transpose(Image.FLIP_LEFT_RIGHT)
        if p.flip2:
            v2 = v2.transpose(Image.FLIP_LEFT_RIGHT)
        v1, v2 = t1(v1), t2(v2)
        v2s = v2.resize((s // 2, s // 2), Image.BILINEAR)
        return norm(v1), norm(v2), norm(v2s), p.boxes1, p.boxes2, p.valid, index


def _pil_collate(samples):
    from d3ssl.data.batch import Batch
    cols = list(zip(*samples))
    cl = torch.channels_last
    return Batch(view1=torch.stack(cols[0]).contiguous(memory_format=cl),
                 view2=torch.stack(cols[1]).contiguous(memory_format=cl),
                 view2_small=torch.stack(cols[2]).contiguous(memory_format=cl),
                 boxes1=torch.from_numpy(np.stack(cols[3])), boxes2=torch.from_numpy(np.stack(cols[4])),
                 box_valid=torch.from_numpy(np.stack(cols[5])), image_id=torch.tensor(cols[6]))


def _pil_loader(dataset, store, batch_size, workers, view_cfg, seed=0):
    from d3ssl.data.cpu_loader import EpochBatchSampler, _init_worker
    sampler = EpochBatchSampler(len(dataset), batch_size, seed)
    kw = dict(persistent_workers=True, prefetch_factor=2, worker_init_fn=_init_worker) if workers else {}
    loader = torch.utils.data.DataLoader(_PilViews(dataset, store, view_cfg, seed), batch_sampler=sampler,
                                         num_workers=workers, collate_fn=_pil_collate, **kw)
    loader.set_epoch = sampler.set_epoch
    return loader


def _epoch_fn(loader):
    state = {"epoch": 0}

    def epoch():
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        return sum(b.size for b in loader)
    return epoch


def cpu_rows(args, dataset, store, *, workers: int, batch_size: int) -> list[Row]:
    from d3ssl.data.loader import make_loader
    from d3ssl.data.views import ViewConfig
    cfg = ViewConfig()
    ours = make_loader(dataset, store, backend="cpu", batch_size=batch_size, workers=workers, view_cfg=cfg)
    pil = _pil_loader(dataset, store, batch_size, workers, cfg)
    batches = len(ours)
    fns = {"ours": _epoch_fn(ours), "pil": _epoch_fn(pil)}
    for f in fns.values():          # start the workers outside the timing
        f()
    secs = interleaved(fns, rounds=2 if args.quick else 3, warmup=0, min_time=0.0, min_calls=1)
    extra = {"workers": workers, "batch": batch_size, "view size": cfg.size, "batches/epoch": batches,
             "image size": f"{COCO_SIZE[0]}-{COCO_SIZE[1]} px JPEG",
             "Batches/s ours / PIL": f"{batches / secs['ours']:.2f} / {batches / secs['pil']:.2f}"}
    return [Row("loader", f"CPU loader (OpenCV, {workers} workers)", batches * batch_size / secs["ours"],
                batches * batch_size / secs["pil"], "PIL + torchvision transforms, same views and workers",
                target=2.0, extra=extra)]


def handover_rows(args, dataset, store, *, workers: int, batch_size: int) -> list[Row]:
    """On a GPU: the CPU loader delivering normalised Batches on the GPU, its workers handing over
    the uint8 pixels normalised on the GPU (the default there) against float32 views normalised
    in the workers (a quarter of the bytes through shared memory, pinning and the copy, and no
    normalising in the workers)."""
    from d3ssl.data.loader import make_loader
    from d3ssl.data.views import ViewConfig
    cfg = ViewConfig()
    loaders = {mode: make_loader(dataset, store, backend="cpu", batch_size=batch_size, workers=workers,
                                 view_cfg=cfg, device=args.device, normalise=mode)
               for mode in ("device", "worker")}
    fns = {mode: _epoch_fn(loader) for mode, loader in loaders.items()}
    for f in fns.values():          # start the workers outside the timing
        f()
    secs = interleaved(fns, device=args.device, rounds=2 if args.quick else 3, warmup=0, min_time=0.0,
                       min_calls=1)
    n = len(loaders["device"]) * batch_size
    return [Row("loader", f"CPU loader to the GPU, uint8 handover ({workers} workers)", n / secs["device"],
                n / secs["worker"], "float32 views normalised in the workers, same workers",
                extra={"workers": workers, "batch": batch_size, "view size": cfg.size})]


def loader_sizes(device: str, quick: bool) -> tuple[int, int, int]:
    """(workers, batch size, batches per epoch) of the loader benchmarks: at most 8 workers (the
    issue's bar). On a GPU, epochs of 2048 images at the training batch size: DALI's GPU graph runs
    an epoch of 256 in a fraction of a second, too short to time against its start-up."""
    workers = max(1, min(8, os.cpu_count() or 1))
    if quick:
        return workers, 16, 4
    return (workers, 64, 32) if device == "cuda" else (workers, 32, 8)


def run(args) -> list[Row]:
    workers, batch, batches = loader_sizes(args.device, args.quick)
    dataset, store = bench_dataset(batch * batches)
    rows = []
    if args.backend in ("cpu", "both"):
        rows += cpu_rows(args, dataset, store, workers=workers, batch_size=batch)
        if args.device == "cuda":
            rows += handover_rows(args, dataset, store, workers=workers, batch_size=batch)
    if args.backend in ("dali", "both"):
        try:
            dali = importlib.import_module("benchmarks.sections.loader_dali")
        except ImportError:
            print("loader: the DALI comparison (benchmarks/sections/loader_dali.py) is not part of this tree")
        else:
            rows += dali.dali_rows(args, dataset, store, workers=workers, batch_size=batch)
    return rows
