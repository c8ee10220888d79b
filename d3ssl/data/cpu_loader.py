"""The CPU loader: torch DataLoader workers decode with OpenCV, apply the sampler's views and SoCo's
colour augmentation, normalise and collate into a :class:`~d3ssl.data.batch.Batch`.

Order of an epoch: the sample indices are a permutation drawn from (seed, epoch); rank r of W takes
every W-th index of it, so ranks never share an image. With ``drop_last`` (the default, and what
DDP needs), the last ``N mod W`` indices of the permutation are left out so every rank has the same
count, and each rank drops its last partial batch; nothing else is ever dropped or repeated. Without
it, ranks may differ by one sample (and one batch) and the last batch may be short.

A sample's views depend only on (seed, epoch, index) (:func:`~d3ssl.data.views.sample_seed`), never
on the worker count. A file that cannot be decoded is skipped with a warning and replaced by the
next image of the dataset (index + 1, wrapping), so batches keep their size; the loader counts the
skips (``loader.skipped``, ``loader.skipped_keys``). ``image_id`` reports the image actually used.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import cv2
import numpy as np
import torch

from .batch import IMAGENET_MEAN, IMAGENET_STD, Batch
from .colour import ColourConfig, apply_colour, sample_colour
from .datasets import ImageDecodeError, UnreadableData, decode_image
from .stopping import defer_stop_signals
from .views import ViewConfig, sample_seed, sample_views

MAX_REPLACEMENTS = 16   # consecutive unreadable files before the loader gives up with an error


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resizes uint8 [H,W,3] to [size,size,3] without aliasing, fast, with the exact geometry: view
    pixel u covers original pixels [u W/size, (u+1) W/size) (and likewise in y).

    Each axis that is more than 1.5 times the target is halved by exact 2-pixel averaging (OpenCV's
    integer INTER_AREA path, ~15x faster than a general INTER_AREA resize), until none is; the rest
    (a factor of at most 1.5, or an enlargement) is bilinear. An odd last row or column is
    repeated before a halving (so its pixel keeps its value); the final resize then maps the
    original's extent alone, leaving the repeats outside, so no content moves."""
    h0, w0 = img.shape[:2]
    fx = fy = 1   # original pixels per pixel of img, along x and y
    while True:
        h, w = img.shape[:2]
        half_x, half_y = w > 1.5 * size, h > 1.5 * size
        if not (half_x or half_y):
            break
        pad_x, pad_y = half_x and w % 2, half_y and h % 2
        if pad_x or pad_y:
            img = cv2.copyMakeBorder(img, 0, int(pad_y), 0, int(pad_x), cv2.BORDER_REPLICATE)
        if half_x:
            w, fx = (w + 1) // 2, fx * 2
        if half_y:
            h, fy = (h + 1) // 2, fy * 2
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    if (w * fx, h * fy) == (w0, h0):   # no repeats: img covers the original exactly
        return img if (w, h) == (size, size) else cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    # view pixel centre u + 0.5 is original x = (u + 0.5) W/size, i.e. x / fx - 0.5 in img's pixels
    ax, ay = w0 / (size * fx), h0 / (size * fy)
    m = np.array([[ax, 0.0, 0.5 * ax - 0.5], [0.0, ay, 0.5 * ay - 0.5]])
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


