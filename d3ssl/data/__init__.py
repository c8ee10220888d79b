"""Everything between files on disk and a :class:`~d3ssl.data.batch.Batch`."""
from .batch import Batch

__all__ = ["Batch"]
