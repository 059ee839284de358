"""Transfer protocol (SimReg B.4): grid search + refit on arrays, splits, folder data, errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.linear_model import LogisticRegression

from kd_keras.eval import transfer

COLOURS = {"blue": (0, 0, 220), "green": (0, 200, 0), "red": (230, 0, 0)}


def _blobs(n_per_class, num_classes=3, dim=5, spread=1.6, seed=0):
    """Overlapping Gaussian blobs: a problem where the weight decay changes the answer."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 1.5
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


def test_grid_is_simreg_b4s_and_c_is_one_over_lambda_n():
    np.testing.assert_allclose(transfer.B4_WEIGHT_DECAYS, [10.0**e for e in range(-10, -1)])
    rates = np.array(transfer.B4_LEARNING_RATES)
    assert len(rates) == 10
    np.testing.assert_allclose(rates[[0, -1]], [1e-3, 1.0])
    np.testing.assert_allclose(np.diff(np.log10(rates)), 1 / 3)
    assert transfer.weight_decay_to_c(1e-4, 500) == pytest.approx(1 / (1e-4 * 500))


def test_fit_minimises_mean_cross_entropy_plus_half_lambda_w_squared():
    """At the fitted weights the gradient of CE_mean + lambda/2 ||W||^2 vanishes (NumPy)."""
    x, y = _blobs(40)
    x = x.astype(np.float64)
    weight_decay = 0.05
    settings = transfer.TransferSettings(max_iter=5000, tol=1e-10)
    model, _, converged = transfer.fit_logistic(x, y, weight_decay, settings)
    assert converged
    w, b = model.coef_, model.intercept_  # [K, D], [K]
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = (p - np.eye(3)[y]) / len(y)
    grad_w = residual.T @ x + weight_decay * w
    grad_b = residual.sum(0)  # the bias is not penalised
    assert np.abs(grad_w).max() < 1e-6
    assert np.abs(grad_b).max() < 1e-6
    # With lambda twice as large the same weights are not a minimum.
    assert np.abs(residual.T @ x + 2 * weight_decay * w).max() > 1e-3


def test_grid_search_and_refit_equal_a_hand_written_sklearn_loop():
    x_tr, y_tr = _blobs(30, seed=1)
    x_va, y_va = _blobs(15, seed=2)
    x_te, y_te = _blobs(20, seed=3)
    decays = (1e-6, 1e-3, 1e-1, 1.0, 10.0)
    settings = transfer.TransferSettings(weight_decays=decays, max_iter=500)
    got = transfer.transfer_linear_eval(x_tr, y_tr, x_va, y_va, x_te, y_te, 3, settings)

    accs = []
    for lam in decays:
        clf = LogisticRegression(C=1 / (lam * len(y_tr)), max_iter=500).fit(x_tr, y_tr)
        accs.append(np.mean(clf.predict(x_va) == y_va))
    best_acc = max(accs)
    best = max(lam for lam, a in zip(decays, accs, strict=True) if a == best_acc)
    n_all = len(y_tr) + len(y_va)
    refit = LogisticRegression(C=1 / (best * n_all), max_iter=500).fit(
        np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
    )
    assert [r["val_top1"] for r in got["grid"]] == pytest.approx(accs)
    assert len(set(accs)) > 1  # the grid matters on this problem
    assert got["best_weight_decay"] == best
    assert got["best_C"] == pytest.approx(1 / (best * n_all))
    assert got["top1"] == pytest.approx(np.mean(refit.predict(x_te) == y_te))
    assert got["top5"] is None  # 3 classes
    assert (got["num_train"], got["num_val"], got["num_test"]) == (90, 45, 60)


