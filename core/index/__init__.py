"""The index format, in one place: its layout, the reader (with every check) and the atomic writer."""

from .layout import APPS, ARRAYS, ATTENTION, FORMAT, FORMAT_VERSION, MANIFEST, SKETCH_DIR, VARIANTS_DIR
from .reader import IndexInvalid, LoadedIndex, load_index
from .writer import IndexWriter, make_manifest, recover, write_strategy, write_variant
