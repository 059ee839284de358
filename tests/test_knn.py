"""Tests for kd_keras.eval.knn against an independent NumPy brute-force k-NN."""

import faiss
import numpy as np
import pytest

from kd_keras.eval import knn

NUM_TRAIN, NUM_TEST, DIM, NUM_CLASSES = 300, 100, 64, 7


def _reference(train, train_labels, test, k, vote, num_classes, temperature=0.07):
    """Brute-force k-NN written with plain loops over a full float64 similarity matrix.

    Neighbours are sorted by similarity descending, equal similarities by training index; the
    winning class has the best score and, among equal scores, the nearest neighbour.
    Returns predictions int [M], scores float64 [M, C], first_ranks int [M, C] (rank of each
    class's nearest neighbour, k if none) and similarities sorted descending float64 [M, N].
    """
    train = np.asarray(train, np.float64)
    test = np.asarray(test, np.float64)
    train_unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    test_unit = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test_unit @ train_unit.T
    predictions = np.empty(len(test), np.int64)
    scores = np.zeros((len(test), num_classes))
    first_ranks = np.full((len(test), num_classes), k)
    sorted_sims = np.empty_like(sims)
    for row in range(len(test)):
        order = np.argsort(-sims[row], kind="stable")
        sorted_sims[row] = sims[row, order]
        first_rank = {}
        for rank, j in enumerate(order[:k]):
            label = int(train_labels[j])
            weight = 1.0 if vote == "majority" else np.exp(sims[row, j] / temperature)
            scores[row, label] += weight
            first_rank.setdefault(label, rank)
        best = scores[row].max()
        tied = [c for c in first_rank if scores[row, c] == best]
        predictions[row] = min(tied, key=first_rank.__getitem__)
        for label, rank in first_rank.items():
            first_ranks[row, label] = rank
    return predictions, scores, first_ranks, sorted_sims


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    train = rng.normal(size=(NUM_TRAIN, DIM)).astype(np.float32)
    test = rng.normal(size=(NUM_TEST, DIM)).astype(np.float32)
    train_labels = rng.integers(0, NUM_CLASSES, NUM_TRAIN)
    test_labels = rng.integers(0, NUM_CLASSES, NUM_TEST)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("vote", ["majority", "weighted"])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_bruteforce_reference(data, vote, k):
    train, train_labels, test, _ = data
    want, want_scores, _, sorted_sims = _reference(train, train_labels, test, k, vote, NUM_CLASSES)
    # FAISS's float32 similarities differ from the float64 reference by ~1e-7; agreement label
    # for label is only guaranteed if no two similarities within the top k+1 are that close
    # (the smallest gap for this seed is ~2e-6).
    assert np.min(-np.diff(sorted_sims[:, : k + 1], axis=1), initial=1.0) > 1e-6
    got, scores = knn.knn_classify(
        train, train_labels, test, k=k, vote=vote, num_classes=NUM_CLASSES, return_scores=True
    )
    assert got.dtype == np.int64 and got.shape == (NUM_TEST,)
    assert scores.dtype == np.float32 and scores.shape == (NUM_TEST, NUM_CLASSES)
    np.testing.assert_array_equal(got, want)
    if vote == "majority":
        np.testing.assert_array_equal(scores, want_scores)
    else:
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4)
    # Majority votes with k=20 over 7 classes must actually exercise the tie-break.
    if vote == "majority" and k == 20:
        top = np.sort(want_scores, axis=1)
        assert np.any(top[:, -1] == top[:, -2])


def test_majority_tie_break_prefers_nearest_neighbour_among_tied_classes():
    # Training points on the unit circle at increasing angle from the test point (1, 0), so the
    # neighbour ranks follow the list order.
    angles = np.deg2rad([5.0, 10.0, 15.0, 20.0, 25.0, 30.0])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    test = np.array([[1.0, 0.0]])

    def predict(labels, k):
        return int(knn.knn_classify(train, np.array(labels), test, k=k, num_classes=3)[0])

    # One vote each: the nearest neighbour's class wins, not the lowest class index.
    assert predict([1, 0, 0, 0, 0, 0], k=2) == 1
    assert predict([0, 1, 1, 1, 1, 1], k=2) == 0
    # 2-2 tie between classes 0 and 1; class 1 is nearer.
    assert predict([1, 0, 0, 1, 2, 2], k=4) == 1
    # Classes 0 and 1 tie with 2 votes; class 2 holds the nearest neighbour but is not tied, so
    # the winner is the tied class seen first (class 1 at rank 1).
    assert predict([2, 1, 0, 0, 1, 2], k=5) == 1
    # Without a tie the count decides, whatever the nearest neighbour is.
    assert predict([2, 0, 1, 1, 1, 0], k=5) == 1


