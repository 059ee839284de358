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


def export_backbone(backbone, export_dir, metadata=None):
    """Writes `backbone` to `export_dir` atomically.

    Layout: `export_dir/saved_model/` (SavedModel; signature `serving_default` maps images
    float32 [B, H, W, 3] in [0, 1] to {"output_0": features float32 [B, m]}),
    `export_dir/backbone.keras` (the Keras model, for fine-tuning or as a later teacher) and
    `export_dir/manifest.json` (input size, feature dim, metadata).

    Everything is written to a temporary sibling directory first and renamed into place, so an
    interrupted or failed export never leaves a half-written `export_dir`; an existing export is
    replaced only once the new one is complete.

    Returns:
      export_dir (absolute path).
    """
    export_dir = os.path.abspath(export_dir)
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        backbone.export(os.path.join(tmp, SAVED_MODEL_DIR), format="tf_saved_model", verbose=False)
        backbone.save(os.path.join(tmp, KERAS_FILE))
        manifest = {
            "input_shape": list(backbone.input_shape[1:]),
            "input_range": [0.0, 1.0],
            "feature_dim": int(backbone.output_shape[-1]),
            "signature": "serving_default",
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
    return keras.models.load_model(os.path.join(export_dir, KERAS_FILE), compile=False)
