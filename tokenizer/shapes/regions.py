"""Connected regions of a boolean mask, in numpy alone: label its 4-connected components, then
grow the labelled regions outwards, leaving the pixels that two regions reach at once to neither.
"""

import numpy as np


def _neighbours(labels: np.ndarray) -> np.ndarray:
    """(4, N, N): each pixel's up, down, left and right neighbour, 0 past the border."""
    around = np.zeros((4, *labels.shape), labels.dtype)
    around[0, 1:], around[1, :-1] = labels[:-1], labels[1:]
    around[2, :, 1:], around[3, :, :-1] = labels[:, :-1], labels[:, 1:]
    return around


def _spread_along_rows(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give every pixel of each horizontal run of `mask` the largest label in that run."""
    gapped = np.pad(mask, ((0, 0), (0, 1))).ravel()  # a False after each row ends its runs
    run = np.cumsum(~gapped)[gapped]  # run id of each masked pixel, in raster order
    values = labels[mask]
    starts = np.flatnonzero(np.diff(run, prepend=-1))
    largest = np.maximum.reduceat(values, starts)
    spread = np.zeros_like(labels)
    spread[mask] = np.repeat(largest, np.diff(np.append(starts, len(values))))
    return spread


def components(mask: np.ndarray) -> np.ndarray:
    """Label 4-connected components of a boolean (N, N) mask: 0 outside, 1..K inside.

    Labels spread along whole row runs, then column runs, until nothing changes: a few sweeps
    for convex blobs.
    """
    if not mask.any():
        return np.zeros(mask.shape, np.int64)
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = _spread_along_rows(labels, mask)
        spread = _spread_along_rows(spread.T, mask.T).T
        if np.array_equal(spread, labels):
            break
        labels = spread
    dense = np.searchsorted(np.unique(labels[mask]), labels) + 1
    return np.where(mask, dense, 0)


def grow(labels: np.ndarray, steps: int) -> np.ndarray:
    """Grow labelled regions into unlabelled pixels; pixels two regions reach at once get -1."""
    for _ in range(steps):
        around = _neighbours(labels)
        highest = around.max(axis=0)
        lowest = np.where(around > 0, around, np.iinfo(labels.dtype).max).min(axis=0)
        free = labels == 0
        labels = np.where(free & (highest > 0) & (highest == lowest), highest, labels)
        labels = np.where(free & (highest > 0) & (highest != lowest), -1, labels)
    return labels
