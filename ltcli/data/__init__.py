"""Datasets: `--data SPEC` parsing, sources, long-tail selection, synthetic data, decoding."""

from .decode import decode_split
from .loader import load_dataset
from .longtail import longtail_counts
from .sources import IMAGE_EXTENSIONS
from .spec import parse_spec, resolve_spec
from .torchdata import SplitDataset, collate_skip
from .types import DataConfig, Dataset, Split

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataConfig",
    "Dataset",
    "Split",
    "SplitDataset",
    "collate_skip",
    "decode_split",
    "load_dataset",
    "longtail_counts",
    "parse_spec",
    "resolve_spec",
]
