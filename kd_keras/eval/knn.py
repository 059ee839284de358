"""k-nearest-neighbour classification of frozen features (FAISS, NumPy in / NumPy out).

This is the standard linear-probe-free evaluation of self-supervised representations: features
of a labelled training set are stored, and each test feature is classified by the labels of its
k most cosine-similar training features.

Similarity is the inner product of l2-normalised float32 features, searched exactly with a
`faiss.IndexFlatIP`. The k neighbours of a test row are ordered by decreasing similarity; exactly
equal similarities are ordered by increasing training index, so results do not depend on the
order in which FAISS happens to return equal candidates. ("Rank" below is the position in this
order, 0 for the nearest neighbour.)

Two voting rules are provided:

* ``"majority"`` (SimReg / CompRess protocol): every neighbour casts one vote for its class and
  the class with the most votes wins. When several classes share the largest vote count, the
  winner is the tied class whose best-ranked neighbour is nearest to the test row, i.e. the
  first class among the tied ones to appear when walking the neighbours from rank 0 upward.
  Scores are the vote counts.
* ``"weighted"`` (DINO protocol): a neighbour with cosine similarity ``s`` votes with weight
  ``exp(s / temperature)``; the class with the largest summed weight wins. Scores are the summed
  weights (computed in float64, returned as float32). Exact ties are broken like the majority
  vote, by the nearest neighbour among the tied classes.

Both rules rank all classes by (score descending, rank of the class's nearest neighbour
ascending); top-1 is the first class of that order and top-5 the first five.
"""

import contextlib
import numbers

import faiss
import numpy as np

from kd_keras import choices

VOTES = choices.KNN_VOTES

# Largest x with exp(x) finite in float32 is ~88.72; keep a margin for similarities that exceed
# 1 by a rounding error.
_FLOAT32_LOG_MAX = 88.0