def test_ties_go_to_the_larger_weight_decay_and_binary_scores_rank_both_classes():
    x, y = _blobs(20, num_classes=2, spread=0.05)  # separable: every lambda is perfect
    settings = transfer.TransferSettings(weight_decays=(1e-8, 1e-4, 1e-2), max_iter=100)
    best, rows = transfer.grid_search(x, y, x, y, settings)
    assert [r["val_top1"] for r in rows] == [1.0, 1.0, 1.0]
    assert best == 1e-2
    model, _, _ = transfer.fit_logistic(x, y, best, settings)
    scores = transfer.class_scores(model, x, 4)  # classes 2, 3 never seen
    assert np.all(np.isneginf(scores[:, 2:]))
    assert transfer.top_k_accuracy(scores, y, 1) == 1.0


def test_stratified_split_is_seeded_disjoint_and_keeps_every_class():
    labels = np.repeat([0, 1, 2], [10, 20, 30])
    tr, va = transfer.stratified_split(labels, 0.2, seed=3)
    tr2, va2 = transfer.stratified_split(labels, 0.2, seed=3)
    _, va_other = transfer.stratified_split(labels, 0.2, seed=4)
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(va, va_other)
    assert len(va) == 12 and len(tr) == 48
    assert np.intersect1d(tr, va).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(60))
    np.testing.assert_array_equal(np.bincount(labels[va]), [2, 4, 6])


@pytest.mark.parametrize(
    "labels, fraction, match",
    [
        ([0, 0, 1], 0.5, "class 1 has a single training example"),
        ([0, 0, 1, 1], 1.0, "must be in"),
        ([0, 0, 1, 1, 2, 2, 0, 1, 2, 0], 0.1, "at least one per class"),
    ],
)
def test_stratified_split_errors_name_the_flag(labels, fraction, match):
    with pytest.raises(transfer.TransferError, match=match) as err:
        transfer.stratified_split(np.array(labels), fraction, seed=0)
    assert str(err.value).startswith("--transfer_val_fraction")


def test_label_checks_name_the_flag():
    with pytest.raises(transfer.TransferError, match=r"--transfer_test_split: .*single class"):
        transfer.check_split_labels(np.zeros(4, int), "--transfer_test_split", "test", ("cat",))
    with pytest.raises(transfer.TransferError, match=r"--transfer_val_split: .*\(dog\)"):
        transfer.check_classes_seen(
            np.array([0, 1]), np.array([0, 0]), "--transfer_val_split", "val", ("cat", "dog")
        )


# --------------------------------------------------------------------------------------------
# On an image folder.


def _write_folder(root, splits, size=12, seed=0):
    """root/<split>/<colour>/*.{png,jpg}: images of one colour plus noise per class."""
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for name, count in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.array(COLOURS[name], float) + rng.normal(0, 20, (size, size + 3, 3))
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return str(root)


def _mean_colour(images):
    """A fixed 'network': images [B, S, S, 3] -> mean colour [B, 3]."""
    assert images.shape[1:] == (8, 8, 3)
    return tf.reduce_mean(images, axis=[1, 2])


def _all(count):
    return dict.fromkeys(COLOURS, count)


def test_folder_with_own_val_split_is_read_searched_and_scored(tmp_path):
    root = _write_folder(tmp_path / "d", {"train": _all(6), "val": _all(2), "test": _all(3)})
    cfg = transfer.TransferData(source=root)
    settings = transfer.TransferSettings(weight_decays=(1e-4, 1e-2))
    assert transfer.own_val_split(root, None, "test") == "val"
    result = transfer.run_transfer(_mean_colour, 8, cfg, settings, batch_size=4)
    assert result["val_split"] == "split 'val'"
    assert (result["num_train"], result["num_val"], result["num_test"]) == (18, 6, 9)
    assert result["num_classes"] == 3 and result["feature_dim"] == 3
    assert result["top1"] == 1.0
    assert len(result["grid"]) == 2


