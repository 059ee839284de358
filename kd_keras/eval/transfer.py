"""Transfer evaluation: a logistic-regression classifier on frozen features of another dataset.

SimReg (Navaneet et al.) appendix B.4 evaluates transfer by training a linear classifier on the
frozen features of other datasets: images resized so that the shorter side is 256, centre
crop 224, channel-normalised as the network expects; an L-BFGS softmax classifier whose
learning rate (10 log-spaced values in [1e-3, 1]) and weight decay (9 log-spaced values in
[1e-10, 1e-2]) are chosen on a validation split; the best setting is refit on train + val and
scored (top-1) on the test split. OSS Table 11 reports the same kind of number.

What this module does, in scikit-learn's terms:

* The classifier is `sklearn.linear_model.LogisticRegression(solver="lbfgs")`, a
  multinomial logistic regression with an unpenalised bias.
* Weight decay lambda in the sense of PyTorch's optimisers (gradient + lambda * W, i.e. the
  objective mean cross-entropy + lambda / 2 * ||W||^2) is scikit-learn's
  C = 1 / (lambda * n) for n training examples: scikit-learn minimises
  C * sum cross-entropy + 1/2 * ||W||^2, which is that objective times C * n. The refit on
  train + val keeps lambda and recomputes C with the larger n, so it solves the same
  per-example problem as the search.
* The learning-rate axis has no counterpart: scikit-learn's L-BFGS picks its steps by a
  line search and runs until the gradient is below `tol` or `max_iter` iterations are done.
  In the reference (PyTorch's LBFGS, max_iter=20, history_size=10, a fixed step size) the
  learning rate only decides how far from the optimum of that same objective the optimiser
  stops; here every weight decay is solved (close to) exactly, so the grid is the 9 weight
  decays, and how many fits stopped at `max_iter` is reported.

Ties in validation accuracy go to the larger weight decay (the simpler classifier). Every fit
is deterministic (L-BFGS has no randomness); the seed only draws the validation split when the
dataset has none of its own (a stratified split of train, `stratified_split`).

The pure part (grid search, refit, split, label checks) works on NumPy arrays; `run_transfer`
loads the splits (`kd_keras.data.sources.load_split`: an image folder root/<split>/<class>/*.jpg, a
prepared TFDS dataset or digits), extracts every split's features once and calls it.

Memory: the features of all splits as float32, 4 * D * (N_train + N_val + N_test) bytes, plus
one concatenated copy of train + val for the refit; `max_examples` bounds each split (every
n-th example, so every class stays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings

import numpy as np

from kd_keras.eval import EvaluationError

# SimReg B.4's grid. The learning rates are those of the reference's PyTorch L-BFGS; they are
# recorded for the record, not searched (see the module docstring).
B4_WEIGHT_DECAYS = tuple(10.0**e for e in range(-10, -1))  # logspace(-10, -2, 9), exact
B4_LEARNING_RATES = tuple(float(v) for v in np.logspace(-3, 0, 10))
DEFAULT_MAX_ITER = 1000
DEFAULT_TOL = 1e-4
DEFAULT_VAL_FRACTION = 0.2
# One BLAS thread by default: the fits multiply [N, D] by [D, K] matrices that are small for
# transfer datasets of a few thousand images, where OpenBLAS' threads cost more than they
# bring, by far on a busy machine (docs/transfer.md has the measurement). 0 = all cores.
DEFAULT_BLAS_THREADS = 1
LR_AXIS = (
    "none: scikit-learn's L-BFGS chooses its steps by line search and runs each fit to tol "
    "or max_iter, so only B.4's weight decays are searched"
)
VAL_AUTO = "auto"  # the dataset's own val split when it has one, otherwise a split of train
VAL_FROM_TRAIN = "from_train"  # always a seeded stratified split of train


class TransferError(EvaluationError):
    """Bad input to the transfer protocol (one line, naming the flag)."""


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    """The classifier's search space and stopping rule.

    Attributes:
      weight_decays: lambda values searched (default B.4's 9 values in [1e-10, 1e-2]).
      max_iter: L-BFGS iterations per fit at most.
      tol: scikit-learn's gradient tolerance.
      blas_threads: BLAS threads of each fit; 0 keeps the library's default (all cores).
    """

    weight_decays: tuple = B4_WEIGHT_DECAYS
    max_iter: int = DEFAULT_MAX_ITER
    tol: float = DEFAULT_TOL
    blas_threads: int = DEFAULT_BLAS_THREADS


# --------------------------------------------------------------------------------------------
# Classifier on arrays.


def weight_decay_to_c(weight_decay, num_examples):
    """scikit-learn's C for weight decay lambda on n examples: C = 1 / (lambda * n)."""
    return 1.0 / (float(weight_decay) * int(num_examples))


def fit_logistic(x, y, weight_decay, settings=TransferSettings()):
    """Fits the L-BFGS logistic regression for one weight decay.

    Args:
      x: float32 [N, D] features.
      y: int [N] labels.
      weight_decay: lambda (objective mean cross-entropy + lambda / 2 * ||W||^2).
      settings: `TransferSettings` (max_iter, tol).
    Returns:
      (fitted LogisticRegression, iterations, converged).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(
        solver="lbfgs",
        C=weight_decay_to_c(weight_decay, len(y)),
        max_iter=settings.max_iter,
        tol=settings.tol,
    )
    with warnings.catch_warnings(), _blas_threads(settings.blas_threads):
        # Reported per fit in the results instead of a warning per grid point.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    iterations = int(np.max(model.n_iter_))
    return model, iterations, iterations < settings.max_iter


def _blas_threads(threads):
    if not threads:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def class_scores(model, x, num_classes):
    """Decision values [N, num_classes]; classes the model never saw score -inf."""
    scores = np.full((len(x), num_classes), -np.inf, np.float64)
    raw = model.decision_function(x)
    if raw.ndim == 1:  # binary: scikit-learn returns the score of classes_[1] only
        raw = np.stack([-raw, raw], axis=1)
    scores[:, model.classes_] = raw
    return scores


def top_k_accuracy(scores, labels, k):
    """Fraction of rows whose label is among the k highest scores (ties: lowest class first)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(order == np.asarray(labels)[:, None], axis=1)))


