"""The index format, in one place: its layout, the reader (with every check) and the atomic writer."""

from .layout import APPS, ARRAYS, EMBEDDING_DTYPES, FORMAT, FORMAT_VERSION, MANIFEST
from .reader import IndexInvalid, LoadedIndex, StrategyIndex, load_index
from .writer import IndexWriter, make_manifest, recover, staging_dir, swap_in, write_strategy

__all__ = [
    "APPS",
    "ARRAYS",
    "EMBEDDING_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "IndexInvalid",
    "IndexWriter",
    "LoadedIndex",
    "StrategyIndex",
    "load_index",
    "make_manifest",
    "recover",
    "staging_dir",
    "swap_in",
    "write_strategy",
]
