"""make_loader: the one entry point that turns a dataset and its proposals into Batches.

    loader = make_loader(dataset, store, backend="cpu", batch_size=64)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...

Backends by name: ``cpu`` (OpenCV in DataLoader workers, :mod:`d3ssl.data.cpu_loader`) and ``dali``
(DALI decode and augmentation, on the GPU or in DALI's CPU-only mode, :mod:`d3ssl.data.dali`, when
DALI is installed). Both use the same view sampler, batches and per-sample seeds, and return the same
Batch.
"""
from __future__ import annotations

import os

from .colour import ColourConfig
from .proposals import ProposalStore
from .views import ViewConfig

BACKENDS = ("cpu", "dali")


def make_loader(dataset, store, backend: str = "cpu", batch_size: int = 64, workers: int | None = None,
                view_cfg: ViewConfig | None = None, colour_cfg: ColourConfig | None = None, seed: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = True, shuffle: bool = True,
                device=None, check_store: bool = True, **backend_kw):
    """Builds the loader of one rank.

    Args:
        dataset: an ImageDataset (see :mod:`d3ssl.data.datasets`).
        store: a ProposalStore or the path of one; must match the dataset (checked).
        backend: "cpu" or "dali".
        batch_size: samples per Batch on this rank.
        workers: loader processes (cpu backend; default: all cores, 0 = in the calling process).
        view_cfg, colour_cfg: geometry and colour augmentation (SoCo's defaults).
        seed: base seed; a sample's views depend only on (seed, epoch, index).
        rank, world_size: this process's shard (every world_size-th sample of the epoch order).
        drop_last: drop the remainder so every rank has the same number of full batches (needed by DDP).
        device: where Batches are delivered (None: where the backend makes them; CPU for "cpu").
        backend_kw: the backend's own options: for "cpu", `normalise` ("worker" or "device": by
            default the CPU loader's workers hand GPU-bound batches over as uint8 pixels, normalised
            on the GPU), `dtype` and `prefetch_factor` (:class:`~d3ssl.data.cpu_loader.CpuLoader`);
            for "dali", those of :func:`~d3ssl.data.dali.make_dali_loader`.

    Returns an iterable of Batch with ``set_epoch(epoch)`` and ``len()`` (batches per epoch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if len(dataset) == 0:
        raise ValueError("make_loader: the dataset is empty")
    if drop_last and len(dataset) // world_size < batch_size:
        raise ValueError(f"make_loader: {len(dataset)} images on {world_size} rank(s) give no full batch of "
                         f"{batch_size}; lower batch_size or pass drop_last=False")
    if isinstance(store, (str, os.PathLike)):
        store = ProposalStore(os.fspath(store))
    if check_store:
        store.check_matches(dataset)
    view_cfg = view_cfg or ViewConfig()
    colour_cfg = colour_cfg or ColourConfig()
    if workers is None:
        workers = os.cpu_count() or 1
    if backend == "cpu":
        from .cpu_loader import CpuLoader
        return CpuLoader(dataset, store, batch_size, workers, view_cfg, colour_cfg, seed, rank, world_size,
                         drop_last, shuffle=shuffle, device=device, **backend_kw)
    from .dali import make_dali_loader   # raises DaliUnavailable (how to install, what to use) without DALI
    return make_dali_loader(dataset, store, batch_size=batch_size, workers=workers, view_cfg=view_cfg,
                            colour_cfg=colour_cfg, seed=seed, rank=rank, world_size=world_size,
                            drop_last=drop_last, shuffle=shuffle, device=device, **backend_kw)
