"""Deterministic, class-balanced label subsets for semi-supervised fine-tuning (OSS A.4).

OSS fine-tunes on 1% and 10% of the ImageNet training labels using the split files released
with SimCLR. Those files only exist for ImageNet, so for any other labelled dataset this module
draws an equivalent subset with a documented rule and stores it as JSON, so a run can be
repeated on exactly the same examples.

Selection rule of `label_subset` (labels are integers >= 0, `fraction` f in (0, 1]):

* for every class c present in `labels`, with count_c examples, keep
  n_c = max(1, floor(f * count_c + 0.5)) examples, i.e. f * count_c rounded half up, but at
  least one example per class (so no class disappears from a 1% subset of a small dataset);
* the n_c examples are the first n_c entries of a random permutation of the class's example
  indices (in ascending order), drawn with `numpy.random.default_rng([seed, c])`.

Because each class has its own generator keyed by (seed, class), the choice inside one class
does not depend on which other classes exist, and because the subset is a prefix of a
fraction-independent permutation, subsets with the same seed are nested: the 1% subset is
contained in the 10% subset.
"""

import dataclasses
import json
import numbers
import os
import tempfile

import numpy as np

SUBSET_FORMAT = "kd_keras.label_subset"
SUBSET_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LabelSubset:
    """A label subset read back by `load_subset`.

    Attributes:
      fraction: requested fraction f in (0, 1].
      seed: the seed the subset was drawn with.
      indices: int64 [num_examples], sorted, unique indices into the full training split.
      per_class_counts: {class: number of selected examples of that class}.
      dataset_size: number of examples of the full split the indices refer to.
    """

    fraction: float
    seed: int
    indices: np.ndarray
    per_class_counts: dict
    dataset_size: int

    @property
    def num_examples(self):
        return int(self.indices.shape[0])


def label_subset(labels, fraction, seed=0):
    """Class-balanced subset of a labelled split (rule in the module docstring).

    Args:
      labels: integer array [N], N >= 1, values >= 0: the label of every training example.
      fraction: float in (0, 1]; 1.0 returns every index.
      seed: integer >= 0.
    Returns:
      int64 array [M] of sorted, unique indices into `labels`, where
      M = sum over classes of max(1, floor(fraction * count_c + 0.5)).
    """
    labels = _check_labels(labels)
    fraction = _check_fraction(fraction)
    seed = _check_seed(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)  # ascending, so the result depends on labels only
        take = _per_class_count(fraction, members.size)
        rng = np.random.default_rng([seed, int(c)])
        chosen.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def save_subset(path, indices, labels, fraction, seed):
    """Writes a subset as JSON, atomically (a temporary file renamed over `path`).

    The file holds {"format", "version", "fraction", "seed", "num_examples", "dataset_size",
    "indices", "per_class_counts"}; per_class_counts maps the class (as a string, JSON keys
    are strings) to its number of selected examples.

    Args:
      path: destination file; its directory must exist.
      indices: sorted, unique integer indices [M] into `labels` (e.g. from `label_subset`).
      labels: integer array [N], the labels of the full split.
      fraction, seed: the arguments the subset was drawn with.
    """
    labels = _check_labels(labels)
    fraction = _check_fraction(fraction)
    seed = _check_seed(seed)
    indices = _check_indices(np.asarray(indices), labels.shape[0], "indices")
    classes, counts = np.unique(labels[indices], return_counts=True)
    record = {
        "format": SUBSET_FORMAT,
        "version": SUBSET_VERSION,
        "fraction": fraction,
        "seed": seed,
        "num_examples": int(indices.shape[0]),
        "dataset_size": int(labels.shape[0]),
        "indices": [int(i) for i in indices],
        "per_class_counts": {str(int(c)): int(n) for c, n in zip(classes, counts, strict=True)},
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".subset-", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_subset(path, labels=None):
    """Reads and validates a file written by `save_subset`.

    Args:
      path: the JSON file.
      labels: optional integer array [N] of the split the subset will be applied to; when given,
        its size and the per-class counts of labels[indices] must match the file (catches a
        subset applied to a different or reordered dataset).
    Returns:
      `LabelSubset`.
    Raises:
      ValueError naming the offending field when the file is malformed or inconsistent.
    """
    with open(path) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(record, dict) or record.get("format") != SUBSET_FORMAT:
        raise ValueError(f"{path} is not a kd_keras label subset (format != {SUBSET_FORMAT!r})")
    if record.get("version") != SUBSET_VERSION:
        raise ValueError(f"{path}: unsupported version {record.get('version')!r}")
    for key in ("fraction", "seed", "num_examples", "dataset_size", "indices", "per_class_counts"):
        if key not in record:
            raise ValueError(f"{path}: missing field {key!r}")
    fraction = _check_fraction(record["fraction"])
    seed = _check_seed(record["seed"])
    size = record["dataset_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{path}: dataset_size must be a positive integer, got {size!r}")
    raw = record["indices"]
    if not isinstance(raw, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in raw
    ):
        raise ValueError(f"{path}: indices must be a list of integers")
    indices = _check_indices(np.asarray(raw, dtype=np.int64), size, "indices")
    if record["num_examples"] != indices.shape[0]:
        raise ValueError(
            f"{path}: num_examples={record['num_examples']!r} but indices has "
            f"{indices.shape[0]} entries"
        )
    counts = record["per_class_counts"]
    try:
        per_class = {int(c): int(n) for c, n in counts.items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: per_class_counts must map class ids to counts") from err
    if sum(per_class.values()) != indices.shape[0]:
        raise ValueError(
            f"{path}: per_class_counts sum to {sum(per_class.values())} but there are "
            f"{indices.shape[0]} indices"
        )
    if labels is not None:
        labels = _check_labels(labels)
        if labels.shape[0] != size:
            raise ValueError(
                f"labels has {labels.shape[0]} entries but the subset in {path} was drawn from "
                f"{size} examples"
            )
        classes, found = np.unique(labels[indices], return_counts=True)
        actual = {int(c): int(n) for c, n in zip(classes, found, strict=True)}
        if actual != per_class:
            raise ValueError(
                f"labels do not match the subset in {path}: per-class counts of labels[indices] "
                "differ from per_class_counts"
            )
    return LabelSubset(fraction, seed, indices, dict(sorted(per_class.items())), size)


def _per_class_count(fraction, count):
    # Round half up (Python's round() is half-to-even); never drop a class.
    return int(min(count, max(1, np.floor(fraction * count + 0.5))))


def _check_labels(labels):
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels is empty")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must hold integers, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
    return labels


def _check_fraction(fraction):
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, numbers.Real)
        or not np.isfinite(fraction)
        or not 0.0 < fraction <= 1.0
    ):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _check_indices(indices, size, name):
    if indices.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {indices.shape}")
    if indices.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {indices.dtype}")
    if indices.min() < 0 or indices.max() >= size:
        raise ValueError(f"{name} must lie in [0, {size}), found {indices.min()}..{indices.max()}")
    if np.any(np.diff(indices) <= 0):
        raise ValueError(f"{name} must be sorted in increasing order without duplicates")
    return indices.astype(np.int64)
