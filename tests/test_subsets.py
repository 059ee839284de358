"""Class-balanced label subsets and their JSON files."""

import json
import os

import numpy as np
import pytest

from kd_keras.eval import subsets


def _labels():
    # Unbalanced classes of 200, 51, 25, 7 and 1 examples in a shuffled order; class 3 absent.
    counts = {0: 200, 1: 51, 2: 25, 4: 7, 5: 1}
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(0).permutation(labels).astype(np.int64), counts


def _counts(labels, indices):
    classes, found = np.unique(labels[indices], return_counts=True)
    return dict(zip(classes.tolist(), found.tolist(), strict=True))


@pytest.mark.parametrize(
    "fraction, expected",
    [
        # f * count rounded half up, at least 1: 0.1*25 = 2.5 -> 3, 0.1*7 = 0.7 -> 1, 0.1*1 -> 1.
        (0.1, {0: 20, 1: 5, 2: 3, 4: 1, 5: 1}),
        # 0.01*200 = 2, 0.01*51 = 0.51 -> 1; every smaller class keeps its one example.
        (0.01, {0: 2, 1: 1, 2: 1, 4: 1, 5: 1}),
        (0.5, {0: 100, 1: 26, 2: 13, 4: 4, 5: 1}),
    ],
)
def test_per_class_counts(fraction, expected):
    labels, _ = _labels()
    indices = subsets.label_subset(labels, fraction, seed=3)
    assert _counts(labels, indices) == expected
    assert indices.dtype == np.int64
    assert np.all(np.diff(indices) > 0)  # sorted and unique
    assert indices.min() >= 0 and indices.max() < len(labels)


def test_deterministic_in_seed():
    labels, _ = _labels()
    a = subsets.label_subset(labels, 0.1, seed=5)
    np.testing.assert_array_equal(a, subsets.label_subset(labels, 0.1, seed=5))
    b = subsets.label_subset(labels, 0.1, seed=6)
    assert not np.array_equal(a, b)
    assert _counts(labels, a) == _counts(labels, b)


def test_fraction_one_returns_everything_and_subsets_are_nested():
    labels, _ = _labels()
    np.testing.assert_array_equal(subsets.label_subset(labels, 1.0), np.arange(len(labels)))
    small = subsets.label_subset(labels, 0.01, seed=2)
    large = subsets.label_subset(labels, 0.1, seed=2)
    assert set(small) <= set(large)


def test_class_choice_ignores_other_classes():
    labels, _ = _labels()
    chosen = subsets.label_subset(labels, 0.1, seed=1)
    # Dropping class 1 from the dataset leaves the rows chosen for class 0 unchanged.
    keep = np.flatnonzero(labels != 1)
    sub_chosen = keep[subsets.label_subset(labels[keep], 0.1, seed=1)]
    np.testing.assert_array_equal(chosen[labels[chosen] == 0], sub_chosen[labels[sub_chosen] == 0])


def test_save_load_round_trip(tmp_path):
    labels, _ = _labels()
    indices = subsets.label_subset(labels, 0.1, seed=4)
    path = str(tmp_path / "subset_10pct.json")
    subsets.save_subset(path, indices, labels, 0.1, 4)
    assert os.listdir(tmp_path) == ["subset_10pct.json"]  # no temporary file left behind
    with open(path) as f:
        record = json.load(f)
    assert record["per_class_counts"] == {"0": 20, "1": 5, "2": 3, "4": 1, "5": 1}
    assert record["num_examples"] == len(indices) == 30
    loaded = subsets.load_subset(path, labels=labels)
    np.testing.assert_array_equal(loaded.indices, indices)
    assert loaded.indices.dtype == np.int64
    assert (loaded.fraction, loaded.seed, loaded.num_examples) == (0.1, 4, 30)
    assert loaded.dataset_size == len(labels)
    assert loaded.per_class_counts == {0: 20, 1: 5, 2: 3, 4: 1, 5: 1}


def test_load_rejects_bad_files(tmp_path):
    labels, _ = _labels()
    indices = subsets.label_subset(labels, 0.1, seed=0)
    path = str(tmp_path / "s.json")
    subsets.save_subset(path, indices, labels, 0.1, 0)
    with open(path) as f:
        good = json.load(f)

    def write(**changes):
        bad = {**good, **changes}
        bad_path = str(tmp_path / "bad.json")
        with open(bad_path, "w") as f:
            json.dump(bad, f)
        return bad_path

    with pytest.raises(ValueError, match="num_examples"):
        subsets.load_subset(write(num_examples=29))
    with pytest.raises(ValueError, match="indices must be sorted"):
        subsets.load_subset(write(indices=good["indices"][::-1]))
    with pytest.raises(ValueError, match="indices must lie in"):
        subsets.load_subset(write(dataset_size=5))
    with pytest.raises(ValueError, match="fraction"):
        subsets.load_subset(write(fraction=1.5))
    with pytest.raises(ValueError, match="per_class_counts sum"):
        subsets.load_subset(write(per_class_counts={"0": 1}))
    with pytest.raises(ValueError, match="not a kd_keras label subset"):
        subsets.load_subset(write(format="other"))
    with pytest.raises(ValueError, match="labels has 10 entries"):
        subsets.load_subset(path, labels=np.zeros(10, np.int64))
    with pytest.raises(ValueError, match="labels do not match"):
        subsets.load_subset(path, labels=np.roll(labels, 1))


def test_bad_input_names_the_argument(tmp_path):
    labels, _ = _labels()
    for fraction in (0.0, -0.1, 1.01, float("nan"), True):
        with pytest.raises(ValueError, match="fraction"):
            subsets.label_subset(labels, fraction)
    with pytest.raises(ValueError, match="labels must be a 1-D"):
        subsets.label_subset(labels.reshape(4, -1), 0.1)
    with pytest.raises(ValueError, match="labels is empty"):
        subsets.label_subset(np.array([], np.int64), 0.1)
    with pytest.raises(ValueError, match="labels must hold integers"):
        subsets.label_subset(labels.astype(np.float32), 0.1)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        subsets.label_subset(labels - 1, 0.1)
    with pytest.raises(ValueError, match="seed"):
        subsets.label_subset(labels, 0.1, seed=-1)
    path = str(tmp_path / "s.json")
    with pytest.raises(ValueError, match="indices must be sorted"):
        subsets.save_subset(path, [3, 3], labels, 0.1, 0)
    with pytest.raises(ValueError, match="indices must lie in"):
        subsets.save_subset(path, [len(labels)], labels, 0.1, 0)
    assert not os.path.exists(path)