class ViewDataset(torch.utils.data.Dataset):
    """Map-style dataset over (index, epoch) items; returns one sample's uint8 views and boxes."""

    def __init__(self, dataset, store, view_cfg: ViewConfig, colour_cfg: ColourConfig, seed: int):
        self.dataset, self.store = dataset, store
        self.view_cfg, self.colour_cfg, self.seed = view_cfg, colour_cfg, seed

    def __len__(self):
        return len(self.dataset)

    def _decode(self, index):
        try:
            return decode_image(self.dataset.read_bytes(index))
        except (ImageDecodeError, OSError) as e:
            return e

    def __getitem__(self, item):
        index, epoch = item
        requested, skipped = index, []
        img = self._decode(index)
        while isinstance(img, Exception):
            # (the training process warns, with the keys: a warning here would come once per worker)
            key = self.dataset.key(index)
            skipped.append(key)
            if len(skipped) >= min(MAX_REPLACEMENTS, len(self.dataset)):
                raise UnreadableData(f"{len(skipped)} unreadable images in a row (last: {key!r}): "
                                   "is the dataset path right?")
            index = (index + 1) % len(self.dataset)
            img = self._decode(index)
        # (a replacement draws with the requested slot's seed: with its own, the epoch would hold
        # two identical samples, as the replacement also comes in its own slot)
        return self.make_views(img, index, epoch, requested) + (skipped,)

    def make_views(self, img: np.ndarray, index: int, epoch: int, slot: int | None = None):
        """img: uint8 RGB [H,W,3] of dataset image `index`, drawn with the seed of dataset slot `slot`
        (default: `index`). Returns (view1, view2, view2_small uint8 HWC, boxes1, boxes2, valid, index)."""
        cfg = self.view_cfg
        h, w = img.shape[:2]
        props = np.asarray(self.store.boxes(index), np.float32)
        sw, sh = self.store.size(index)
        if (sw, sh) != (w, h) and sw > 0 and sh > 0:   # store made from a differently sized copy
            props = props * np.array([w / sw, h / sh, w / sw, h / sh], np.float32)
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index if slot is None else slot))
        p = sample_views(w, h, props, rng, cfg)
        s = cfg.size
        view1 = resize_square(img, s)
        x0, y0, cw, ch = (int(v) for v in p.crop)
        view2 = resize_square(img[y0:y0 + ch, x0:x0 + cw], s)
        if p.flip1:
            view1 = cv2.flip(view1, 1)
        if p.flip2:
            view2 = cv2.flip(view2, 1)
        c1 = sample_colour(rng, self.colour_cfg, 0, s)
        c2 = sample_colour(rng, self.colour_cfg, 1, s)
        view1 = apply_colour(np.ascontiguousarray(view1), c1, self.colour_cfg.solarize_threshold)
        view2 = apply_colour(np.ascontiguousarray(view2), c2, self.colour_cfg.solarize_threshold)
        view2_small = cv2.resize(view2, (s // 2, s // 2), interpolation=cv2.INTER_AREA)
        return view1, view2, view2_small, p.boxes1, p.boxes2, p.valid, index


# per-channel (x - 255 mean) / (255 std) as OpenCV scalars (4 channels, the last unused)
_MEAN255 = tuple(float(m) * 255 for m in IMAGENET_MEAN) + (0.0,)
_INV_STD255 = tuple(1.0 / (float(s) * 255) for s in IMAGENET_STD) + (0.0,)


def _batch_buffer(arrs, dtype) -> torch.Tensor:
    """An empty [B,H,W,C] tensor for the HWC images `arrs`. In a loader worker it is allocated in
    shared memory, as torch's default_collate does, so handing it over costs no extra copy; its
    [B,3,H,W] permutation is exactly channels_last."""
    h, w, c = arrs[0].shape
    out = torch.empty((len(arrs), h, w, c), dtype=dtype)
    if torch.utils.data.get_worker_info() is not None:
        out.share_memory_()
    return out


def _normalised(arrs) -> torch.Tensor:
    """uint8 HWC images -> float32 [B,3,H,W] channels_last, normalised with ImageNet mean/std.

    OpenCV's per-channel subtract and multiply write straight into the output (several times
    faster than numpy or a mixed-dtype torch op)."""
    out = _batch_buffer(arrs, torch.float32)
    dst = out.numpy()
    for b, img in enumerate(arrs):
        cv2.subtract(img, _MEAN255, dst=dst[b], dtype=cv2.CV_32F)
        cv2.multiply(dst[b], _INV_STD255, dst=dst[b])
    return out.permute(0, 3, 1, 2)


def _stacked(arrs) -> torch.Tensor:
    """uint8 HWC images -> uint8 [B,3,H,W] channels_last, not normalised."""
    out = _batch_buffer(arrs, torch.uint8)
    np.stack(arrs, out=out.numpy())
    return out.permute(0, 3, 1, 2)


_CONSTANTS: dict = {}   # device -> (mean, scale) [1,3,1,1] float32


def _constants(device: torch.device):
    """normalise_uint8's per-channel constants on `device`, made once per device (copies to a GPU
    that wait for it: CpuLoader makes them when it is built, not in a training step)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _CONSTANTS:
        mean = torch.tensor(_MEAN255[:3], dtype=torch.float32).view(1, 3, 1, 1)
        scale = torch.tensor(_INV_STD255[:3], dtype=torch.float32).view(1, 3, 1, 1)
        _CONSTANTS[device] = (mean.to(device), scale.to(device))
    return _CONSTANTS[device]


def normalise_uint8(view: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B,3,H,W] -> `dtype` [B,3,H,W] channels_last, normalised with ImageNet mean/std where
    the tensor is (three elementwise kernels, a fourth to cast to a 16-bit `dtype`; no host
    synchronisation once the device's constants exist). Float32 gives the values of the workers'
    own normalisation (:func:`_normalised`) to within float32 rounding."""
    if view.dtype != torch.uint8 or view.dim() != 4 or view.shape[1] != 3:
        raise ValueError(f"normalise_uint8 needs uint8 [B,3,H,W], got {view.dtype} {tuple(view.shape)}")
    mean, scale = _constants(view.device)
    view = view.contiguous(memory_format=torch.channels_last)
    out = view.to(torch.float32).sub_(mean).mul_(scale)
    return out if dtype == torch.float32 else out.to(dtype)


def collate(samples, normalise: bool = True) -> tuple[Batch, list[str]]:
    """Stacks samples into a Batch (channels_last; float32 and normalised, or with `normalise`
    False the uint8 pixels, which :func:`normalise_uint8` finishes where the batch is going) and
    the list of skipped keys."""
    cols = list(zip(*samples))
    views = _normalised if normalise else _stacked
    batch = Batch(
        view1=views(cols[0]), view2=views(cols[1]), view2_small=views(cols[2]),
        boxes1=torch.from_numpy(np.stack(cols[3])), boxes2=torch.from_numpy(np.stack(cols[4])),
        box_valid=torch.from_numpy(np.stack(cols[5])),
        image_id=torch.tensor(cols[6], dtype=torch.int64),
    )
    return batch, [k for keys in cols[7] for k in keys]


class EpochBatchSampler:
    """Batches of (index, epoch) for one rank; see the module docstring for the epoch order."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, shuffle: bool = True):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.drop_last, self.shuffle = rank, world_size, drop_last, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        order = (np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch]).permutation(self.n)
                 if self.shuffle else np.arange(self.n))
        if self.drop_last:
            order = order[:self.n // self.world_size * self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        mine, epoch, b = self.indices(), self.epoch, self.batch_size
        for i in range(0, len(mine), b):
            chunk = mine[i:i + b]
            if self.drop_last and len(chunk) < b:
                break
            yield [(int(j), epoch) for j in chunk]

    def __len__(self):
        per_rank = len(self.indices())
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)


# Batches with unreadable images that a loader warns about; later ones are only counted.
WARNED_SKIPS = 5


def warn_skipped(loader, keys: list[str]):
    """Adds a batch's replaced (unreadable) images to ``loader.skipped_keys`` and warns, for the
    first WARNED_SKIPS such batches of the loader, then once that it goes on counting silently."""
    loader.skipped_keys += keys
    batches = getattr(loader, "_skip_warnings", 0) + 1
    loader._skip_warnings = batches
    if batches <= WARNED_SKIPS:
        more = ("; further ones are counted (the loader's skipped_keys), not warned about"
                if batches == WARNED_SKIPS else "")
        warnings.warn(f"skipped {len(keys)} unreadable image(s): {keys[:3]} ({len(loader.skipped_keys)} so far "
                      f"this run); each was replaced by the next image{more}", RuntimeWarning, stacklevel=3)


def _init_worker(_):
    # One image per worker at a time: OpenCV's and torch's own threads would only contend. OpenCV's
    # thread count is set in the parent before the fork (see CpuLoader): calling cv2.setNumThreads
    # in a forked child whose parent had started OpenCV's thread pool can hang forever.
    torch.set_num_threads(1)
    defer_stop_signals()


class CpuLoader:
    """Iterable of Batches; ``set_epoch(e)`` before each epoch, ``len()`` = batches per epoch (this rank).

    normalise: where the views are normalised. "worker": in the workers, which hand over float32
    views; "device": the workers hand over the uint8 pixels (a quarter of the bytes through shared
    memory, pinning and the copy to the GPU, and none of the workers' normalising: a worker makes
    1.14-1.23x the images per second on 224-px views, `benchmarks/breakdown.py --what worker`) and
    the main process normalises them on `device`. None (default):
    "device" when `device` is a GPU, else "worker" (on the CPU the main process would do the
    workers' work). dtype: the views' dtype when normalised on the device (default float32; the
    trainer asks for its step's, bf16 by default on a GPU)."""

    def __init__(self, dataset, store, batch_size: int, workers: int, view_cfg: ViewConfig,
                 colour_cfg: ColourConfig, seed: int, rank: int, world_size: int, drop_last: bool,
                 shuffle: bool = True, device=None, prefetch_factor: int = 2, normalise: str | None = None,
                 dtype: torch.dtype | None = None):
        self.sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world_size, drop_last, shuffle)
        self.device = torch.device(device) if device is not None else None
        pin = self.device is not None and self.device.type == "cuda"
        if normalise is None:
            normalise = "device" if pin else "worker"
        if normalise not in ("worker", "device"):
            raise ValueError(f"normalise must be 'worker', 'device' or None, got {normalise!r}")
        if dtype is not None and normalise != "device":
            raise ValueError("dtype applies only to views normalised on the device (normalise='device')")
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        self.normalise, self.dtype = normalise, dtype or torch.float32
        if normalise == "device":
            _constants(self.device or "cpu")
        self.views = ViewDataset(dataset, store, view_cfg, colour_cfg, seed)
        kw = dict(prefetch_factor=prefetch_factor, persistent_workers=True,
                  worker_init_fn=_init_worker) if workers > 0 else {}
        if workers > 0:
            # Forked workers inherit OpenCV's thread pool; a serial pool is the one state that is
            # safe to inherit (see _init_worker). The parent decodes nothing in the hot path.
            cv2.setNumThreads(1)
        self._loader = torch.utils.data.DataLoader(
            self.views, batch_sampler=self.sampler, num_workers=workers, pin_memory=pin,
            collate_fn=collate if normalise == "worker" else functools.partial(collate, normalise=False),
            **kw)
        self.skipped_keys: list[str] = []

    @property
    def skipped(self) -> int:
        """Number of unreadable files skipped so far (each replaced by the next image)."""
        return len(self.skipped_keys)

    def set_epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.sampler)

    def close(self):
        """Ends the worker processes now. They are kept from one epoch to the next, so otherwise
        they last as long as this loader, which an exception's traceback can keep until the
        interpreter's exit. A later iteration starts new ones."""
        iterator = getattr(self._loader, "_iterator", None)  # (the DataLoader's persistent one)
        if iterator is not None:
            self._loader._iterator = None
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __iter__(self):
        for batch, skipped in self._loader:
            if skipped:
                warn_skipped(self, skipped)
            if self.device is not None and self.device.type != "cpu":
                batch = batch.to(self.device, non_blocking=True)
            if self.normalise == "device":
                batch = dataclasses.replace(batch, **{
                    name: normalise_uint8(getattr(batch, name), self.dtype)
                    for name in ("view1", "view2", "view2_small")})
            yield batch
