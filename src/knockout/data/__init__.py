"""Data sources and batching: text (built-in Wikipedia, local files, Hugging Face datasets), images."""

from knockout.data.batch import IGNORE, Batch

__all__ = ["IGNORE", "Batch"]
