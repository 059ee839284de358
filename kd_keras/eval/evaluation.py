"""Evaluation of a trained network on frozen features: k-NN, linear probe, fine-tuning, MSE/cos.

  python -m kd_keras.evaluate --model=/tmp/run --protocols=knn,linear,finetune1,finetune10

`--model` is a kd_keras run directory, an export directory, a SavedModel or a .keras file (see
`kd_keras.eval.loading.load_model`). Images of both splits go through the evaluation transform: the shorter side is
resized to 256/224 of the crop side and the central square is cut out
(`kd_keras.data.augment.center_crop`; for a 32 px model, 37 px then a 32 px crop).

Protocols (`--protocols`, the table `kd_keras.eval.protocols.PROTOCOLS`):
  knn        cosine k-NN, `--knn_votes` majority (SimReg/CompRess) and/or weighted (DINO),
             every k of `--knn_k`; top-1, and top-5 when there are more than 5 classes.
  linear     a linear probe (`kd_keras.eval.linear_probe`), preset `--linear_preset`, on cached
             centre-crop features (`--linear_path=cached`) or augmented images
             (`--linear_path=augmented`).
  finetune1, finetune10
             fine-tuning of the whole backbone on 1% / 10% of the training labels
             (`kd_keras.eval.finetune`; the label subset is saved next to the results).
  mse_cos    mean squared distance between the l2-normalised outputs of the student's
             prediction head and of its teacher (the SimReg loss, = 2 - 2 cos) and their mean
             cosine similarity, on the evaluation split; teachers come from the run's
             config.json.
  transfer   SimReg B.4's L-BFGS logistic regression on the frozen features of another
             dataset (`--transfer_data`, `--transfer_*`; `kd_keras.eval.transfer`, grid-searched
             weight decay on a validation split, refit on train + val, top-1 on the test
             split; docs/transfer.md).

Features (`--eval_layer`, `kd_keras.eval.layers`): "backbone" (the pooled backbone output), any backbone layer
("stem", "stage1".."stage4": a 4-D map is average-pooled over a g x g grid with
g = round(sqrt(m / channels)), so channels * g^2 is about the backbone's dimension m, as in
SimReg Table A4), "head_<teacher>" (a prediction head's output) or "head_<teacher>/<layer>"
(any layer of that head, SimReg Table 2).

Outputs in `--eval_dir` (`kd_keras.eval.report`): results.json (every number with its protocol, k, vote, layer, splits
and sizes), logs/ (TensorBoard scalars and projector embeddings of a few test examples),
knn_monitor.png (the k-NN curve recorded during training by `--knn_monitor_every`, when the
run has one), subset_*.json (label subsets of the fine-tuning protocols).
"""

import logging
import os
import time

from kd_keras import config as config_lib
from kd_keras.eval import EvaluationError, layers, report
from kd_keras.eval import protocols as protocols_lib
from kd_keras.eval.loading import LoadedModel, load_model  # noqa: F401  (the module's API)
from kd_keras.eval.report import RESULTS, default_eval_dir, format_table  # noqa: F401

log = logging.getLogger("kd_keras")

PROG = "kd_keras.evaluate"
EVAL_TRANSFORM = "resize shorter side to round(size * 256 / 224), centre crop size x size"


def evaluate(loaded, cfg, train_split=None, eval_split=None):
    """Runs every protocol of `cfg` on `loaded`; writes and returns the results.

    Args:
      loaded: `LoadedModel` (see `load_model` / `LoadedModel.from_keras`).
      cfg: `kd_keras.config.EvaluateConfig`; None fields fall back to the run's config.json
        (when `loaded.run_dir` is set) or the training defaults.
      train_split, eval_split: optional (examples, SplitInfo) pairs from
        `kd_keras.data.sources.load_split`, to skip loading (tests).
    Returns:
      dict written to `<eval_dir>/results.json`: "model", "layer", "dataset", splits, sizes,
      "image_size", "eval_transform", "results" (a list of records, each with "protocol",
      "metric", "value" and the protocol's settings) and per-protocol details.
    """
    t_start = time.time()
    names = protocols_lib.check_protocols(cfg.protocols)
    source = _data_source(loaded, cfg)
    eval_dir = cfg.eval_dir or default_eval_dir(loaded, cfg.model if cfg.model else None)
    _check_writable(eval_dir)
    embed, layer_info = layers.layer_embedding(loaded, cfg.eval_layer)
    protocols_lib.check_model(names, loaded, cfg)
    train, evals = _load_splits(source, train_split, eval_split)
    protocols_lib.check_data(names, cfg, source["dataset"], train[1], evals[1])
    data = _prepare(loaded, cfg, names, source, train, evals, embed, layer_info, eval_dir)
    results = _results_header(loaded, names, source, data)
    _run_protocols(names, data, results)
    _write_extras(results, data, eval_dir)
    results["eval_seconds"] = round(time.time() - t_start, 1)
    results["eval_dir"] = eval_dir
    report.write_results(eval_dir, results)
    return results


