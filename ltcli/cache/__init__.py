"""The feature cache: one HDF5 file per split, written once by `ltcli extract` (or
`ltcli import-features`), read by every classifier stage.

- `schema`: the file format and its attributes, defined once;
- `reader`: `read_features` (a FeatureSet), `read_attrs`;
- `writer`: `FeatureWriter` (create, resume or reuse a file);
- `compat`: `check_compatible` / `check_same_source` (one backbone, one dataset);
- `info`: `ltcli info`.
"""

from ..featureset import FeatureSet
from .compat import check_cache_options, check_compatible, check_same_source
from .info import info, info_table
from .reader import read_attrs, read_features
from .schema import ATTRS, DTYPES, FORMAT_VERSION, open_h5, shard_path
from .rewrite import rewrite_with_classifier
from .writer import FeatureWriter

__all__ = [
    "ATTRS", "DTYPES", "FORMAT_VERSION", "FeatureSet", "FeatureWriter", "check_cache_options",
    "check_compatible", "check_same_source", "info", "info_table", "open_h5", "read_attrs",
    "read_features", "rewrite_with_classifier", "shard_path",
]
