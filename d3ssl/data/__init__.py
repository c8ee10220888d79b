"""Everything between files on disk and a :class:`~d3ssl.data.batch.Batch`."""
from .batch import Batch
from .colour import ColourConfig
from .datasets import CocoDataset, ImageDataset, ImageDecodeError, ImageFolder, decode_image, open_dataset
from .loader import make_loader
from .proposals import ProposalConfig, ProposalStore, default_store_path, generate_proposals
from .synthetic import ensure_synthetic
from .views import ViewConfig, ViewParams, sample_seed, sample_views

__all__ = ["Batch", "CocoDataset", "ColourConfig", "ImageDataset", "ImageDecodeError", "ImageFolder",
           "ProposalConfig", "ProposalStore", "ViewConfig", "ViewParams", "decode_image",
           "default_store_path", "ensure_synthetic", "generate_proposals", "make_loader", "open_dataset",
           "sample_seed", "sample_views"]
