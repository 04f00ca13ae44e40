"""Flow: an ANN index for a store, built, tuned and saved beside it (`xmodal build-index STORE`).

The work is projection/search/index.py's ``build_for_store``: autofaiss's choice of index by size
and memory, k-means on a seeded sample, ``nprobe`` tuned to recall@10 >= 0.95 against exact search
on stored rows. The flow makes it a Prefect run (retried never: a build is deterministic, a failure
is the input's) whose artifact is the sidecar's summary; the search service and `xmodal search`
pick the index up from beside the store.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import process_guard
from projection.search.index import ANN_MIN_ROWS, DEFAULT_MEMORY, TARGET_RECALL, build_for_store

process_guard.install()


class IndexParams(BaseModel):
    """Which store to index and how much memory the index may hold."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(description="The embedding store (.h5) to index; the index is saved beside it.")
    kind: Literal["flat", "ivf_flat", "ivf_pq", "hnsw"] | None = Field(
        None, description="Force an index kind; empty: chosen by size and memory (Flat / IVF-Flat / IVF-PQ).")
    memory_gib: float = Field(DEFAULT_MEMORY / 2**30, gt=0, description="Memory the index may hold; above it IVF-PQ.")
    flat_below: int = Field(ANN_MIN_ROWS, ge=1, description="Fewer rows than this: a Flat (exact) index.")
    target_recall: float = Field(TARGET_RECALL, gt=0, le=1, description="recall@10 against exact that nprobe is tuned to.")
    seed: int = Field(0, description="Seeds the k-means sample and the tuning queries.")


@task(name="build-index", cache_policy=NO_CACHE)
def build_index_task(params: IndexParams) -> dict:
    return build_for_store(params.store, kind=params.kind, memory_bytes=int(params.memory_gib * 2**30),
                           flat_below=params.flat_below, target=params.target_recall, seed=params.seed)


@flow(name="build-index", log_prints=True)
def build_index(params: IndexParams) -> dict:
    """Build and save the store's index; returns the sidecar (plan, nprobe, recall, build time, size)."""
    side = build_index_task(params)
    plan, tuning = side["plan"], side["tuning"]
    line = (f"{plan['factory']} over {plan['n']:,} x {plan['dim']}: nprobe {side['nprobe']}, recall@{tuning['k']} "
            f"{tuning['recall_at_k']:.3f} vs exact, built in {side['build']['build_s']:.1f} s, "
            f"{side['index_bytes'] / 2**20:.1f} MiB ({plan['reason']})")
    get_run_logger().info(line)
    create_markdown_artifact(f"**index** `{params.store}`: {line}", key="search-index")
    return side
