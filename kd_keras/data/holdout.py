"""A held-out part of a training split, for choosing hyper-parameters without the reported split.

A split name `<split>@holdout<P>` means P % of `<split>`, chosen per class, and `<split>@rest<P>`
the other (100 - P) %: training on `train@rest10` and evaluating its k-NN on `train@holdout10`
selects a learning rate (kd_keras.experiments' sweeps) while the reported split (`val`) is never
looked at. The choice is a pure function of the examples' names (file paths relative to the
split folder, or row numbers), not of `--seed`: every candidate and every seed of a sweep holds
out the same examples, and adding files to one class does not reshuffle another.
"""

import hashlib
import re

import numpy as np

_PART = re.compile(r"^(?P<split>[^@]+)@(?P<part>holdout|rest)(?P<percent>\d+)$")


def parse_split(split):
    """`"train@holdout10"` -> ("train", "holdout", 10); a plain split -> (split, None, 0).

    Raises:
      ValueError: naming the split when the part or percentage is malformed.
    """
    if "@" not in split:
        return split, None, 0
    match = _PART.match(split)
    if not match or not 1 <= int(match["percent"]) <= 90:
        raise ValueError(
            f"split {split!r}: a held-out part is written <split>@holdout<P> or "
            "<split>@rest<P> with P a whole percentage from 1 to 90 (e.g. train@holdout10)."
        )
    return match["split"], match["part"], int(match["percent"])


def _rank_key(name):
    return hashlib.sha256(str(name).encode()).digest()


def holdout_mask(labels, names, percent):
    """Which examples form the held-out part: round(P % of each class), at least one example
    of every class with two or more, chosen by the hash of each example's name.

    Args:
      labels: int [N] class of each example.
      names: N strings (or ints) naming the examples stably (relative paths, row numbers).
      percent: P, 1..90.
    Returns:
      bool [N]: True for the held-out examples.
    """
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue  # a class of one example stays in training
        count = max(1, int(round(len(members) * percent / 100.0)))
        ranked = sorted(members, key=lambda i: _rank_key(names[i]))
        mask[ranked[:count]] = True
    return mask


def select(part, labels, names, percent):
    """Indices (ascending) of the examples of `part` ("holdout" or "rest"; None = all)."""
    if part is None:
        return np.arange(len(labels))
    mask = holdout_mask(labels, names, percent)
    return np.flatnonzero(mask if part == "holdout" else ~mask)
