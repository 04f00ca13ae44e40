"""Stores whose ids overlap only partly: which rows are pairs, which are unpaired, and pair budgets.

``align`` in its semi-supervised modes trains on three sets: pairs (ids in both stores), source
rows with no partner and target rows with no partner. The test split is drawn from the pairs only
and held out from everything (its rows are neither pairs nor unpaired rows in training), so every
method is scored on the same held-out pairs. ``pair_budget`` keeps a fraction of the training
pairs as pairs and releases the rest as unpaired rows on both sides (their correspondence
hidden), which is how the benchmark simulates "5 % of rows paired".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from encoders.store import EmbeddingStore
from projection.align.data import _id_hash


@dataclass
class Partition:
    """Row indices into the two stores. ``paired_*`` line up: paired_src[k] <-> paired_tgt[k] (id ``paired_ids[k]``)."""

    paired_ids: np.ndarray
    paired_src: np.ndarray
    paired_tgt: np.ndarray
    source_only: np.ndarray
    target_only: np.ndarray


def partition_stores(src: EmbeddingStore, tgt: EmbeddingStore) -> Partition:
    """Split both stores' rows into shared ids (pairs) and rows with no partner, in store order."""
    tindex = tgt.index
    src_ids = src.ids
    j = np.fromiter((tindex.get(k, -1) for k in src_ids), dtype=np.int64, count=len(src_ids))
    shared = j >= 0
    tgt_shared = np.zeros(len(tgt), bool)
    tgt_shared[j[shared]] = True
    return Partition(paired_ids=src_ids[shared], paired_src=np.flatnonzero(shared), paired_tgt=j[shared],
                     source_only=np.flatnonzero(~shared), target_only=np.flatnonzero(~tgt_shared))


def pair_budget(ids, rows: np.ndarray, frac: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kept, released): ``round(frac * len(rows))`` of ``rows`` stay pairs, chosen by a seeded id hash.

    The choice depends only on the ids and the seed, so a larger budget contains a smaller one
    (the 5 % pairs are among the 20 %), which keeps a pairs-vs-R@1 curve free of sampling noise.
    """
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"paired fraction must be in [0, 1], got {frac}")
    rows = np.asarray(rows, np.int64)
    order = sorted(range(len(rows)), key=lambda k: (_id_hash(seed + 7919, ids[rows[k]]), str(ids[rows[k]])))
    n_keep = int(round(frac * len(rows)))
    kept = np.sort(rows[np.asarray(order[:n_keep], np.int64)])
    released = np.sort(rows[np.asarray(order[n_keep:], np.int64)])
    return kept, released


def check_pairs(n_train_pairs: int, n_test_pairs: int, mode: str, n_shared: int, min_pairs: int = 2) -> None:
    """One clear line when a mode lacks the pairs it needs; the test split always needs pairs."""
    if n_test_pairs == 0:
        raise ValueError(f"the test split has no pairs (the stores share {n_shared} ids): evaluation needs held-out "
                         "pairs; give stores that share ids, or raise split.test_frac")
    if mode != "zero_pair" and n_train_pairs < min_pairs:
        raise ValueError(f"mode {mode!r} needs at least {min_pairs} pairs in the training split, got {n_train_pairs} "
                         f"(the stores share {n_shared} ids); use mode='zero_pair' for two encoders of the same inputs")


@dataclass
class SemiInputs:
    """What a semi-supervised fit sees: pairs, unpaired rows per side, and each id's role (recorded with the run)."""

    xp: np.ndarray  # (P, D_src) train pairs kept as pairs
    yp: np.ndarray  # (P, D_tgt)
    xu: np.ndarray  # (U_s, D_src) source rows without a known partner
    yu: np.ndarray  # (U_t, D_tgt) target rows without a known partner
    pair_ids: list
    roles: list[tuple[str, str]]  # (id, role): pair | released | val | test | source_only | target_only


def semi_inputs(src: EmbeddingStore, tgt: EmbeddingStore, part: Partition, split: dict[str, np.ndarray],
                paired_frac: float, seed: int = 0) -> SemiInputs:
    """Train pairs (a ``paired_frac`` budget of them), and unpaired rows: released train pairs + rows with no partner.

    ``split`` indexes ``part.paired_ids``; its val and test rows are held out of everything.
    """
    ids = part.paired_ids
    kept, released = pair_budget(ids, split["train"], paired_frac, seed)
    xu = np.concatenate([src.take(part.paired_src[released]), src.take(part.source_only)])
    yu = np.concatenate([tgt.take(part.paired_tgt[released]), tgt.take(part.target_only)])
    # Released pairs stay in row order on the source side only: shuffle the target side so that
    # no downstream code can use their correspondence by accident.
    yu = yu[np.random.default_rng(seed).permutation(len(yu))]
    roles = [(str(ids[i]), "pair") for i in kept] + [(str(ids[i]), "released") for i in released]
    roles += [(str(ids[i]), name) for name in ("val", "test") for i in split[name]]
    roles += [(str(src.ids[i]), "source_only") for i in part.source_only]
    roles += [(str(tgt.ids[i]), "target_only") for i in part.target_only]
    return SemiInputs(src.take(part.paired_src[kept]), tgt.take(part.paired_tgt[kept]), xu, yu,
                      [str(ids[i]) for i in kept], roles)
