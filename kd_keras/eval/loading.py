"""What `--model` names, loaded for evaluation: a `LoadedModel` (backbone, heads, serving fn).

A run directory (its export, or with `--from_checkpoint` the newest checkpoint rebuilt from
config.json), an export directory, a bare SavedModel or a .keras file; also the frozen teachers
a run was distilled from (for the mse_cos protocol).
"""

import contextlib
import dataclasses
import json
import os
import tempfile
import warnings

import keras

from kd_keras import config as config_lib
from kd_keras.eval import EvaluationError


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
    def from_keras(
        cls, backbone, heads=None, run_dir=None, source="in-memory model", image_size=None
    ):
        """Wraps an in-memory backbone (and optional heads list or dict).

        `image_size` is required for a backbone that takes any input size (SwAV/OSS students
        are built so, for their two crop sizes); otherwise it is the backbone's input side.
        """
        if heads is not None and not isinstance(heads, dict):
            heads = {h.name: h for h in heads}
        shape = backbone.input_shape
        any_side = len(shape) == 4 and shape[1] is None and shape[2] is None
        if any_side:
            # A backbone of any input size (a converted teacher, a multi-crop student): the
            # caller's size, else None and evaluation takes --image_size or the run's.
            side = None if image_size is None else int(image_size)
        else:
            side = _input_side(shape, source)
            if image_size is not None and side != image_size:
                raise EvaluationError(f"{source}: takes {side} px images, not {image_size}.")
        loaded = cls(
            backbone=backbone,
            serve=None,
            heads=dict(heads or {}),
            image_size=side,
            feature_dim=int(backbone.output_shape[-1]),
            source=source,
            run_dir=run_dir,
        )
        _check_heads(loaded)
        return loaded


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
    from kd_keras.artifacts import export

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
    # Imported for their registered Keras classes (layers of backbones, heads, probes).
    from kd_keras.eval import layers, linear_probe  # noqa: F401
    from kd_keras.nets import backbones, heads, vit  # noqa: F401

    try:
        return keras.models.load_model(path, compile=False)
    # A half-written file fails deep inside zipfile/h5py with whatever they raise
    # (BadZipFile, IndexError, ...): every failure to load is the file's fault here.
    except Exception as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise EvaluationError(f"--model: cannot load {path}: {reason}") from err


def _load_heads(export_dir):
    """The export's heads/, every file's failure one line naming it."""
    from kd_keras.artifacts import export

    heads_dir = os.path.join(export_dir, export.HEADS_DIR)
    if not os.path.isdir(heads_dir):
        return {}
    return {
        name.removesuffix(".keras"): _load_keras(os.path.join(heads_dir, name))
        for name in sorted(os.listdir(heads_dir))
        if name.endswith(".keras")
    }


def _load_export(export_dir):
    """`LoadedModel` of an export directory (SavedModel, backbone.keras, heads/), checked."""
    from kd_keras.artifacts import export

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
    manifest_path = os.path.join(export_dir, export.MANIFEST)
    manifest = {}
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            try:
                manifest = json.load(f)
            except ValueError as err:
                raise EvaluationError(f"--model: {manifest_path} is not valid JSON ({err}).") from err
        if not isinstance(manifest, dict):
            raise EvaluationError(f"--model: {manifest_path} is not a JSON object.")
    any_side = backbone is None or (
        len(backbone.input_shape) == 4 and backbone.input_shape[1] is None
    )
    if not size and any_side and manifest.get("image_size"):
        # Multi-crop backbones (SwAV, OSS) take any side; the export records the trained one.
        size = int(manifest["image_size"])
    elif not size and backbone is not None:
        size = _input_side(backbone.input_shape, keras_file)
    if manifest:
        stored = manifest.get("feature_dim")
        if stored is not None and int(stored) != dim:
            raise EvaluationError(
                f"--model: {manifest_path} records feature_dim={stored} but the SavedModel "
                f"gives {dim}-d features."
            )
    loaded = LoadedModel(
        backbone=backbone,
        serve=serve,
        heads=_load_heads(export_dir),
        image_size=size,
        feature_dim=dim,
        source=f"export {export_dir}",
    )
    _check_heads(loaded)
    return loaded