def test_folder_without_val_split_holds_out_a_seeded_stratified_part_of_train(tmp_path):
    # Imagenette's layout: train and val only, val used as the test split.
    root = _write_folder(tmp_path / "d", {"train": _all(5), "val": _all(2)})
    assert transfer.own_val_split(root, None, "val") is None
    cfg = transfer.TransferData(source=f"folder:{root}", test_split="val", val_fraction=0.4)
    result = transfer.run_transfer(_mean_colour, 8, cfg, batch_size=8)
    assert result["val_split"] == "stratified 0.4 of 'train'"
    assert (result["num_train"], result["num_val"], result["num_test"]) == (9, 6, 6)
    assert result["val_seed"] == 0
    assert len(result["grid"]) == 9
    capped = transfer.run_transfer(
        _mean_colour, 8, transfer.TransferData(**{**cfg.__dict__, "max_examples": 10}), batch_size=8
    )
    assert capped["num_train"] + capped["num_val"] == 8  # every 2nd of 15
    assert capped["num_test"] == 6


def test_folder_errors_name_the_flag(tmp_path):
    settings = transfer.TransferSettings(weight_decays=(1e-2,))
    with pytest.raises(transfer.TransferError, match="^--transfer_data: .* is not a directory"):
        transfer.run_transfer(_mean_colour, 8, transfer.TransferData(str(tmp_path / "no")))
    extra = _write_folder(tmp_path / "extra", {"train": {"red": 3, "blue": 3}, "test": _all(2)})
    with pytest.raises(transfer.TransferError, match="^--transfer_test_split=test .* not a class"):
        transfer.run_transfer(_mean_colour, 8, transfer.TransferData(extra), settings)
    one = _write_folder(tmp_path / "one", {"train": _all(4), "test": {"red": 3}})
    with pytest.raises(transfer.TransferError, match="^--transfer_test_split: .*single class"):
        transfer.run_transfer(_mean_colour, 8, transfer.TransferData(one), settings)
    missing = _write_folder(tmp_path / "missing", {"train": _all(4)})
    with pytest.raises(transfer.TransferError, match="^--transfer_test_split=test of"):
        transfer.run_transfer(_mean_colour, 8, transfer.TransferData(missing), settings)
    assert os.path.isdir(missing)


# --------------------------------------------------------------------------------------------
# Flags.


def _evaluate_config(argv):
    from kd_keras import config

    config.define_evaluate_flags()
    config.FLAGS.unparse_flags()
    config.FLAGS(["prog", "--model=/m", *argv])
    try:
        return config.evaluate_config_from_flags(config.FLAGS)
    finally:
        config.FLAGS.unparse_flags()


def test_flags_default_to_b4_and_are_validated():
    cfg = _evaluate_config(["--protocols=transfer", "--transfer_data=digits"])
    assert cfg.transfer_weight_decays == transfer.B4_WEIGHT_DECAYS
    assert (cfg.transfer_train_split, cfg.transfer_val_split, cfg.transfer_test_split) == (
        "train",
        transfer.VAL_AUTO,
        "test",
    )
    assert cfg.transfer_max_iter == transfer.DEFAULT_MAX_ITER
    assert cfg.transfer_val_fraction == transfer.DEFAULT_VAL_FRACTION
    bad = {
        "--transfer_data is required": ["--protocols=transfer"],
        "--transfer_weight_decays must be positive": ["--transfer_weight_decays=1e-3,0"],
        "--transfer_weight_decays must be a list": ["--transfer_weight_decays=1e-3,x"],
        "--transfer_val_fraction must be in": ["--transfer_val_fraction=1"],
        "--transfer_max_iter must be positive": ["--transfer_max_iter=0"],
        "--transfer_blas_threads must be >= 0": ["--transfer_blas_threads=-1"],
        "--transfer_test_split=train is the training split": ["--transfer_test_split=train"],
        "--transfer_val_split=test is also": ["--transfer_val_split=test"],
    }
    for message, argv in bad.items():
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            _evaluate_config(argv)


