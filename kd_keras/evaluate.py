"""Evaluation of a trained network on frozen features: k-NN, linear probe, fine-tuning, MSE/cos.

  python -m kd_keras.evaluate --model=/tmp/run --protocols=knn,linear,finetune1,finetune10

`--model` is a kd_keras run directory, an export directory, a SavedModel or a .keras file (see
`load_model`). Images of both splits go through the evaluation transform: the shorter side is
resized to 256/224 of the crop side and the central square is cut out
(`kd_keras.augment.center_crop`; for a 32 px model, 37 px then a 32 px crop).

Protocols (`--protocols`):
  knn        cosine k-NN, `--knn_votes` majority (SimReg/CompRess) and/or weighted (DINO),
             every k of `--knn_k`; top-1, and top-5 when there are more than 5 classes.
  linear     a linear probe (`kd_keras.linear_probe`), preset `--linear_preset`, on cached
             centre-crop features (`--linear_path=cached`) or augmented images
             (`--linear_path=augmented`).
  finetune1, finetune10
             fine-tuning of the whole backbone on 1% / 10% of the training labels
             (`kd_keras.finetune`; the label subset is saved next to the results).
  mse_cos    mean squared distance between the l2-normalised outputs of the student's
             prediction head and of its teacher (the SimReg loss, = 2 - 2 cos) and their mean
             cosine similarity, on the evaluation split; teachers come from the run's
             config.json.

Features (`--eval_layer`): "backbone" (the pooled backbone output), any backbone layer
("stem", "stage1".."stage4": a 4-D map is average-pooled over a g x g grid with
g = round(sqrt(m / channels)), so channels * g^2 is about the backbone's dimension m, as in
SimReg Table A4), "head_<teacher>" (a prediction head's output) or "head_<teacher>/<layer>"
(any layer of that head, SimReg Table 2).

Outputs in `--eval_dir`: results.json (every number with its protocol, k, vote, layer, splits
and sizes), logs/ (TensorBoard scalars and projector embeddings of a few test examples),
knn_monitor.png (the k-NN curve recorded during training by `--knn_monitor_every`, when the
run has one), subset_*.json (label subsets of the fine-tuning protocols).
"""

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings

import keras
from absl import app, flags

from kd_keras import config as config_lib

config_lib.define_evaluate_flags()

log = logging.getLogger("kd_keras")

PROG = "kd_keras.evaluate"
RESULTS = "results.json"
LOG_DIR = "logs"
PLOT = "knn_monitor.png"
EVAL_TRANSFORM = "resize shorter side to round(size * 256 / 224), centre crop size x size"
SUPERVISED = ("knn", "linear", "finetune1", "finetune10")


class EvaluationError(ValueError):
    """Bad input to the evaluation: reported by the CLI as one line."""


@dataclasses.dataclass
class LoadedModel:
    """A network to evaluate, however it was stored.

    Attributes:
      backbone: keras.Model images [B, S, S, 3] in [0, 1] -> features [B, m], or None for a
        bare SavedModel (then only the backbone output can be evaluated, via `serve`).
      serve: the SavedModel's serving function (images -> [B, m]) or None. When present it is
        what the "backbone" layer is evaluated with, so an export is judged as shipped.
      heads: {name: keras.Model [B, m] -> [B, d]} prediction heads (may be empty).
      image_size: input side S.
      feature_dim: m.
      source: human-readable origin.
      run_dir: the kd_keras run directory it belongs to, if any (config.json, teachers,
        k-NN monitor history).
    """

    backbone: object
    serve: object
    heads: dict
    image_size: int
    feature_dim: int
    source: str
    run_dir: str | None = None

    @classmethod
    def from_keras(cls, backbone, heads=None, run_dir=None, source="in-memory model"):
        """Wraps an in-memory backbone (and optional heads list or dict)."""
        if heads is not None and not isinstance(heads, dict):
            heads = {h.name: h for h in heads}
        loaded = cls(
            backbone=backbone,
            serve=None,
            heads=dict(heads or {}),
            image_size=_input_side(backbone.input_shape, source),
            feature_dim=int(backbone.output_shape[-1]),
            source=source,
            run_dir=run_dir,
        )
        _check_heads(loaded)
        return loaded


# --------------------------------------------------------------------------------------------
# Loading.


