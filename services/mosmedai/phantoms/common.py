"""Small helpers the phantom modules share (numpy only): header overrides on a built
dataset, a map over phantoms in forked processes, per-item tuples stacked into arrays.
``mosmedai_training.common`` re-exports them for the training code."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def apply_overrides(dataset, overrides: dict):
    """Set each keyword of `overrides` on the dataset (None deletes it); returns the dataset."""
    for keyword, value in overrides.items():
        if value is None:
            if keyword in dataset:
                delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
    return dataset


def map_items(function: Callable, jobs: list, workers: int = 1, chunksize: int | None = None) -> list:
    """`function` over `jobs`, in `workers` forked processes when more than one."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(function, jobs, chunksize=chunksize or max(1, len(jobs) // (8 * workers)))
    return [function(job) for job in jobs]


def stack_columns(rows: list[tuple], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-item tuples -> one stacked array per name."""
    return {name: np.stack(column) for name, column in zip(names, zip(*rows))}
