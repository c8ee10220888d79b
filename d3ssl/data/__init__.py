"""Everything between files on disk and a :class:`~d3ssl.data.batch.Batch`.

The names below are imported on first use, so ``python -m d3ssl.data.proposals`` runs its module
fresh (and importing the package stays cheap)."""
import importlib

from .batch import Batch

_EXPORTS = {
    "ColourConfig": "colour",
    "CocoDataset": "datasets", "ImageDataset": "datasets", "ImageDecodeError": "datasets",
    "ImageFolder": "datasets", "decode_image": "datasets", "open_dataset": "datasets",
    "make_loader": "loader",
    "ProposalConfig": "proposals", "ProposalStore": "proposals", "default_store_path": "proposals",
    "ensure_proposals": "proposals", "generate_proposals": "proposals",
    "ensure_synthetic": "synthetic",
    "ViewConfig": "views", "ViewParams": "views", "sample_seed": "views", "sample_views": "views",
}

__all__ = ["Batch", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