def grid_search(x_train, y_train, x_val, y_val, settings=TransferSettings()):
    """Validation top-1 of every weight decay; the best one.

    Returns:
      (best weight decay, rows): rows are dicts with weight_decay, C, val_top1, iterations and
      converged, in the order of `settings.weight_decays`. The best is the highest val_top1,
      ties going to the larger weight decay.
    """
    rows = []
    for weight_decay in settings.weight_decays:
        model, iterations, converged = fit_logistic(x_train, y_train, weight_decay, settings)
        rows.append(
            {
                "weight_decay": float(weight_decay),
                "C": weight_decay_to_c(weight_decay, len(y_train)),
                "val_top1": float(np.mean(model.predict(x_val) == y_val)),
                "iterations": iterations,
                "converged": converged,
            }
        )
    best = max(rows, key=lambda r: (r["val_top1"], r["weight_decay"]))
    return best["weight_decay"], rows


def transfer_linear_eval(
    x_train, y_train, x_val, y_val, x_test, y_test, num_classes, settings=TransferSettings()
):
    """SimReg B.4 on features: search on (train, val), refit on train + val, score on test.

    Args:
      x_train, x_val, x_test: float32 [N_*, D] features; y_*: int [N_*] labels in
        [0, num_classes).
      num_classes: classes of the dataset (top-5 is reported when it is above 5).
      settings: `TransferSettings`.
    Returns:
      dict: top1, top5 (or None), best_weight_decay, best_C (of the refit), grid (see
      `grid_search`), refit_iterations, refit_converged, num_train, num_val, num_test,
      not_converged (grid fits that stopped at max_iter), lr_axis.
    """
    best, rows = grid_search(x_train, y_train, x_val, y_val, settings)
    x_all = np.concatenate([x_train, x_val])
    y_all = np.concatenate([y_train, y_val])
    model, iterations, converged = fit_logistic(x_all, y_all, best, settings)
    scores = class_scores(model, x_test, num_classes)
    return {
        "top1": top_k_accuracy(scores, y_test, 1),
        "top5": top_k_accuracy(scores, y_test, 5) if num_classes > 5 else None,
        "best_weight_decay": best,
        "best_C": weight_decay_to_c(best, len(y_all)),
        "grid": rows,
        "refit_iterations": iterations,
        "refit_converged": converged,
        "not_converged": sum(not r["converged"] for r in rows),
        "num_train": int(len(y_train)),
        "num_val": int(len(y_val)),
        "num_test": int(len(y_test)),
        "max_iter": settings.max_iter,
        "tol": settings.tol,
        "blas_threads": settings.blas_threads,
        "lr_axis": LR_AXIS,
    }