def load_model(path, from_checkpoint=False):
    """Loads what `--model` names.

    * a run directory (has config.json): its export/ (backbone.keras, the SavedModel for the
      backbone output, heads/); with `from_checkpoint`, or when the run has no export yet, the
      student and heads are rebuilt from config.json and read from the newest checkpoint
      (this needs the run's teachers, which fix the heads' output sizes);
    * an export directory (saved_model/ and backbone.keras, as `kd_keras.export` writes);
    * a SavedModel directory with a `serving_default` signature (images -> features);
    * a .keras file holding a backbone.

    Returns:
      `LoadedModel`.
    Raises:
      EvaluationError naming --model for anything that cannot be loaded.
    """
    from kd_keras import export

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise EvaluationError(f"--model: {path} does not exist.")
    if os.path.isfile(path):
        if not path.endswith(".keras"):
            raise EvaluationError(f"--model: {path} is a file but not a .keras model.")
        return LoadedModel.from_keras(_load_keras(path), source=f"keras file {path}")
    if os.path.isfile(os.path.join(path, "config.json")):
        export_dir = os.path.join(path, "export")
        if from_checkpoint or not os.path.isdir(os.path.join(export_dir, export.SAVED_MODEL_DIR)):
            return _load_run_checkpoint(path)
        loaded = _load_export(export_dir)
        loaded.run_dir = path
        return loaded
    if os.path.isdir(os.path.join(path, export.SAVED_MODEL_DIR)):
        loaded = _load_export(path)
        parent = os.path.dirname(path)
        if os.path.isfile(os.path.join(parent, "config.json")):
            loaded.run_dir = parent
        return loaded
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        serve, size, dim = _load_serving_function(path)
        return LoadedModel(None, serve, {}, size, dim, f"SavedModel {path}")
    raise EvaluationError(
        f"--model: {path} is not a run directory (config.json), an export directory "
        "(saved_model/), a SavedModel (saved_model.pb) or a .keras file."
    )


def _load_serving_function(saved_model_dir):
    """(serve fn images -> [B, m], input side or None, m) of a SavedModel; checks the signature."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(saved_model_dir)
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise EvaluationError(f"--model: cannot load SavedModel {saved_model_dir}: {err}") from err
    if "serving_default" not in loaded.signatures:
        raise EvaluationError(
            f"--model: SavedModel {saved_model_dir} has no 'serving_default' signature "
            f"(it has {sorted(loaded.signatures) or 'none'}); export it with one mapping "
            "images [B, H, W, 3] to features [B, m]."
        )
    signature = loaded.signatures["serving_default"]
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise EvaluationError(
            f"--model: {saved_model_dir}'s serving_default must take one image tensor and "
            f"return one feature tensor; it takes {sorted(inputs)} and returns {sorted(outputs)}."
        )
    spec = next(iter(inputs.values()))
    out_spec = next(iter(outputs.values()))
    if spec.shape.rank != 4 or out_spec.shape.rank != 2 or out_spec.shape[-1] is None:
        raise EvaluationError(
            f"--model: {saved_model_dir}'s serving_default maps {spec.shape} to "
            f"{out_spec.shape}; expected images [B, H, W, 3] -> features [B, m]."
        )
    size = spec.shape[1] if spec.shape[1] == spec.shape[2] else None

    # One trace for every batch size (the last evaluation batch is usually smaller).
    @tf.function(input_signature=[tf.TensorSpec([None, *spec.shape[1:]], tf.float32)])
    def serve(images):
        return next(iter(signature(images).values()))

    serve.loaded = loaded  # keeps the SavedModel's resources alive
    return serve, size, int(out_spec.shape[-1])


def _load_keras(path):
    """keras.models.load_model with kd_keras' custom layers registered; one-line errors."""
    from kd_keras import backbones, heads  # noqa: F401  (registers custom layers)
    from kd_keras.eval import linear_probe  # noqa: F401

    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise EvaluationError(f"--model: cannot load {path}: {reason}") from err


