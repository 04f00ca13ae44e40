"""The embedding store: one HDF5 file per (dataset, modality, encoder), written crash-safe.

Modules, one concept each: ``format`` (paths, attributes, errors, checksummed byte form),
``lock`` (one writer; readers told apart from damage), ``journal`` (the partial store: append,
commit, resume), ``assemble`` (final HDF5, full read-back, atomic rename, in a child process),
``writer`` (StoreWriter on top), ``reader`` (EmbeddingStore, join), ``disk`` (free space),
``shards`` (sharded extraction and merge). Why the write path is shaped this way: writer.py.
"""

from encoders.store.format import (FORMAT_VERSION, IDENTITY_ATTRS, STR, StoreError, StoreFull, StoreLocked,
                                   library_versions)
from encoders.store.reader import EmbeddingStore, PairedStores, join_stores
from encoders.store.writer import StoreWriter

__all__ = ["EmbeddingStore", "PairedStores", "join_stores", "StoreWriter", "StoreError", "StoreLocked", "StoreFull",
           "IDENTITY_ATTRS", "FORMAT_VERSION", "STR", "library_versions"]