def test_weighted_vote_by_hand():
    angles = np.deg2rad([0.0, 30.0, 60.0])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 1, 1])
    temperature = 0.5
    predictions, scores = knn.knn_classify(
        train,
        labels,
        np.array([[1.0, 0.0]]),
        k=3,
        vote="weighted",
        temperature=temperature,
        return_scores=True,
    )
    cosines = np.cos(angles)
    want = [np.exp(cosines[0] / temperature), np.exp(cosines[1:] / temperature).sum()]
    np.testing.assert_allclose(scores[0], want, rtol=1e-6)
    # Two moderately close class-1 neighbours outweigh one exact class-0 match at this temperature.
    assert want[1] > want[0] and predictions[0] == 1
    # A sharper temperature makes the exact match dominate.
    sharp = knn.knn_classify(
        train, labels, np.array([[1.0, 0.0]]), k=3, vote="weighted", temperature=0.07
    )
    assert sharp[0] == 0


def test_equal_similarities_ordered_by_training_index():
    train = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    labels = np.array([0, 2, 1, 0])
    sims, idx = knn.search_neighbors(train, np.array([[1.0, 0.0]]), k=3)
    np.testing.assert_array_equal(idx, [[1, 2, 3]])
    np.testing.assert_allclose(sims, [[1.0, 1.0, 1.0]], rtol=1e-6)
    # All three tie at one vote; rank 0 (training index 1) carries label 2.
    assert knn.knn_classify(train, labels, np.array([[1.0, 0.0]]), k=3)[0] == 2


@pytest.mark.parametrize("vote", ["majority", "weighted"])
def test_separated_clusters_are_classified_perfectly(vote):
    rng = np.random.default_rng(7)
    num_classes, dim = 8, 16
    centres = 10.0 * np.eye(num_classes, dim)
    train_labels = np.repeat(np.arange(num_classes), 20)
    test_labels = np.repeat(np.arange(num_classes), 5)
    train = centres[train_labels] + rng.normal(size=(len(train_labels), dim))
    test = centres[test_labels] + rng.normal(size=(len(test_labels), dim))
    result = knn.knn_accuracy(train, train_labels, test, test_labels, ks=(1, 5, 20), vote=vote)
    assert result == {
        "knn_top1_k1": 1.0,
        "knn_top1_k5": 1.0,
        "knn_top1_k20": 1.0,
        "knn_top5_k5": 1.0,
        "knn_top5_k20": 1.0,
    }


@pytest.mark.parametrize("vote", ["majority", "weighted"])
def test_chunked_search_equals_unchunked(data, vote):
    train, train_labels, test, _ = data
    whole, whole_scores = knn.knn_classify(
        train, train_labels, test, k=20, vote=vote, return_scores=True, chunk_size=4096
    )
    chunked, chunked_scores = knn.knn_classify(
        train, train_labels, test, k=20, vote=vote, return_scores=True, chunk_size=7
    )
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_allclose(chunked_scores, whole_scores, rtol=1e-5)
    sims_whole, idx_whole = knn.search_neighbors(train, test, k=20, chunk_size=4096)
    sims_chunked, idx_chunked = knn.search_neighbors(train, test, k=20, chunk_size=7)
    np.testing.assert_array_equal(idx_chunked, idx_whole)
    np.testing.assert_allclose(sims_chunked, sims_whole, atol=1e-6)


def test_k1_returns_label_of_nearest_neighbour(data):
    train, train_labels, test, _ = data
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    nearest = np.argmax(unit(test.astype(np.float64)) @ unit(train.astype(np.float64)).T, axis=1)
    for vote in knn.VOTES:
        got = knn.knn_classify(train, train_labels, test, k=1, vote=vote)
        np.testing.assert_array_equal(got, train_labels[nearest])


def test_invariant_to_positive_row_scaling(data):
    train, train_labels, test, _ = data
    rng = np.random.default_rng(5)
    train_scaled = train * rng.uniform(0.01, 100.0, size=(NUM_TRAIN, 1))
    test_scaled = test * rng.uniform(0.01, 100.0, size=(NUM_TEST, 1))
    for vote in knn.VOTES:
        original = knn.knn_classify(train, train_labels, test, k=20, vote=vote)
        scaled = knn.knn_classify(train_scaled, train_labels, test_scaled, k=20, vote=vote)
        np.testing.assert_array_equal(scaled, original)


