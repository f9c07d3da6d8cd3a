"""Global batches by example index, for the text and the image-text pipelines alike.

An objective's examples form one endless order: each data.files entry's rows shuffled by a
seed of its own (a new permutation each epoch), repeated, and entries mixed by weight with
Grain's `mix`. Global batch s is examples [s * B, (s + 1) * B); process p of n takes the p-th
contiguous B / n of them. Random streams are keyed by an example's global index. So what a
step sees depends on the data, the seed, B and s only: not on the process count, nor on the
step a run resumed from.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:  # Grain is imported where batches are made (bench runs without it)
    import grain

log = logging.getLogger("jaxlm")
PREFETCH = 16  # batches Grain's read threads keep ready


def mixture_weights(given: tuple[float, ...], sizes: list[float], names: list[str]) -> list[float]:
    """`data.weights` (checks.validate checked them) normalised, one per entry (default:
    proportional to `sizes`)."""
    if not given:
        return [n / sum(sizes) for n in sizes]
    for entry, w in zip(names, given, strict=True):
        if w == 0:
            log.info("data.weights: %s has weight 0: not trained on (still evaluated)", entry)
    return [w / sum(given) for w in given]


def mixed_rows(lengths: list[int], weights: list[float], seed: int) -> grain.MapDataset:
    """The endless training order of several entries as a MapDataset of (entry, row): each
    entry's rows shuffled by a seed of its own (a new permutation each epoch), repeated, and
    mixed by weight with Grain's `mix` (entries of weight 0 left out)."""
    import grain

    mixed = [(k, w) for k, w in enumerate(weights) if w > 0]
    parts = [
        grain.MapDataset.range(lengths[k])
        .shuffle(seed=seed + k)
        .repeat(None)
        .map(functools.partial(tagged, k))
        for k, _ in mixed
    ]
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, [w for _, w in mixed])


def tagged(k: int, row: int) -> tuple[int, int]:
    """An example of the order: row `row` of entry `k`."""
    return k, row


def _collate_with_index(collate: Callable, b: int, j: int, items: list) -> dict:
    return collate(j * b, items)


def global_batches(
    ds: grain.MapDataset | list,
    batch_size: int,
    start_step: int,
    process_index: int | None = None,
    process_count: int | None = None,
    collate: Callable[[int, list], dict] | None = None,
) -> grain.MapDataset:
    """Examples [s * B, (s + 1) * B) form global batch s; process p of n gets the p-th
    contiguous B / n of them, stacked, or passed to collate(index of the first, examples).
    Returns this process's batches from start_step on."""
    import grain

    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if not isinstance(ds, grain.MapDataset):
        ds = grain.MapDataset.source(ds)
    b = batch_size // n
    if collate is None:
        ds = ds.batch(b)
    else:
        ds = ds.batch(b, batch_fn=list).map_with_index(
            functools.partial(_collate_with_index, collate, b)
        )
    return ds[start_step * n + p :: n]


def read_options() -> grain.ReadOptions:
    import grain

    # One read thread (one batch in flight) per core: more threads only contend for the GIL
    # (measured with the row-by-row reader: 16 threads on 2 cores read half as fast as 2).
    threads = min(16, os.cpu_count() or 1)
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=PREFETCH)


def row_rngs(seed: int, indices: np.ndarray) -> list[np.random.Generator]:
    """One random stream per row, keyed by the row's global example index: the streams Grain's
    `random_map(..., seed=seed)` hands out (Philox keyed by the seed, counter [0, 0, 0, index])."""
    key = np.random.Philox(seed).state["state"]["key"]
    return [
        np.random.Generator(np.random.Philox(key=key, counter=[0, 0, 0, int(i)])) for i in indices
    ]


def global_sum(values: list[float]) -> np.ndarray:
    """Sums over every process of per-process values (each process holds its share of the
    held-out batches)."""
    out = np.asarray(values, np.float64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        out = np.asarray(multihost_utils.process_allgather(out), np.float64).sum(0)
    return out
