"""Streaming loaders over one hook of a store: shuffled batches for training, ordered blocks for evaluation."""

from .chunks import ChunkCorruptError, ChunkReader
from .ordered import ImageBlock, OrderedLoader
from .shuffled import DEFAULT_BUFFER_MB, DEFAULT_N_READERS, ShuffledLoader

__all__ = ["ShuffledLoader", "OrderedLoader", "ImageBlock", "ChunkReader", "ChunkCorruptError", "DEFAULT_BUFFER_MB", "DEFAULT_N_READERS"]