@pytest.mark.parametrize("vote", ["majority", "weighted"])
def test_accuracy_matches_classify_and_reference_top5(data, vote):
    train, train_labels, test, test_labels = data
    result = knn.knn_accuracy(train, train_labels, test, test_labels, ks=(20, 1, 5), vote=vote)
    assert set(result) == {
        "knn_top1_k1",
        "knn_top1_k5",
        "knn_top1_k20",
        "knn_top5_k5",
        "knn_top5_k20",
    }
    for k in (1, 5, 20):
        predictions = knn.knn_classify(train, train_labels, test, k=k, vote=vote)
        assert result[f"knn_top1_k{k}"] == pytest.approx(np.mean(predictions == test_labels))
    for k in (5, 20):
        _, scores, first_ranks, _ = _reference(train, train_labels, test, k, vote, NUM_CLASSES)
        hits = []
        for row in range(NUM_TEST):
            # Classes by score descending, equal scores by nearest neighbour; only voted ones.
            ranked = sorted(
                range(NUM_CLASSES), key=lambda c: (-scores[row, c], first_ranks[row, c])
            )
            hits.append(test_labels[row] in [c for c in ranked[:5] if scores[row, c] > 0])
        want = np.mean(hits)
        assert result[f"knn_top5_k{k}"] == pytest.approx(want)
        assert result[f"knn_top5_k{k}"] >= result[f"knn_top1_k{k}"]
    # Random labels: top-5 over 7 classes must be clearly above top-1.
    assert result["knn_top5_k20"] > result["knn_top1_k20"]


def test_accuracy_omits_top5_when_meaningless():
    rng = np.random.default_rng(3)
    train, test = rng.normal(size=(30, 4)), rng.normal(size=(6, 4))
    # Exactly 5 classes: top-5 would always be 1.
    five = knn.knn_accuracy(train, np.arange(30) % 5, test, np.arange(6) % 5, ks=(1, 20))
    assert set(five) == {"knn_top1_k1", "knn_top1_k20"}
    # k < 5 cannot give five voted classes.
    many = knn.knn_accuracy(train, np.arange(30) % 10, test, np.arange(6), ks=(4,))
    assert set(many) == {"knn_top1_k4"}


def test_accuracy_counts_test_labels_unseen_in_training():
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    test = np.array([[1.0, 0.1], [0.1, 1.0]])
    # Label 3 never appears in training, so that row is always wrong.
    result = knn.knn_accuracy(train, np.array([0, 1]), test, np.array([0, 3]), ks=(1,))
    assert result == {"knn_top1_k1": 0.5}


def test_num_threads_is_restored(data):
    train, train_labels, test, _ = data
    before = faiss.omp_get_max_threads()
    knn.knn_classify(train, train_labels, test, k=5, num_threads=1)
    assert faiss.omp_get_max_threads() == before


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e30, -1e30], [-2e-30, 0.0]])
    got = knn.l2_normalize(x)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    s = np.sqrt(0.5)
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [s, -s], [-1.0, 0.0]], rtol=1e-6)


N_BAD = 50


def _good():
    rng = np.random.default_rng(0)
    return {
        "train_features": rng.normal(size=(N_BAD, 8)),
        "train_labels": rng.integers(0, 3, N_BAD),
        "test_features": rng.normal(size=(10, 8)),
    }


def _with(**changes):
    kwargs = _good()
    kwargs.update(changes)
    return kwargs


BAD_CLASSIFY = [
    (_with(k=0), "k"),
    (_with(k=N_BAD + 1), "k=51, which exceeds the 50 training features"),
    (_with(k=2.5), "k"),
    (_with(test_features=np.ones((10, 9))), "test_features"),
    (_with(train_labels=np.zeros(N_BAD - 1, np.int64)), "train_labels"),
    (_with(train_labels=np.zeros(N_BAD)), "train_labels"),
    (_with(train_labels=-np.ones(N_BAD, np.int64)), "train_labels"),
    (_with(train_features=np.full((N_BAD, 8), np.nan)), "train_features"),
    (_with(test_features=np.full((10, 8), np.inf)), "test_features"),
    (_with(train_features=np.zeros((0, 8)), train_labels=np.zeros(0, np.int64)), "train_features"),
    (_with(test_features=np.zeros((0, 8))), "test_features"),
    (_with(test_features=np.zeros(8)), "test_features"),
    (_with(vote="plurality"), "vote"),
    (_with(num_classes=2, train_labels=np.full(N_BAD, 2)), "num_classes"),
    (_with(temperature=0.0), "temperature"),
    (_with(vote="weighted", temperature=1e-3), "temperature"),
    (_with(chunk_size=0), "chunk_size"),
    (_with(num_threads=0), "num_threads"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CLASSIFY)
def test_classify_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        knn.knn_classify(**kwargs)


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"test_labels": np.zeros(9, np.int64)}, "test_labels"),
        ({"test_labels": np.zeros(10, np.int64), "ks": ()}, "ks"),
        ({"test_labels": np.zeros(10, np.int64), "ks": (1, N_BAD + 1)}, "ks contains k=51"),
        ({"test_labels": np.zeros(10, np.int64), "ks": 5}, "ks"),
        ({"test_labels": np.zeros(10, np.int64), "vote": "soft"}, "vote"),
    ],
)
def test_accuracy_rejects_bad_input(extra, message):
    with pytest.raises(ValueError, match=message):
        knn.knn_accuracy(**_good(), **extra)
