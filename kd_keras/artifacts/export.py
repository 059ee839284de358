"""Export of the student backbone (prediction heads dropped) as SavedModel and .keras."""

import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

SAVED_MODEL_DIR = "saved_model"
KERAS_FILE = "backbone.keras"
MANIFEST = "manifest.json"
HEADS_DIR = "heads"


def export_backbone(backbone, export_dir, metadata=None, heads=None):
    """Writes `backbone` to `export_dir` atomically.

    Layout: `export_dir/saved_model/` (SavedModel; signature `serving_default` maps images
    float32 [B, H, W, 3] in [0, 1] to {"output_0": features float32 [B, m]}),
    `export_dir/backbone.keras` (the Keras model, for fine-tuning or as a later teacher) and
    `export_dir/manifest.json` (input size, feature dim, metadata). When `heads` (keras Models
    [B, m] -> [B, d], e.g. SimReg's prediction heads) are given, each is also saved as
    `export_dir/heads/<head name>.keras` and listed in the manifest under "heads", so that
    evaluation can read features from any head layer; the SavedModel stays heads-free.

    Everything is written to a temporary sibling directory first and renamed into place, so an
    interrupted or failed export never leaves a half-written `export_dir`; an existing export is
    replaced only once the new one is complete.

    Returns:
      export_dir (absolute path).
    """
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_exports(parent)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        _float32_outputs(backbone).export(
            os.path.join(tmp, SAVED_MODEL_DIR), format="tf_saved_model", verbose=False
        )
        backbone.save(os.path.join(tmp, KERAS_FILE))
        head_names = []
        for head in heads or ():
            os.makedirs(os.path.join(tmp, HEADS_DIR), exist_ok=True)
            head.save(os.path.join(tmp, HEADS_DIR, f"{head.name}.keras"))
            head_names.append(head.name)
        manifest = {
            "input_shape": list(backbone.input_shape[1:]),
            "input_range": [0.0, 1.0],
            "feature_dim": int(backbone.output_shape[-1]),
            "signature": "serving_default",
            "heads": head_names,
            **(metadata or {}),
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        old = None
        if os.path.exists(export_dir):
            old = f"{tmp}-old"
            os.replace(export_dir, old)
        os.replace(tmp, export_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return export_dir


def _remove_stale_exports(parent):
    """Removes `.export-*` directories a killed export left in `parent` (one run owns a workdir
    at a time, so no other export is in progress there)."""
    for name in os.listdir(parent):
        if name.startswith(".export-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _float32_outputs(backbone):
    """`backbone`, or a wrapper casting its features to float32 when it was built under a
    mixed-precision policy (the SavedModel promises float32 features)."""
    if keras.backend.standardize_dtype(backbone.output.dtype) == "float32":
        return backbone
    inputs = keras.Input(backbone.input_shape[1:], dtype="float32", name="images")
    # A float32 layer casts its floating inputs to its compute dtype.
    features = keras.layers.Identity(dtype="float32", name="features_float32")(backbone(inputs))
    return keras.Model(inputs, features, name=backbone.name)


def load_exported(export_dir):
    """Loads an exported SavedModel; returns a function images [B, H, W, 3] -> features [B, m]."""
    path = os.path.join(export_dir, SAVED_MODEL_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No exported SavedModel at {path}.")
    loaded = tf.saved_model.load(path)
    if "serving_default" not in loaded.signatures:
        raise ValueError(f"{path} has no 'serving_default' signature.")
    signature = loaded.signatures["serving_default"]

    def embed(images):
        out = signature(tf.convert_to_tensor(images, tf.float32))
        return next(iter(out.values()))

    embed.loaded = loaded  # keeps the SavedModel's resources alive
    return embed


def load_exported_keras(export_dir):
    """Loads `backbone.keras` from an export directory (a trainable keras.Model)."""
    from kd_keras.nets import vit  # noqa: F401  (registers the ViT students' layers)

    return keras.models.load_model(os.path.join(export_dir, KERAS_FILE), compile=False)


def load_exported_heads(export_dir):
    """Loads the prediction heads saved by `export_backbone`: {head name: keras.Model}."""
    path = os.path.join(export_dir, HEADS_DIR)
    if not os.path.isdir(path):
        return {}
    from kd_keras.nets import heads as _heads  # noqa: F401  (registers the heads' custom layers)

    return {
        name.removesuffix(".keras"): keras.models.load_model(
            os.path.join(path, name), compile=False
        )
        for name in sorted(os.listdir(path))
        if name.endswith(".keras")
    }