# --------------------------------------------------------------------------------------------
# End to end: python -m kd_keras.evaluate --protocols=transfer on a tiny export.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "kd_keras.evaluate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_transfer_on_an_export_matches_sklearn_on_its_features(tmp_path):
    import keras

    from kd_keras.artifacts import export
    from kd_keras.data import augment
    from kd_keras.data import sources as data
    from kd_keras.eval import features
    from kd_keras.nets import backbones

    keras.utils.set_random_seed(5)
    backbone = backbones.build_backbone("convnet_tiny", 8)
    export_dir = str(tmp_path / "export")
    export.export_backbone(backbone, export_dir)
    root = _write_folder(tmp_path / "d", {"train": _all(6), "val": _all(2), "test": _all(4)})
    out = tmp_path / "eval"
    decays = (1e-4, 1e-1)
    ok = _cli(
        f"--model={export_dir}",
        "--protocols=transfer",
        f"--transfer_data={root}",
        f"--transfer_weight_decays={','.join(map(str, decays))}",
        f"--eval_dir={out}",
        "--projector_examples=0",
    )
    assert ok.returncode == 0, ok.stderr
    results = json.loads((out / "results.json").read_text())
    (rec,) = [r for r in results["results"] if r["protocol"] == "transfer"]
    assert rec["metric"] == "top1" and rec["dataset"] == root
    assert re.search(r"transfer .* top1 +\d\.\d{4}  18\+6/12", ok.stdout), ok.stdout

    # The same number from the backbone's features and a plain scikit-learn loop.
    def split(name):
        examples, _ = data.load_split(root, name)
        ds = data.make_eval_dataset(examples, lambda im: augment.center_crop(im, 8), 64)
        return features.extract_features(backbone, ds)

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = split("train"), split("val"), split("test")
    accs = [
        np.mean(
            LogisticRegression(C=1 / (lam * len(y_tr)), max_iter=1000).fit(x_tr, y_tr).predict(x_va)
            == y_va
        )
        for lam in decays
    ]
    best = max(lam for lam, a in zip(decays, accs, strict=True) if a == max(accs))
    refit = LogisticRegression(C=1 / (best * 24), max_iter=1000).fit(
        np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
    )
    assert results["transfer"]["best_weight_decay"] == best
    assert rec["value"] == pytest.approx(np.mean(refit.predict(x_te) == y_te), abs=1e-9)

    # Bad --transfer_data: an EvaluationError, which the CLI prints as one line, exit code 2.
    from kd_keras import config
    from kd_keras.eval import EvaluationError
    from kd_keras.eval import evaluation as evaluate

    cfg = config.EvaluateConfig(
        model=export_dir,
        protocols=("transfer",),
        transfer_data=str(tmp_path / "nowhere"),
        eval_dir=str(tmp_path / "eval_bad"),
        projector_examples=0,
    )
    with pytest.raises(EvaluationError, match="^--transfer_data: .*nowhere is not a directory"):
        evaluate.evaluate(evaluate.LoadedModel.from_keras(backbone), cfg)


def test_own_val_split_of_a_tfds_dataset_is_never_the_test_split(monkeypatch):
    import types

    import tensorflow_datasets as tfds

    def builder(name, data_dir=None):
        splits = {"dtd": ("train", "validation", "test"), "cifar10": ("train", "test")}[name]
        return types.SimpleNamespace(info=types.SimpleNamespace(splits=dict.fromkeys(splits)))

    monkeypatch.setattr(tfds, "builder", builder)
    assert transfer.own_val_split("tfds:dtd", None, "test") == "validation"
    assert transfer.own_val_split("tfds:dtd", None, "validation") is None
    assert transfer.own_val_split("tfds:dtd", None, "val") is None  # an alias of validation
    assert transfer.own_val_split("tfds:cifar10", None, "test") is None
    assert transfer.own_val_split("digits", None, "test") is None