def run_teacher_specs(run_dir, cfg=None):
    """The run's teachers as `TeacherSpec`s, recipe teachers resolved to their run directory."""
    from kd_keras.teachers import loading as teachers_lib

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
    """Loads the frozen teachers a run was distilled from (`kd_keras.teachers.loading.Teacher`s)."""
    from kd_keras.teachers import loading as teachers_lib

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
    from kd_keras.artifacts import checkpointing

    steps = checkpointing.available_steps(directory)
    if steps:
        return checkpointing.checkpoint_files(directory)[steps[0]]
    legacy = os.path.join(directory, "latest.weights.h5")
    return legacy if os.path.isfile(legacy) else None


@contextlib.contextmanager
def _checkpoint_snapshot(directory):
    """A private copy of the newest checkpoint (path, or None), so a training run that rotates
    its checkpoints meanwhile cannot remove the file while it is read; deleted afterwards."""
    from kd_keras.artifacts import checkpointing

    with tempfile.TemporaryDirectory(prefix="kd_keras_eval_") as tmp:
        copied = checkpointing.copy_newest(directory, os.path.join(tmp, "ckpt.weights.h5"))
        if copied is not None:
            yield copied[1], f"checkpoint of step {copied[0]} in {directory}"
        else:
            legacy = latest_checkpoint(directory)
            yield legacy, f"checkpoint {legacy}"


def _load_run_checkpoint(run_dir):
    """The student and heads of run `run_dir`, rebuilt from config.json, weights from its newest
    checkpoint (a private copy, see `_checkpoint_snapshot`)."""
    cfg = config_lib.config_from_json(os.path.join(run_dir, "config.json"))
    # sync_bn only matters when training across replicas; plain BN loads the same weights.
    cfg = dataclasses.replace(cfg, sync_bn=False)
    checkpoint_dir = _checkpoint_dir(run_dir)
    with _checkpoint_snapshot(checkpoint_dir) as (weights, source):
        if weights is None:
            raise EvaluationError(
                f"--model: run {run_dir} has neither an export/ nor a checkpoint in "
                f"{checkpoint_dir}."
            )
        size = cfg.data.image_size
        student, method = _rebuild_method(cfg, run_dir, size)
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
        image_size=size,
    )


def _checkpoint_dir(run_dir):
    from kd_keras.artifacts import layout

    return os.path.join(run_dir, layout.CHECKPOINT_DIR)


def _rebuild_method(cfg, run_dir, image_size):
    """(student, un-built method keras.Model) of run `cfg`, ready for its checkpoint's weights.

    The one place evaluation rebuilds a training method, through the method registry (not
    `kd_keras.train`): methods with feature teachers get the run's teachers (they fix the
    heads' output sizes); a method with a `frozen_teacher` (oss_offline: backbone, head and
    prototypes) has it loaded from --teacher by the registry, as training loaded it; the
    others need no teacher.
    """
    from kd_keras.methods import registry

    spec = registry.get(cfg.method)
    # The run directory stands in for the workdir: a torch: teacher was converted there.
    cfg = dataclasses.replace(cfg, workdir=run_dir)
    teachers = load_run_teachers(run_dir, image_size) if spec.teacher_features else []
    student = registry.build_student(cfg, image_size)
    method = registry.build_method(cfg, student, teachers, num_classes=_run_num_classes(cfg))
    return student, method


def _run_num_classes(cfg):
    """Classes of a supervised run's training split (its classifier's width); 0 otherwise."""
    from kd_keras.data import sources as data
    from kd_keras.methods import registry

    if not registry.get(cfg.method).needs_labels:
        return 0

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