def _data_source(loaded, cfg):
    """{"dataset", "data_dir", "train_split", "eval_split", "image_size"}: the flags, else the
    run's config.json, else the training defaults; checked against the model's input side."""
    from kd_keras.data import sources as data

    run_cfg = None
    if loaded.run_dir:
        run_cfg = config_lib.config_from_json(os.path.join(loaded.run_dir, "config.json"))
    run_data = run_cfg.data if run_cfg else None
    dataset = cfg.dataset or (run_data.dataset if run_data else "digits")
    eval_name = cfg.eval_split or (run_data.eval_split if run_data else None)
    size = cfg.image_size or loaded.image_size or (run_data.image_size if run_data else None)
    if size is None:
        raise EvaluationError(f"--image_size is required: {loaded.source} has no fixed input size.")
    if loaded.image_size and size != loaded.image_size:
        raise EvaluationError(
            f"--image_size={size} but {loaded.source} takes {loaded.image_size} px images."
        )
    return {
        "dataset": dataset,
        "data_dir": cfg.data_dir or (run_data.data_dir if run_data else None),
        "train_split": cfg.train_split or (run_data.train_split if run_data else "train"),
        "eval_split": eval_name or data.default_eval_split(dataset),
        "image_size": size,
    }


def _load_splits(source, train_split=None, eval_split=None):
    """((train examples, SplitInfo), (eval examples, SplitInfo)), unless given."""
    from kd_keras.data import sources as data

    load_kw = dict(data_dir=source["data_dir"], image_size_hint=source["image_size"])
    try:
        train = train_split or data.load_split(source["dataset"], source["train_split"], **load_kw)
        evals = eval_split or data.load_split(source["dataset"], source["eval_split"], **load_kw)
    except FileNotFoundError as err:
        raise EvaluationError(str(err)) from err
    return train, evals


def _prepare(loaded, cfg, names, source, train, evals, embed, layer_info, eval_dir):
    """`EvalData`: centre-crop datasets of the bounded splits, features extracted on demand."""
    from kd_keras.data import augment
    from kd_keras.data import sources as data
    from kd_keras.eval import features

    size = source["image_size"]

    def transform(image):
        return augment.center_crop(image, size)

    (train_examples, train_info), (eval_examples, eval_info) = train, evals
    # The test split is bounded once, for every protocol (--eval_max_test).
    test_examples = features.every_nth_examples(
        eval_examples, eval_info.num_examples, cfg.eval_max_test
    )
    # Only k-NN reads the training features when no linear probe runs: bound them up front.
    train_cap = None if "linear" in names else cfg.knn_max_train
    train_eval = features.every_nth_examples(train_examples, train_info.num_examples, train_cap)
    return protocols_lib.EvalData(
        loaded=loaded,
        cfg=cfg,
        embed=embed,
        layer_info=layer_info,
        size=size,
        eval_dir=eval_dir,
        train_examples=train_examples,
        train_info=train_info,
        eval_info=eval_info,
        test_ds=data.make_eval_dataset(test_examples, transform, cfg.eval_batch_size),
        train_eval_ds=data.make_eval_dataset(train_eval, transform, cfg.eval_batch_size),
    )


def _results_header(loaded, names, source, data):
    """The results dict before any protocol ran: model, data, sizes, layer."""
    return {
        "model": loaded.source,
        "run_dir": loaded.run_dir,
        "dataset": source["dataset"],
        "train_split": source["train_split"],
        "eval_split": source["eval_split"],
        "num_train_split": data.train_info.num_examples,
        "num_eval_split": data.eval_info.num_examples,
        "num_classes": data.train_info.num_classes,
        "image_size": source["image_size"],
        "eval_transform": EVAL_TRANSFORM,
        **data.layer_info,
        "protocols": list(names),
        "results": [],
    }


def _run_protocols(names, data, results):
    """Runs the protocols in table order; their details and records go into `results`."""
    common = {
        "layer": data.layer_info["layer"],
        "train_split": results["train_split"],
        "eval_split": results["eval_split"],
    }
    if any(protocols_lib.PROTOCOLS[p].needs_labels for p in names):
        data.features("test")  # extracted first, as every labelled protocol reads them
    for name, protocol in protocols_lib.PROTOCOLS.items():
        if name not in names:
            continue
        details, records = protocol.run(data, name)
        results[name] = details
        for rec in records:
            if rec is not None:
                head = {k: rec[k] for k in ("protocol", "metric", "value")}
                results["results"].append({**head, **common, **rec})


def _write_extras(results, data, eval_dir):
    """TensorBoard scalars, projector embeddings of a few test examples, the k-NN monitor plot."""
    from kd_keras.eval import features

    logdir = os.path.join(eval_dir, report.LOG_DIR)
    report.write_tensorboard(logdir, results["results"])
    if data.cfg.projector_examples and data.eval_info.has_labels:
        x, y = data.features("test")
        rows = features.every_nth_indices(len(y), data.cfg.projector_examples)
        results["projector"] = report.write_projector(
            os.path.join(logdir, "projector"), x[rows], y[rows], data.eval_info.class_names
        )
    if data.loaded.run_dir:
        plot = report.plot_knn_monitor(data.loaded.run_dir, os.path.join(eval_dir, report.PLOT))
        if plot:
            results["knn_monitor_plot"] = plot


def _check_writable(eval_dir):
    """Creates --eval_dir, or one line saying why it cannot be used, before any evaluation
    runs (not a PermissionError trace after minutes of work)."""
    if os.path.exists(eval_dir) and not os.path.isdir(eval_dir):
        raise EvaluationError(f"--eval_dir={eval_dir} is a file, not a directory.")
    try:
        os.makedirs(eval_dir, exist_ok=True)
    except OSError as err:
        raise EvaluationError(f"--eval_dir={eval_dir} cannot be created: {err.strerror}.") from err
    if not os.access(eval_dir, os.W_OK | os.X_OK):
        raise EvaluationError(f"--eval_dir={eval_dir} is not writable.")