def _load_export(export_dir):
    from kd_keras import export

    serve, size, dim = _load_serving_function(os.path.join(export_dir, export.SAVED_MODEL_DIR))
    backbone = None
    keras_file = os.path.join(export_dir, export.KERAS_FILE)
    if os.path.isfile(keras_file):
        backbone = _load_keras(keras_file)
        if int(backbone.output_shape[-1]) != dim:
            raise EvaluationError(
                f"--model: {keras_file} gives {backbone.output_shape[-1]}-d features but the "
                f"SavedModel next to it gives {dim}-d."
            )
        size = size or _input_side(backbone.input_shape, keras_file)
    manifest_path = os.path.join(export_dir, export.MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        stored = manifest.get("feature_dim")
        if stored is not None and int(stored) != dim:
            raise EvaluationError(
                f"--model: {manifest_path} records feature_dim={stored} but the SavedModel "
                f"gives {dim}-d features."
            )
    loaded = LoadedModel(
        backbone=backbone,
        serve=serve,
        heads=export.load_exported_heads(export_dir),
        image_size=size,
        feature_dim=dim,
        source=f"export {export_dir}",
    )
    _check_heads(loaded)
    return loaded


def run_teacher_specs(run_dir, cfg=None):
    """The run's teachers as `TeacherSpec`s, recipe teachers resolved to their run directory."""
    from kd_keras import teachers as teachers_lib

    if cfg is None:
        cfg = config_lib.config_from_json(os.path.join(run_dir, "config.json"))
    specs = []
    for i, raw in enumerate(cfg.model.teachers):
        spec = teachers_lib.parse_teacher_spec(raw, i)
        if spec.kind == "recipe":
            spec = dataclasses.replace(
                spec, kind="run", path=os.path.join(run_dir, f"teacher_{spec.recipe}")
            )
        specs.append(spec)
    return specs


def load_run_teachers(run_dir, image_size):
    """Loads the frozen teachers a run was distilled from (`kd_keras.teachers.Teacher`s)."""
    from kd_keras import teachers as teachers_lib

    return [
        teachers_lib.load_teacher(spec, image_size, i, run_dir)
        for i, spec in enumerate(run_teacher_specs(run_dir))
    ]


def latest_checkpoint(directory):
    """Newest complete weights file of a run's checkpoint directory, or None.

    Two layouts exist: step checkpoints (ckpt-<step>.weights.h5, listed in checkpoint.json or
    found by name; the newest readable one wins) and Keras BackupAndRestore's
    latest.weights.h5 (runs from before step checkpoints).
    """
    from kd_keras import checkpointing

    steps = checkpointing.available_steps(directory)
    if steps:
        return checkpointing.checkpoint_files(directory)[steps[0]]
    legacy = os.path.join(directory, "latest.weights.h5")
    return legacy if os.path.isfile(legacy) else None


@contextlib.contextmanager
def _checkpoint_snapshot(directory):
    """A private copy of the newest checkpoint (path, or None), so a training run that rotates
    its checkpoints meanwhile cannot remove the file while it is read; deleted afterwards."""
    from kd_keras import checkpointing

    with tempfile.TemporaryDirectory(prefix="kd_keras_eval_") as tmp:
        copied = checkpointing.copy_newest(directory, os.path.join(tmp, "ckpt.weights.h5"))
        if copied is not None:
            yield copied[1], f"checkpoint of step {copied[0]} in {directory}"
        else:
            legacy = latest_checkpoint(directory)
            yield legacy, f"checkpoint {legacy}"


def _load_run_checkpoint(run_dir):

    from kd_keras import train

    cfg = config_lib.config_from_json(os.path.join(run_dir, "config.json"))
    with _checkpoint_snapshot(os.path.join(run_dir, train.CHECKPOINT_DIR)) as (weights, source):
        if weights is None:
            raise EvaluationError(
                f"--model: run {run_dir} has neither an export/ nor a checkpoint in "
                f"{os.path.join(run_dir, train.CHECKPOINT_DIR)}."
            )
        size = cfg.data.image_size
        # sync_bn only matters when training across replicas; plain BN loads the same weights.
        cfg = dataclasses.replace(cfg, sync_bn=False)
        teachers = load_run_teachers(run_dir, size) if cfg.method != "supervised" else []
        student = train.build_student(cfg, size)
        method = train.build_method(cfg, student, teachers, num_classes=_run_num_classes(cfg))
        method.build((None, size, size, 3))
        # The checkpoint also holds the optimizer's state, which evaluation does not need;
        # Keras warns that it skips it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            method.load_weights(weights)
    return LoadedModel.from_keras(
        student,
        heads=getattr(method, "heads", None),
        run_dir=run_dir,
        source=source,
    )


def _run_num_classes(cfg):
    if cfg.method != "supervised":
        return 0
    from kd_keras import data

    _, info = data.load_split(
        cfg.data.dataset,
        cfg.data.train_split,
        data_dir=cfg.data.data_dir,
        image_size_hint=cfg.data.image_size,
    )
    return info.num_classes


def _input_side(shape, what):
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        raise EvaluationError(f"{what}: expected square image input [B, S, S, 3], got {shape}.")
    return int(shape[1])


def _check_heads(loaded):
    for name, head in loaded.heads.items():
        if int(head.input_shape[-1]) != loaded.feature_dim:
            raise EvaluationError(
                f"head {name!r} takes {head.input_shape[-1]}-d inputs but the backbone gives "
                f"{loaded.feature_dim}-d features."
            )


# --------------------------------------------------------------------------------------------
# Layers.


def available_layers(loaded):
    """Names `--eval_layer` accepts for this model."""
    names = ["backbone"]
    if loaded.backbone is not None:
        names += [
            layer.name
            for layer in loaded.backbone.layers
            if layer.name in ("stem", "features") or layer.name.startswith("stage")
        ]
    for head_name, head in loaded.heads.items():
        names.append(head_name)
        names += [f"{head_name}/{layer.name}" for layer in head.layers[1:]]
    return names


def layer_embedding(loaded, layer="backbone"):
    """The embedding function of `--eval_layer` and a description of it.

    Args:
      loaded: `LoadedModel`.
      layer: see the module docstring.
    Returns:
      (embed, info): embed maps images float32 [B, S, S, 3] in [0, 1] to features [B, D]
      (a keras.Model, or the SavedModel function for "backbone" when the model has one);
      info is {"layer": str, "feature_dim": D, "pooling": str or None}.
    Raises:
      EvaluationError for an unknown layer, listing the known ones.
    """
    if layer in ("backbone", ""):
        embed = loaded.serve if loaded.serve is not None else loaded.backbone
        return embed, {"layer": "backbone", "feature_dim": loaded.feature_dim, "pooling": None}
    if loaded.backbone is None:
        raise EvaluationError(
            f"--eval_layer={layer}: {loaded.source} is a bare SavedModel; only 'backbone' is "
            "available (intermediate layers need backbone.keras or a run directory)."
        )
    head_name, _, head_layer = layer.partition("/")
    if head_name in loaded.heads:
        head = loaded.heads[head_name]
        if head_layer:
            try:
                sub = keras.Model(head.inputs, head.get_layer(head_layer).output)
            except ValueError as err:
                raise _unknown_layer(loaded, layer) from err
        else:
            sub = head
        images = keras.Input(loaded.backbone.input_shape[1:], name="images")
        out = sub(loaded.backbone(images, training=False), training=False)
        model = keras.Model(images, out, name=f"eval_{head_name}")
        return model, {"layer": layer, "feature_dim": int(out.shape[-1]), "pooling": None}
    if head_layer:
        raise _unknown_layer(loaded, layer)
    try:
        tensor = loaded.backbone.get_layer(layer).output
    except ValueError as err:
        raise _unknown_layer(loaded, layer) from err
    pooling = None
    if len(tensor.shape) == 4:
        grid = pooling_grid(tensor.shape, loaded.feature_dim)
        tensor = AdaptiveAveragePooling(grid, name="eval_pool")(tensor)
        pooling = f"adaptive average pool to {grid}x{grid}, flattened"
    elif len(tensor.shape) != 2:
        raise EvaluationError(f"--eval_layer={layer}: output shape {tensor.shape} is not usable.")
    model = keras.Model(loaded.backbone.inputs, tensor, name=f"eval_{layer}")
    return model, {"layer": layer, "feature_dim": int(tensor.shape[-1]), "pooling": pooling}


def _unknown_layer(loaded, layer):
    return EvaluationError(
        f"--eval_layer={layer}: unknown layer; known: {', '.join(available_layers(loaded))}."
    )


def pooling_grid(shape, target_dim):
    """Grid side g for pooling a [B, H, W, C] map so that C * g^2 is about `target_dim`.

    g = round(sqrt(target_dim / C)), clipped to [1, min(H, W)].
    """
    _, height, width, channels = shape
    g = max(1, int(round(math.sqrt(target_dim / channels))))
    return min(g, int(height), int(width))


def _adaptive_pool(x, grid):
    """PyTorch AdaptiveAvgPool2d: bin i spans [floor(i H / g), ceil((i + 1) H / g))."""
    import tensorflow as tf

    height, width = int(x.shape[1]), int(x.shape[2])
    rows = []
    for i in range(grid):
        top, bottom = (i * height) // grid, -(-((i + 1) * height) // grid)
        cols = []
        for j in range(grid):
            left, right = (j * width) // grid, -(-((j + 1) * width) // grid)
            cols.append(tf.reduce_mean(x[:, top:bottom, left:right, :], axis=[1, 2]))
        rows.append(tf.stack(cols, axis=1))
    pooled = tf.stack(rows, axis=1)  # [B, g, g, C]
    return tf.reshape(pooled, [-1, grid * grid * int(x.shape[-1])])


@keras.saving.register_keras_serializable(package="kd_keras")
class AdaptiveAveragePooling(keras.layers.Layer):
    """[B, H, W, C] -> [B, g * g * C]: average over a g x g grid of bins, then flatten.

    Bins follow PyTorch's AdaptiveAvgPool2d, so g = 1 is global average pooling.
    """

    def __init__(self, grid, **kwargs):
        super().__init__(**kwargs)
        self.grid = int(grid)

    def call(self, inputs):
        return _adaptive_pool(inputs, self.grid)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.grid * self.grid * input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "grid": self.grid}