def l2_normalize(x, eps=1e-12):
    """Scales each row of `x` to unit l2 norm.

    The norm is computed after dividing each row by its largest absolute entry, so rows with huge
    or tiny entries neither overflow nor underflow. Rows that are entirely zero stay zero.

    Args:
      x: real array [N, D] (any float or integer dtype).
      eps: lower bound on the divisor, guarding against division by zero.
    Returns:
      float32 array [N, D], C-contiguous, rows of unit norm (or zero).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D array [N, D], got shape {x.shape}")
    work_dtype = np.float64 if x.dtype == np.float64 else np.float32
    x = x.astype(work_dtype, copy=False)
    if x.size == 0:
        return np.ascontiguousarray(x, dtype=np.float32)
    scale = np.max(np.abs(x), axis=1, keepdims=True)
    scale[scale == 0] = 1.0
    scaled = x / scale
    norm = np.linalg.norm(scaled, axis=1, keepdims=True)
    return np.ascontiguousarray(scaled / np.maximum(norm, eps), dtype=np.float32)


def search_neighbors(train_features, test_features, k, chunk_size=4096, num_threads=None):
    """Exact cosine-similarity k-NN search with a FAISS flat inner-product index.

    Both feature sets are l2-normalised (see `l2_normalize`). The test rows are searched in
    chunks of `chunk_size` rows, so at most a chunk_size x N block of similarities exists at once.

    Args:
      train_features: float array [N, D], finite.
      test_features: float array [M, D], finite.
      k: number of neighbours, 1 <= k <= N.
      chunk_size: test rows per FAISS search call, >= 1.
      num_threads: OpenMP threads FAISS may use; None keeps the current FAISS setting (by default
        one per core). The previous setting is restored afterwards.
    Returns:
      (similarities, indices): float32 [M, k] cosine similarities sorted in decreasing order
      (equal values by increasing index) and int64 [M, k] row indices into `train_features`.
    """
    train = check_features(train_features, "train_features")
    test = check_features(test_features, "test_features")
    if test.shape[1] != train.shape[1]:
        raise ValueError(
            f"test_features has dimension {test.shape[1]} but train_features has dimension "
            f"{train.shape[1]}"
        )
    k = _check_k(k, train.shape[0])
    chunk_size = _check_int(chunk_size, "chunk_size", minimum=1)
    return _search(l2_normalize(train), l2_normalize(test), k, chunk_size, num_threads)


def vote_neighbors(
    neighbor_labels, neighbor_similarities, num_classes, vote="majority", temperature=0.07
):
    """Turns the labels of ranked neighbours into per-class scores and a top-1 prediction.

    Args:
      neighbor_labels: int array [M, k], labels in [0, num_classes) of each test row's neighbours,
        nearest first (column 0 is rank 0).
      neighbor_similarities: float array [M, k] cosine similarities in the same order (only used
        by the "weighted" vote).
      num_classes: number of classes C.
      vote: "majority" or "weighted" (see the module docstring for the exact rules).
      temperature: softness of the "weighted" vote, > 0.
    Returns:
      (predictions, scores): int64 [M] top-1 classes and float32 [M, C] per-class scores
      (vote counts for "majority", summed exp(similarity / temperature) for "weighted").
    """
    neighbor_labels = np.asarray(neighbor_labels)
    neighbor_similarities = np.asarray(neighbor_similarities)
    if neighbor_labels.ndim != 2 or neighbor_labels.shape[1] < 1:
        raise ValueError(
            f"neighbor_labels must be a 2-D array [M, k] with k >= 1, got shape "
            f"{neighbor_labels.shape}"
        )
    if neighbor_similarities.shape != neighbor_labels.shape:
        raise ValueError(
            f"neighbor_similarities has shape {neighbor_similarities.shape} but neighbor_labels "
            f"has shape {neighbor_labels.shape}"
        )
    num_classes = _check_int(num_classes, "num_classes", minimum=1)
    _check_labels(neighbor_labels, "neighbor_labels", num_classes)
    vote = _check_vote(vote)
    temperature = _check_temperature(temperature, vote, neighbor_labels.shape[1])
    scores, first_rank = _scores_and_first_rank(
        neighbor_labels, neighbor_similarities, num_classes, vote, temperature
    )
    return _top1(scores, first_rank), scores.astype(np.float32)


def knn_classify(
    train_features,
    train_labels,
    test_features,
    k=20,
    vote="majority",
    num_classes=None,
    temperature=0.07,
    chunk_size=4096,
    return_scores=False,
    num_threads=None,
):
    """Classifies test features by a vote of their k most cosine-similar training features.

    Args:
      train_features: float array [N, D], finite.
      train_labels: integer array [N], values >= 0.
      test_features: float array [M, D], finite.
      k: number of neighbours, 1 <= k <= N.
      vote: "majority" or "weighted" (rules and tie-breaking in the module docstring).
      num_classes: number of classes C; None infers max(train_labels) + 1.
      temperature: "weighted" vote weight is exp(similarity / temperature); must be > 0.
      chunk_size: test rows per FAISS search call; bounds memory at chunk_size x N similarities.
      return_scores: also return the per-class scores.
      num_threads: FAISS OpenMP threads; None keeps the current setting.
    Returns:
      int64 [M] predicted labels, or (predictions, scores) with float32 scores [M, C] when
      `return_scores` is true.
    Raises:
      ValueError: naming the offending argument, for empty or non-finite features, mismatched
        dimensions or label counts, k outside [1, N], or an unknown vote.
    """
    train, labels, test, num_classes = _check_dataset(
        train_features, train_labels, test_features, num_classes
    )
    k = _check_k(k, train.shape[0])
    vote = _check_vote(vote)
    temperature = _check_temperature(temperature, vote, k)
    chunk_size = _check_int(chunk_size, "chunk_size", minimum=1)

    sims, idx = _search(l2_normalize(train), l2_normalize(test), k, chunk_size, num_threads)
    predictions = np.empty(test.shape[0], dtype=np.int64)
    scores_out = np.empty((test.shape[0], num_classes), np.float32) if return_scores else None
    # Voting also goes chunk by chunk because its [rows, C] work arrays can be large for
    # ImageNet-sized C.
    for start in range(0, test.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        scores, first_rank = _scores_and_first_rank(
            labels[idx[rows]], sims[rows], num_classes, vote, temperature
        )
        predictions[rows] = _top1(scores, first_rank)
        if return_scores:
            scores_out[rows] = scores
    if return_scores:
        return predictions, scores_out
    return predictions


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    ks=(1, 20),
    vote="majority",
    num_classes=None,
    temperature=0.07,
    chunk_size=4096,
    num_threads=None,
):
    """k-NN top-1 (and top-5) accuracy for several k from a single neighbour search.

    FAISS is queried once for max(ks) neighbours; because neighbours come sorted by similarity,
    the k nearest for any smaller k are the first k columns.

    Keys of the returned dict (values are Python floats in [0, 1]):
      * ``"knn_top1_k{k}"`` for every k in `ks`: fraction of test rows whose top-1 prediction
        equals the label.
      * ``"knn_top5_k{k}"`` only for k >= 5 when there are more than 5 classes: fraction of test
        rows whose label is among the 5 best-ranked classes *that received a vote* (a class with
        zero score never counts as a hit, so top-5 cannot be inflated by arbitrary zero-score
        classes). It is omitted for k < 5 (fewer than 5 classes can receive votes) and for
        C <= 5 (it would trivially be 1).

    Args:
      train_features: float array [N, D]; train_labels: integer array [N], values >= 0.
      test_features: float array [M, D]; test_labels: integer array [M], values >= 0.
      ks: iterable of neighbour counts, each in [1, N].
      vote, temperature, chunk_size, num_threads: as in `knn_classify`.
      num_classes: number of classes C; None infers 1 + the largest train or test label.
    Returns:
      dict[str, float] as described above.
    """
    train, labels, test, num_classes = _check_dataset(
        train_features, train_labels, test_features, num_classes, test_labels=test_labels
    )
    test_labels = np.asarray(test_labels).astype(np.int64, copy=False)
    try:
        ks = sorted({_check_k(k, train.shape[0], name="ks") for k in ks})
    except TypeError as err:
        raise ValueError(f"ks must be an iterable of integers, got {ks!r}") from err
    if not ks:
        raise ValueError("ks must contain at least one neighbour count")
    vote = _check_vote(vote)
    temperature = _check_temperature(temperature, vote, ks[-1])
    chunk_size = _check_int(chunk_size, "chunk_size", minimum=1)

    sims, idx = _search(l2_normalize(train), l2_normalize(test), ks[-1], chunk_size, num_threads)
    top1_hits = dict.fromkeys(ks, 0)
    top5_hits = {k: 0 for k in ks if k >= 5 and num_classes > 5}
    for start in range(0, test.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        chunk_labels = labels[idx[rows]]
        truth = test_labels[rows]
        for k in ks:
            scores, first_rank = _scores_and_first_rank(
                chunk_labels[:, :k], sims[rows, :k], num_classes, vote, temperature
            )
            top1_hits[k] += int(np.sum(_top1(scores, first_rank) == truth))
            if k in top5_hits:
                top5 = _ranked_classes(scores, first_rank)[:, :5]
                voted = np.take_along_axis(scores, top5, axis=1) > 0
                top5_hits[k] += int(np.sum(np.any((top5 == truth[:, None]) & voted, axis=1)))
    m = test.shape[0]
    result = {f"knn_top1_k{k}": top1_hits[k] / m for k in ks}
    result.update({f"knn_top5_k{k}": hits / m for k, hits in top5_hits.items()})
    return result


# --------------------------------------------------------------------------------------------
# Internals.


@contextlib.contextmanager
def _faiss_threads(num_threads):
    if num_threads is None:
        yield
        return
    num_threads = _check_int(num_threads, "num_threads", minimum=1)
    # The FAISS thread count is process-global, so put it back for other callers.
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _search(train_unit, test_unit, k, chunk_size, num_threads):
    """FAISS search on already-normalised float32 features; see `search_neighbors`."""
    m = test_unit.shape[0]
    sims = np.empty((m, k), dtype=np.float32)
    idx = np.empty((m, k), dtype=np.int64)
    with _faiss_threads(num_threads):
        index = faiss.IndexFlatIP(train_unit.shape[1])
        index.add(train_unit)
        for start in range(0, m, chunk_size):
            chunk_sims, chunk_idx = index.search(test_unit[start : start + chunk_size], k)
            sims[start : start + chunk_size] = chunk_sims
            idx[start : start + chunk_size] = chunk_idx
    # FAISS returns equal similarities in no documented order; fix it to increasing index so
    # that the tie-breaking of the votes is reproducible.
    order = np.lexsort((idx, -sims), axis=-1)
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def _scores_and_first_rank(neighbor_labels, neighbor_sims, num_classes, vote, temperature):
    """Per-class scores (float64 [m, C]) and rank of each class's nearest neighbour (int [m, C]).

    A class with no neighbour gets first rank k, after every real rank.
    """
    m, k = neighbor_labels.shape
    flat = (np.arange(m)[:, None] * num_classes + neighbor_labels).ravel()
    if vote == "majority":
        weights = None
    else:
        weights = np.exp(np.asarray(neighbor_sims, dtype=np.float64) / temperature).ravel()
    # bincount adds the weights of one row in rank order, a deterministic summation order.
    scores = np.bincount(flat, weights=weights, minlength=m * num_classes).astype(np.float64)
    scores = scores.reshape(m, num_classes)
    first_rank = np.full((m, num_classes), k, dtype=np.int64)
    rows = np.arange(m)
    # Writing from the farthest rank to the nearest leaves each class's smallest rank in place.
    for rank in range(k - 1, -1, -1):
        first_rank[rows, neighbor_labels[:, rank]] = rank
    return scores, first_rank


def _top1(scores, first_rank):
    best = scores.max(axis=1, keepdims=True)
    # Among the classes attaining the best score, the one whose nearest neighbour ranks first.
    # Tied winners always have at least one neighbour, so their first ranks are distinct.
    candidates = np.where(scores == best, first_rank, np.iinfo(np.int64).max)
    return np.argmin(candidates, axis=1).astype(np.int64)


def _ranked_classes(scores, first_rank):
    """All classes of each row ordered by score descending, then first rank ascending."""
    return np.lexsort((first_rank, -scores), axis=-1)


def _check_dataset(train_features, train_labels, test_features, num_classes, test_labels=None):
    """Validates the inputs; returns (train, int64 labels, test, num_classes)."""
    train = check_features(train_features, "train_features")
    test = check_features(test_features, "test_features")
    if test.shape[1] != train.shape[1]:
        raise ValueError(
            f"test_features has dimension {test.shape[1]} but train_features has dimension "
            f"{train.shape[1]}"
        )
    named_labels = [("train_labels", np.asarray(train_labels), train.shape[0], "train_features")]
    if test_labels is not None:
        named_labels.append(
            ("test_labels", np.asarray(test_labels), test.shape[0], "test_features")
        )
    for name, labels, rows, features_name in named_labels:
        _check_int_array(labels, name)
        if labels.shape != (rows,):
            raise ValueError(f"{name} has shape {labels.shape} but {features_name} has {rows} rows")
        _check_labels(labels, name, num_classes=None)
    if num_classes is None:
        # Test labels unseen in training still need a score column; they are never predicted.
        num_classes = 1 + max(int(np.max(labels)) for _, labels, _, _ in named_labels)
    num_classes = _check_int(num_classes, "num_classes", minimum=1)
    for name, labels, _, _ in named_labels:
        _check_labels(labels, name, num_classes)
    return train, named_labels[0][1].astype(np.int64, copy=False), test, num_classes


def check_features(x, name):
    """Validates a feature matrix [rows, dims] (2-D, non-empty, real, finite); returns it as an
    array. Raises ValueError naming `name`."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dims], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_int_array(x, name):
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {x.dtype}")


def _check_labels(labels, name, num_classes):
    _check_int_array(labels, name)
    if labels.size == 0:
        return
    low, high = int(np.min(labels)), int(np.max(labels))
    if low < 0:
        raise ValueError(f"{name} must be >= 0, found {low}")
    if num_classes is not None and high >= num_classes:
        raise ValueError(f"{name} contains label {high} but num_classes={num_classes}")


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return int(value)


def _check_k(k, num_train, name="k"):
    k = _check_int(k, name, minimum=1)
    if k > num_train:
        where = "" if name == "k" else f"{name} contains "
        raise ValueError(f"{where}k={k}, which exceeds the {num_train} training features")
    return k


def _check_vote(vote):
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
    return vote


def _check_temperature(temperature, vote, k):
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not np.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    # exp(1 / temperature) summed over k neighbours must stay finite in the float32 scores.
    if vote == "weighted" and 1.0 / temperature + np.log(k) > _FLOAT32_LOG_MAX:
        smallest = 1.0 / (_FLOAT32_LOG_MAX - np.log(k))
        raise ValueError(
            f"temperature={temperature} overflows float32 vote weights exp(1 / temperature) "
            f"for k={k}; use temperature >= {smallest:.4g}"
        )
    return float(temperature)
