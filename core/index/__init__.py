"""The index format, in one place: its layout, the reader (with every check) and the atomic writer."""

from .layout import APPS, ARRAYS, EMBEDDING_DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, SKETCH_DIR, VARIANTS_DIR
from .reader import IndexInvalid, LoadedIndex, StrategyIndex, VariantTables, load_index
from .writer import IndexWriter, make_manifest, recover, staging_dir, swap_in, write_strategy, write_variant

__all__ = [
    "APPS",
    "ARRAYS",
    "EMBEDDING_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SKETCH_DIR",
    "VARIANTS_DIR",
    "IndexInvalid",
    "IndexWriter",
    "LoadedIndex",
    "StrategyIndex",
    "VariantTables",
    "load_index",
    "make_manifest",
    "recover",
    "staging_dir",
    "swap_in",
    "write_strategy",
    "write_variant",
]