# --------------------------------------------------------------------------------------------
# Splits and label checks.


def stratified_split(labels, val_fraction, seed, flag="--transfer_val_fraction"):
    """Seeded stratified (train rows, val rows) of `labels` (sorted row indices).

    Raises:
      TransferError: naming `flag` when a class has a single example or the fraction leaves
        fewer validation (or training) rows than classes.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if not 0.0 < val_fraction < 1.0:
        raise TransferError(f"{flag} must be in (0, 1), got {val_fraction}.")
    classes, counts = np.unique(labels, return_counts=True)
    if np.any(counts < 2):
        lonely = classes[counts < 2][0]
        raise TransferError(
            f"{flag}: class {lonely} has a single training example, so no stratified "
            "validation split can be drawn; give the dataset's own val split instead."
        )
    num_val = int(np.ceil(val_fraction * len(labels)))
    if num_val < len(classes) or len(labels) - num_val < len(classes):
        raise TransferError(
            f"{flag}={val_fraction} leaves {num_val} of {len(labels)} training examples for "
            f"validation; a stratified split needs at least one per class ({len(classes)}) "
            "on each side."
        )
    train_rows, val_rows = train_test_split(
        np.arange(len(labels)), test_size=num_val, stratify=labels, random_state=seed
    )
    return np.sort(train_rows), np.sort(val_rows)


def check_split_labels(labels, flag, split, class_names=()):
    """Raises TransferError naming `flag` unless the split has at least two classes."""
    present = np.unique(labels)
    if len(present) < 2:
        only = _class_name(present[0], class_names) if len(present) else "none"
        raise TransferError(
            f"{flag}: split {split!r} has {len(labels)} examples of a single class ({only}); "
            "a classifier needs at least two."
        )


def check_classes_seen(labels, train_labels, flag, split, class_names=()):
    """Raises TransferError naming `flag` when `split` has classes that train lacks."""
    unseen = np.setdiff1d(np.unique(labels), np.unique(train_labels))
    if len(unseen):
        names = ", ".join(_class_name(c, class_names) for c in unseen[:5])
        raise TransferError(
            f"{flag}: split {split!r} has {len(unseen)} class(es) with no training example "
            f"({names}); the splits' classes do not match."
        )


def _class_name(label, class_names):
    label = int(label)
    return class_names[label] if 0 <= label < len(class_names) else str(label)


# --------------------------------------------------------------------------------------------
# The protocol on a dataset.


@dataclasses.dataclass(frozen=True)
class TransferData:
    """Which dataset and splits the transfer protocol reads.

    Attributes:
      source: `kd_keras.data.sources.load_split` source: "folder:/root" or a directory
        (root/<split>/<class>/*.jpg), "tfds:NAME" (prepared on disk) or "digits".
      data_dir: TFDS data directory (None: TFDS' default).
      train_split, test_split: split names.
      val_split: a split name, VAL_AUTO (the dataset's own "val"/"validation" split when it
        has one other than the test split, else a split of train) or VAL_FROM_TRAIN.
      val_fraction: fraction of train held out for validation when it is split.
      max_examples: at most this many examples per split (every n-th); None: all.
      seed: seed of the validation split.
    """

    source: str
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str = VAL_AUTO
    test_split: str = "test"
    val_fraction: float = DEFAULT_VAL_FRACTION
    max_examples: int | None = None
    seed: int = 0


def own_val_split(source, data_dir, test_split):
    """The dataset's own validation split name ("val"/"validation"), or None.

    digits has none (its "val" is its test split); a folder's val folder, or a TFDS
    validation split, counts only when it is not the test split itself.
    """
    if source == "digits":
        return None
    candidates = ("val", "validation")
    if source.startswith("tfds:"):
        import tensorflow_datasets as tfds

        name = source[len("tfds:") :]
        try:
            splits = set(tfds.builder(name, data_dir=data_dir).info.splits.keys())
        except Exception as err:  # noqa: BLE001  (TFDS raises many kinds; one line for all)
            raise TransferError(f"--transfer_data={source}: {str(err).splitlines()[0]}") from err
        test = {test_split, *(c for c in candidates if test_split in candidates)}
        return next((c for c in candidates if c in splits and c not in test), None)
    from kd_keras.data import sources as data

    root = source[len("folder:") :] if source.startswith("folder:") else source
    root = os.path.abspath(os.path.expanduser(root))
    test_dir = data._split_dir(root, test_split)
    for name in candidates:
        path = os.path.join(root, name)
        if os.path.isdir(path) and (
            test_dir is None or os.path.realpath(path) != os.path.realpath(test_dir)
        ):
            return name
    return None


def _check_source(source):
    """A missing image folder is named by its flag, before any split is looked for."""
    if not source:
        raise TransferError("--transfer_data is required by --protocols=transfer.")
    if source == "digits" or source.startswith("tfds:"):
        return
    root = source[len("folder:") :] if source.startswith("folder:") else source
    if not os.path.isdir(os.path.expanduser(root)):
        raise TransferError(
            f"--transfer_data: {root} is not a directory (an image folder "
            "root/<split>/<class>/*.jpg, 'tfds:NAME' or 'digits')."
        )


def _load(data_cfg, split, flag, image_size):
    from kd_keras.data import sources as data

    try:
        return data.load_split(
            data_cfg.source, split, data_dir=data_cfg.data_dir, image_size_hint=image_size
        )
    except (FileNotFoundError, ValueError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TransferError(
            f"{flag}={split} of --transfer_data={data_cfg.source}: {message}"
        ) from err


def _split_features(embed, examples, info, data_cfg, image_size, batch_size):
    from kd_keras.data import augment
    from kd_keras.data import sources as data
    from kd_keras.eval import features

    # Every n-th example by index: files are in class order, so every class stays.
    chosen = features.every_nth_examples(examples, info.num_examples, data_cfg.max_examples)
    ds = data.make_eval_dataset(chosen, lambda im: augment.center_crop(im, image_size), batch_size)
    return features.extract_features(embed, ds)


def run_transfer(embed, image_size, data_cfg, settings=TransferSettings(), batch_size=256):
    """SimReg B.4's transfer protocol of the embedding `embed` on `data_cfg`'s dataset.

    Images go through `kd_keras.data.augment.center_crop(image, image_size)`: the shorter side is
    resized to round(image_size * 256 / 224) and the central image_size square is kept (B.4's
    256 / 224 at a 224 px model, scaled proportionally for smaller models); the network
    normalises its [0, 1] inputs itself.

    Args:
      embed: images float32 [B, S, S, 3] in [0, 1] -> features [B, D] (keras.Model or fn).
      image_size: S.
      data_cfg: `TransferData`.
      settings: `TransferSettings`.
      batch_size: feature-extraction batch size.
    Returns:
      the dict of `transfer_linear_eval` plus dataset, splits (with where val came from),
      num_classes and the transform.
    Raises:
      TransferError naming the flag for missing data, unlabelled or one-class splits and
      classes that do not match between splits.
    """
    _check_source(data_cfg.source)
    val_name = data_cfg.val_split
    if val_name == VAL_AUTO:
        val_name = own_val_split(data_cfg.source, data_cfg.data_dir, data_cfg.test_split)
    elif val_name == VAL_FROM_TRAIN:
        val_name = None
    wanted = [(data_cfg.train_split, "--transfer_train_split")]
    if val_name is not None:
        wanted.append((val_name, "--transfer_val_split"))
    wanted.append((data_cfg.test_split, "--transfer_test_split"))
    loaded = {flag: (split, *_load(data_cfg, split, flag, image_size)) for split, flag in wanted}
    train_info = loaded["--transfer_train_split"][2]
    for flag, (split, _, info) in loaded.items():
        if not info.has_labels:
            raise TransferError(f"{flag}: split {split!r} of {data_cfg.source} has no labels.")
        if tuple(info.class_names) != tuple(train_info.class_names):
            raise TransferError(
                f"{flag}: split {split!r} of {data_cfg.source} has classes "
                f"{_short(info.class_names)}, the train split {_short(train_info.class_names)}."
            )
    t_start = time.time()
    feats = {
        flag: _split_features(embed, examples, info, data_cfg, image_size, batch_size)
        for flag, (split, examples, info) in loaded.items()
    }
    t_features = time.time()
    names = train_info.class_names
    x_train, y_train = feats["--transfer_train_split"]
    check_split_labels(y_train, "--transfer_train_split", data_cfg.train_split, names)
    if val_name is None:
        val_source = f"stratified {data_cfg.val_fraction:g} of {data_cfg.train_split!r}"
        train_rows, val_rows = stratified_split(y_train, data_cfg.val_fraction, data_cfg.seed)
        x_val, y_val = x_train[val_rows], y_train[val_rows]
        x_train, y_train = x_train[train_rows], y_train[train_rows]
    else:
        val_source = f"split {val_name!r}"
        x_val, y_val = feats["--transfer_val_split"]
    x_test, y_test = feats["--transfer_test_split"]
    for flag, split, y in (
        ("--transfer_val_split", val_name or data_cfg.train_split, y_val),
        ("--transfer_test_split", data_cfg.test_split, y_test),
    ):
        check_split_labels(y, flag, split, names)
        check_classes_seen(y, y_train, flag, split, names)
    num_classes = max(train_info.num_classes, int(max(y_train.max(), y_test.max())) + 1)
    result = transfer_linear_eval(
        x_train, y_train, x_val, y_val, x_test, y_test, num_classes, settings
    )
    result.update(
        dataset=data_cfg.source,
        train_split=data_cfg.train_split,
        val_split=val_source,
        test_split=data_cfg.test_split,
        val_seed=data_cfg.seed if val_name is None else None,
        num_classes=num_classes,
        feature_dim=int(x_train.shape[1]),
        image_size=int(image_size),
        transform=f"shorter side to round({image_size} * 256 / 224), centre crop {image_size}",
        max_examples_per_split=data_cfg.max_examples,
        features_seconds=round(t_features - t_start, 1),
        classifier_seconds=round(time.time() - t_features, 1),
    )
    return result


def data_from_config(cfg):
    """`TransferData` of a `kd_keras.config.EvaluateConfig` (its transfer_* fields, --seed)."""
    return TransferData(
        source=cfg.transfer_data,
        data_dir=cfg.transfer_data_dir,
        train_split=cfg.transfer_train_split,
        val_split=cfg.transfer_val_split,
        test_split=cfg.transfer_test_split,
        val_fraction=cfg.transfer_val_fraction,
        max_examples=cfg.transfer_max_examples,
        seed=cfg.seed,
    )


def settings_from_config(cfg):
    """`TransferSettings` of a `kd_keras.config.EvaluateConfig`."""
    return TransferSettings(
        weight_decays=tuple(cfg.transfer_weight_decays),
        max_iter=cfg.transfer_max_iter,
        blas_threads=cfg.transfer_blas_threads,
    )


def run_protocol(data, name="transfer"):
    """The transfer protocol of `python -m kd_keras.evaluate` (an entry of its PROTOCOLS table).

    Args:
      data: `kd_keras.eval.protocols.EvalData` (reads cfg, embed, size).
      name: protocol name of the records.
    Returns:
      (details, records): the `run_transfer` dict; top-1 (and top-5) records carrying the
      transfer dataset and splits, the chosen weight decay and the sizes.
    """
    cfg = data.cfg
    if not cfg.transfer_data:
        raise TransferError("--transfer_data is required by --protocols=transfer.")
    details = run_transfer(
        data.embed,
        data.size,
        data_from_config(cfg),
        settings_from_config(cfg),
        batch_size=cfg.eval_batch_size,
    )
    settings = {
        "dataset": details["dataset"],
        "train_split": details["train_split"],
        "val_split": details["val_split"],
        "eval_split": details["test_split"],
        "weight_decay": details["best_weight_decay"],
        "C": details["best_C"],
        "num_train": details["num_train"],
        "num_val": details["num_val"],
        "num_test": details["num_test"],
    }
    records = [
        {"protocol": name, "metric": metric, "value": float(details[metric]), **settings}
        for metric in ("top1", "top5")
        if details[metric] is not None
    ]
    return details, records


def _short(names, shown=5):
    names = list(names)
    more = f", ... ({len(names)})" if len(names) > shown else ""
    return "[" + ", ".join(map(str, names[:shown])) + more + "]"