# --------------------------------------------------------------------------------------------
# Evaluation.


def _strided(n, cap):
    """Row indices 0, s, 2s, ... keeping at most `cap` of `n` rows (every class stays)."""
    import numpy as np

    if not cap or cap >= n:
        return np.arange(n)
    return np.arange(0, n, -(-n // cap))


def evaluate(loaded, cfg, train_split=None, eval_split=None):
    """Runs every protocol of `cfg` on `loaded`; writes and returns the results.

    Args:
      loaded: `LoadedModel` (see `load_model` / `LoadedModel.from_keras`).
      cfg: `kd_keras.config.EvaluateConfig`; None fields fall back to the run's config.json
        (when `loaded.run_dir` is set) or the training defaults.
      train_split, eval_split: optional (examples, SplitInfo) pairs from
        `kd_keras.data.load_split`, to skip loading (tests).
    Returns:
      dict written to `<eval_dir>/results.json`: "model", "layer", "dataset", splits, sizes,
      "image_size", "eval_transform", "results" (a list of records, each with "protocol",
      "metric", "value" and the protocol's settings) and per-protocol details.
    """
    from kd_keras import augment, data
    from kd_keras.eval import features, knn

    t_start = time.time()
    protocols = tuple(cfg.protocols)
    unknown = [p for p in protocols if p not in config_lib.EVAL_PROTOCOLS]
    if unknown:
        raise EvaluationError(
            f"--protocols: unknown {unknown}; choose from {config_lib.EVAL_PROTOCOLS}."
        )
    run_cfg = None
    if loaded.run_dir:
        run_cfg = config_lib.config_from_json(os.path.join(loaded.run_dir, "config.json"))
    dataset = cfg.dataset or (run_cfg.data.dataset if run_cfg else "digits")
    data_dir = cfg.data_dir or (run_cfg.data.data_dir if run_cfg else None)
    train_name = cfg.train_split or (run_cfg.data.train_split if run_cfg else "train")
    eval_name = cfg.eval_split or (run_cfg.data.eval_split if run_cfg else None)
    eval_name = eval_name or (
        "test" if dataset == "digits" or dataset.startswith("tfds:") else "val"
    )
    size = cfg.image_size or loaded.image_size or (run_cfg.data.image_size if run_cfg else None)
    if size is None:
        raise EvaluationError(f"--image_size is required: {loaded.source} has no fixed input size.")
    if loaded.image_size and size != loaded.image_size:
        raise EvaluationError(
            f"--image_size={size} but {loaded.source} takes {loaded.image_size} px images."
        )
    eval_dir = cfg.eval_dir or default_eval_dir(loaded, cfg.model if cfg.model else None)
    os.makedirs(eval_dir, exist_ok=True)

    embed, layer_info = layer_embedding(loaded, cfg.eval_layer)
    needs_keras = [p for p in protocols if p.startswith("finetune") or p == "mse_cos"]
    if cfg.linear_path == "augmented" and "linear" in protocols:
        needs_keras.append("linear (augmented)")
    if needs_keras and loaded.backbone is None:
        raise EvaluationError(
            f"--protocols {needs_keras} need a Keras backbone; {loaded.source} is a bare "
            "SavedModel (use an export directory or run directory)."
        )
    if "mse_cos" in protocols and not loaded.heads:
        raise EvaluationError(
            f"--protocols=mse_cos needs the prediction heads; {loaded.source} has none "
            "(evaluate the run directory of a distillation run)."
        )

    load_kw = dict(data_dir=data_dir, image_size_hint=size)
    try:
        train_examples, train_info = train_split or data.load_split(dataset, train_name, **load_kw)
        eval_examples, eval_info = eval_split or data.load_split(dataset, eval_name, **load_kw)
    except FileNotFoundError as err:
        raise EvaluationError(str(err)) from err
    supervised = [p for p in protocols if p in SUPERVISED]
    for info in (train_info, eval_info):
        if supervised and not info.has_labels:
            raise EvaluationError(
                f"--protocols {supervised} need labels, but split '{info.split}' of "
                f"{dataset} has none."
            )

    if "knn" in protocols:
        # Checked before any feature is extracted: the memory is every n-th training example.
        n, cap = train_info.num_examples, cfg.knn_max_train
        memory_size = n if not cap or cap >= n else -(-n // -(-n // cap))
        too_big = [k for k in cfg.knn_k if k > memory_size]
        if too_big:
            raise EvaluationError(
                f"--knn_k={','.join(map(str, too_big))} exceeds the {memory_size} training "
                "examples of the k-NN memory."
            )

    def transform(image):
        return augment.center_crop(image, size)

    results = {
        "model": loaded.source,
        "run_dir": loaded.run_dir,
        "dataset": dataset,
        "train_split": train_name,
        "eval_split": eval_name,
        "num_train_split": train_info.num_examples,
        "num_eval_split": eval_info.num_examples,
        "num_classes": train_info.num_classes,
        "image_size": size,
        "eval_transform": EVAL_TRANSFORM,
        **{k: v for k, v in layer_info.items()},
        "protocols": list(protocols),
        "results": [],
    }
    common = {"layer": layer_info["layer"], "train_split": train_name, "eval_split": eval_name}

    def record(protocol, metric, value, **extra):
        if value is not None:
            results["results"].append(
                {"protocol": protocol, "metric": metric, "value": float(value), **common, **extra}
            )

    def every_nth(examples, num, cap):
        # Files are ordered by class: every n-th example (not the first `cap`) keeps every
        # class, and selecting by index before decoding skips the unused images.
        stride = 1 if not cap or cap >= num else -(-num // cap)
        if stride == 1:
            return examples
        return features.select_examples(examples, lambda ex: ex["index"] % stride == 0)

    # The test split is bounded once, for every protocol (--eval_max_test).
    test_examples = every_nth(eval_examples, eval_info.num_examples, cfg.eval_max_test)
    test_ds = data.make_eval_dataset(test_examples, transform, cfg.eval_batch_size)
    # Only k-NN reads the training features when no linear probe runs: bound them up front.
    train_cap = None if "linear" in protocols else cfg.knn_max_train
    train_eval_examples = every_nth(train_examples, train_info.num_examples, train_cap)
    feature_cache = {}

    def split_features(which):
        if which not in feature_cache:
            ds = (
                data.make_eval_dataset(train_eval_examples, transform, cfg.eval_batch_size)
                if which == "train"
                else test_ds
            )
            x, y = features.extract_features(embed, ds)
            if x.shape[1] != layer_info["feature_dim"]:
                raise EvaluationError(
                    f"the model returned {x.shape[1]}-d features for layer "
                    f"{layer_info['layer']} but declares {layer_info['feature_dim']}."
                )
            feature_cache[which] = (x, y)
        return feature_cache[which]

    if supervised:
        x_test, y_test = split_features("test")

    if "knn" in protocols:
        x_train, y_train = split_features("train")
        rows = _strided(len(y_train), cfg.knn_max_train)
        memory, memory_labels = x_train[rows], y_train[rows]
        too_big = [k for k in cfg.knn_k if k > len(rows)]
        if too_big:
            raise EvaluationError(
                f"--knn_k={','.join(map(str, too_big))} exceeds the {len(rows)} training "
                "examples of the k-NN memory."
            )
        results["knn"] = {}
        for vote in cfg.knn_votes:
            accuracy = knn.knn_accuracy(
                memory,
                memory_labels,
                x_test,
                y_test,
                ks=cfg.knn_k,
                vote=vote,
                num_classes=max(train_info.num_classes, eval_info.num_classes),
                temperature=cfg.knn_temperature,
            )
            results["knn"][vote] = accuracy
            for k in cfg.knn_k:
                extra = dict(
                    k=k,
                    vote=vote,
                    num_train=len(rows),
                    num_test=len(y_test),
                    similarity="cosine",
                )
                if vote == "weighted":
                    extra["temperature"] = cfg.knn_temperature
                record("knn", "top1", accuracy[f"knn_top1_k{k}"], **extra)
                record("knn", "top5", accuracy.get(f"knn_top5_k{k}"), **extra)

    if "linear" in protocols:
        results["linear"] = _linear(
            loaded,
            cfg,
            embed,
            split_features,
            train_examples,
            train_info,
            x_test,
            y_test,
            size,
            eval_info,
        )
        lin = results["linear"]
        for metric in ("top1", "top5"):
            record(
                "linear",
                metric,
                lin[metric],
                preset=lin["preset"],
                path=lin["path"],
                epochs=lin["epochs"],
                num_train=lin["num_train"],
                num_test=lin["num_test"],
            )

    for protocol in ("finetune1", "finetune10"):
        if protocol in protocols:
            details = _finetune(
                protocol,
                loaded,
                cfg,
                train_examples,
                train_info,
                eval_info,
                test_ds,
                transform,
                eval_dir,
                size,
            )
            results[protocol] = details
            for metric in ("top1", "top5"):
                record(
                    protocol,
                    metric,
                    details[metric],
                    fraction=details["fraction"],
                    subset_file=details["subset_file"],
                    epochs=details["epochs"],
                    num_train=details["num_train"],
                    num_test=details["num_test"],
                    layer="backbone",
                )

    if "mse_cos" in protocols:
        results["mse_cos"] = _mse_cos(loaded, test_ds, size)
        for teacher, values in results["mse_cos"].items():
            for metric in ("mse", "cos"):
                record(
                    "mse_cos",
                    metric,
                    values[metric],
                    teacher=teacher,
                    num_test=values["num_test"],
                    layer=f"head_{teacher}",
                )

    logdir = os.path.join(eval_dir, LOG_DIR)
    write_tensorboard(logdir, results["results"])
    if cfg.projector_examples and eval_info.has_labels:
        x, y = split_features("test")
        rows = _strided(len(y), cfg.projector_examples)
        results["projector"] = write_projector(
            os.path.join(logdir, "projector"), x[rows], y[rows], eval_info.class_names
        )
    if loaded.run_dir:
        plot = plot_knn_monitor(loaded.run_dir, os.path.join(eval_dir, PLOT))
        if plot:
            results["knn_monitor_plot"] = plot
    results["eval_seconds"] = round(time.time() - t_start, 1)
    results["eval_dir"] = eval_dir
    _write_json(os.path.join(eval_dir, RESULTS), results)
    return results


def _linear(
    loaded, cfg, embed, split_features, train_examples, train_info, x_test, y_test, size, eval_info
):
    from kd_keras.eval import linear_probe

    x_train, y_train = split_features("train")
    num_classes = max(train_info.num_classes, eval_info.num_classes)
    if cfg.linear_path == "cached":
        return linear_probe.train_linear_probe(
            x_train,
            y_train,
            x_test,
            y_test,
            preset=cfg.linear_preset,
            epochs=cfg.linear_epochs,
            seed=cfg.seed,
        )
    embed_model, _ = layer_embedding(_keras_only(loaded), cfg.eval_layer)
    train_examples, cache_note = cached_training_images(
        train_examples, train_info.num_examples, size
    )
    result = linear_probe.train_linear_probe_augmented(
        embed_model,
        train_examples,
        train_info.num_examples,
        x_train,
        x_test,
        y_test,
        num_classes,
        preset=cfg.linear_preset,
        image_size=size,
        epochs=cfg.linear_epochs,
        seed=cfg.seed,
    )
    result["training_images"] = cache_note or "decoded from the dataset every epoch"
    return result


# Augmented protocols decode every training image once per epoch; for datasets that fit, the
# decoded images are kept in memory instead, as uint8, downscaled (never upscaled) so that the
# shorter side is at most CACHE_SIDE_FACTOR x the crop size. Random resized crops are then cut
# from that copy: for crops of >= 1/16 of the area the crop still has at least the output
# resolution, so the views are practically those of the full-size image.
CACHE_SIDE_FACTOR = 4
CACHE_MAX_BYTES = 3 * 2**30


def cached_training_images(examples, num_examples, size):
    """(examples with uint8 images cached in memory, note) or (examples, None) when too big.

    Args:
      examples: dataset of example dicts from `kd_keras.data.load_split`.
      num_examples: its size.
      size: crop side S of the protocol.
    """
    import tensorflow as tf

    side = CACHE_SIDE_FACTOR * size
    # Upper bound for images of aspect ratio up to 4:3.
    if num_examples * side * (side * 4 // 3) * 3 > CACHE_MAX_BYTES:
        return examples, None

    def shrink(ex):
        image = ex["image"]
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.minimum(1.0, side / tf.reduce_min(shape))
        new = tf.cast(tf.round(shape * scale), tf.int32)
        image = tf.cond(
            scale < 1.0,
            lambda: tf.image.resize(image, new, method="bilinear", antialias=True),
            lambda: image,
        )
        image = tf.image.convert_image_dtype(tf.clip_by_value(image, 0.0, 1.0), tf.uint8)
        return {**ex, "image": image}

    cached = examples.map(shrink, num_parallel_calls=tf.data.AUTOTUNE).cache()
    return cached, f"decoded once, kept as uint8 with shorter side <= {side} px"


def _keras_only(loaded):
    return dataclasses.replace(loaded, serve=None)


def _finetune(
    protocol,
    loaded,
    cfg,
    train_examples,
    train_info,
    eval_info,
    test_ds,
    transform,
    eval_dir,
    size,
):
    import numpy as np
    import tensorflow as tf

    from kd_keras.eval import features, finetune, subsets

    preset = finetune.PRESETS[protocol]
    labels = label_array(train_examples, train_info.num_examples)
    indices = subsets.label_subset(labels, preset.fraction, seed=cfg.seed)
    subset_file = os.path.join(eval_dir, f"subset_{protocol}_seed{cfg.seed}.json")
    subsets.save_subset(subset_file, indices, labels, preset.fraction, cfg.seed)
    keep = np.zeros(len(labels), bool)
    keep[indices] = True
    keep_t = tf.constant(keep)
    chosen = features.select_examples(train_examples, lambda ex: tf.gather(keep_t, ex["index"]))
    chosen, cache_note = cached_training_images(chosen, len(indices), size)
    # The same test examples as the other protocols (every n-th with --eval_max_test).
    details = finetune.finetune(
        loaded.backbone,
        chosen,
        len(indices),
        test_ds,
        num_classes=max(train_info.num_classes, eval_info.num_classes),
        preset=preset,
        image_size=size,
        epochs=cfg.finetune_epochs,
        batch_size=cfg.finetune_batch_size,
        seed=cfg.seed,
    )
    details.update(fraction=preset.fraction, subset_file=subset_file, subset_seed=cfg.seed)
    details["training_images"] = cache_note or "decoded from the dataset every epoch"
    return details


def label_array(examples, num_examples):
    """int64 [N] labels indexed by the examples' "index" (images are not decoded)."""
    import numpy as np

    from kd_keras import data

    lazy = getattr(examples, data._LAZY_ATTR, None)
    labels = np.full(num_examples, -1, np.int64)
    source = examples
    if lazy is not None and {"label", "index"} <= set(lazy.records.element_spec):
        source = lazy.records  # labels without decoding the images
    for batch in source.map(lambda ex: (ex["index"], ex["label"])).batch(4096):
        labels[batch[0].numpy()] = batch[1].numpy()
    if np.any(labels < 0):
        raise EvaluationError("some training examples have no label; fine-tuning needs labels.")
    return labels


def _mse_cos(loaded, test_ds, size):
    """Per teacher: mean ||p/|p| - t/|t|||^2 and mean cos(p, t) of head output p, teacher t."""
    import numpy as np
    import tensorflow as tf

    if not loaded.run_dir:
        raise EvaluationError("--protocols=mse_cos needs a run directory (teachers come from it).")
    out = {}
    for teacher in load_run_teachers(loaded.run_dir, size):
        head_name = f"head_{teacher.name}"
        if head_name not in loaded.heads:
            raise EvaluationError(
                f"--protocols=mse_cos: no head {head_name!r} for teacher {teacher.name!r} "
                f"(heads: {sorted(loaded.heads)})."
            )
        head = loaded.heads[head_name]

        @tf.function(reduce_retracing=True)
        def pair(images, head=head, teacher=teacher):
            p = tf.math.l2_normalize(head(loaded.backbone(images, training=False)), axis=-1)
            t = tf.math.l2_normalize(teacher(images), axis=-1)
            return tf.reduce_sum(tf.square(p - t), -1), tf.reduce_sum(p * t, -1)

        mse, cos = [], []
        for batch in test_ds:
            m, c = pair(batch["image"])
            mse.append(m.numpy())
            cos.append(c.numpy())
        mse, cos = np.concatenate(mse), np.concatenate(cos)
        out[teacher.name] = {
            "mse": float(mse.mean()),
            "cos": float(cos.mean()),
            "num_test": int(mse.shape[0]),
            "definition": "mse = mean ||p/|p| - t/|t|||^2 (SimReg loss), cos = mean cos(p, t)",
        }
    return out


def default_eval_dir(loaded, model_path=None):
    """<run>/eval for runs, otherwise <model>_eval next to the model."""
    if loaded.run_dir and (model_path is None or model_path.rstrip("/") == loaded.run_dir):
        return os.path.join(loaded.run_dir, "eval")
    base = (model_path or "in_memory_model").rstrip("/")
    return f"{base.removesuffix('.keras')}_eval"


# --------------------------------------------------------------------------------------------
# Outputs.


def tensorboard_tag(rec):
    """'knn/majority_k20_top1', 'linear/simreg_cached_features_top1', ..."""
    parts = [rec["protocol"]]
    if rec["protocol"] == "knn":
        name = f"{rec['vote']}_k{rec['k']}_{rec['metric']}"
    elif rec["protocol"] == "linear":
        name = f"{rec['preset']}_{rec['path']}_{rec['metric']}"
    elif rec["protocol"] == "mse_cos":
        name = f"{rec['teacher']}_{rec['metric']}"
    else:
        name = rec["metric"]
    parts.append(name)
    return "/".join(parts)


def write_tensorboard(logdir, records, step=0):
    """One scalar per result record (see `tensorboard_tag`) at `step`."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for rec in records:
            tf.summary.scalar(tensorboard_tag(rec), rec["value"], step=step)
    writer.flush()


def write_projector(logdir, feats, labels, class_names=()):
    """TensorBoard projector data: features [n, D] as a checkpointed variable + label metadata."""
    import tensorflow as tf
    from tensorboard.plugins import projector

    os.makedirs(logdir, exist_ok=True)
    with open(os.path.join(logdir, "metadata.tsv"), "w") as f:
        f.write("label\tclass\n")
        for y in labels:
            name = class_names[y] if 0 <= y < len(class_names) else str(y)
            f.write(f"{int(y)}\t{name}\n")
    embedding = tf.Variable(feats, name="embedding")
    tf.train.Checkpoint(embedding=embedding).save(os.path.join(logdir, "embedding.ckpt"))
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    entry.metadata_path = "metadata.tsv"
    projector.visualize_embeddings(logdir, config)
    return {"logdir": logdir, "num_examples": int(feats.shape[0]), "dim": int(feats.shape[1])}


def plot_knn_monitor(run_dir, path):
    """Draws the k-NN monitor curve of a run as a PNG; returns the path, or None without data."""
    from kd_keras.callbacks import KNN_MONITOR_FILE, read_knn_history

    entries = read_knn_history(os.path.join(run_dir, KNN_MONITOR_FILE))
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(
        {k for e in entries for k in e if k.startswith("knn_top1_")},
        key=lambda k: int(k.rsplit("k", 1)[1]),
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(e["epoch"], e[key]) for e in entries if key in e]
        ax.plot(*zip(*points, strict=True), marker="o", label=f"top-1, k={key.rsplit('k', 1)[1]}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("k-NN accuracy (monitor subset)")
    ax.set_title(f"k-NN monitor: {os.path.basename(run_dir.rstrip('/'))}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(results):
    """The results as a fixed-width text table."""
    lines = [
        f"{results['model']} | layer {results['layer']} | {results['dataset']} "
        f"{results['train_split']} ({results['num_train_split']}) -> {results['eval_split']} "
        f"({results['num_eval_split']})",
        f"{'protocol':<11} {'setting':<34} {'metric':<6} {'value':>7}  train/test",
    ]
    for rec in results["results"]:
        if rec["protocol"] == "knn":
            setting = f"{rec['vote']} k={rec['k']}"
        elif rec["protocol"] == "linear":
            setting = f"{rec['preset']} {rec['path']} {rec['epochs']} ep"
        elif rec["protocol"].startswith("finetune"):
            setting = f"{rec['fraction']:.0%} labels, {rec['epochs']} ep"
        else:
            setting = f"teacher {rec['teacher']}"
        sizes = f"{rec.get('num_train', '-')}/{rec.get('num_test', '-')}"
        lines.append(
            f"{rec['protocol']:<11} {setting:<34} {rec['metric']:<6} {rec['value']:>7.4f}  {sizes}"
        )
    return "\n".join(lines)


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from kd_keras import cli

    cli.quiet_logging()
    errors = (EvaluationError, ValueError, FileNotFoundError)
    with cli.one_line_errors(PROG, errors, first_line=True):
        cfg = config_lib.evaluate_config_from_flags(flags.FLAGS)
        loaded = load_model(cfg.model, from_checkpoint=cfg.from_checkpoint)
        results = evaluate(loaded, cfg)
    print(format_table(results))
    print(f"results: {os.path.join(results['eval_dir'], RESULTS)}")
    if "knn_monitor_plot" in results:
        print(f"k-NN monitor plot: {results['knn_monitor_plot']}")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main, flags_parser=functools.partial(config_lib.parse_command_line, prog=PROG))
