"""Feature extraction from an embedding function over a labelled tf.data split."""

import numpy as np
import tensorflow as tf


def extract_features(embed_fn, dataset, max_examples=None):
    """Runs `embed_fn` over `dataset` and gathers features and labels as NumPy arrays.

    Args:
      embed_fn: callable images float32 [B, H, W, 3] -> features [B, m] (a keras.Model, an
        exported SavedModel function, a Teacher, ...). Keras models are called with
        training=False.
      dataset: tf.data of dicts with "image" [B, H, W, 3] and "label" [B].
      max_examples: stop after this many examples (None: all).
    Returns:
      (features float32 [N, m], labels int64 [N]).
    """
    call = _as_inference_fn(embed_fn)
    feats, labels, seen = [], [], 0
    for batch in dataset:
        f = call(batch["image"])
        feats.append(np.asarray(f, dtype=np.float32))
        labels.append(np.asarray(batch["label"], dtype=np.int64))
        seen += feats[-1].shape[0]
        if max_examples is not None and seen >= max_examples:
            break
    if not feats:
        raise ValueError("The evaluation dataset is empty: no features were extracted.")
    features = np.concatenate(feats)
    labels = np.concatenate(labels)
    if max_examples is not None:
        features, labels = features[:max_examples], labels[:max_examples]
    if features.ndim != 2:
        raise ValueError(f"The embedding function returned shape {features.shape}, not [N, dim].")
    if not np.all(np.isfinite(features)):
        raise ValueError("The embedding function returned non-finite features (NaN or inf).")
    return features, labels


def _as_inference_fn(embed_fn):
    import keras

    if isinstance(embed_fn, keras.Model):
        model = embed_fn

        # One trace for every batch size (the last batch is usually smaller).
        @tf.function(input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)])
        def call(images):
            return model(images, training=False)

        return call
    # Teachers, SavedModel signatures and plain functions: compile once per input shape.
    return tf.function(embed_fn, reduce_retracing=True)


def select_examples(examples, predicate):
    """`examples.filter(predicate)` that filters BEFORE decoding when `examples` is lazy.

    `kd_keras.data.load_split` returns datasets that carry their undecoded records (file names
    plus "label" and "index"); filtering those keeps `make_train_dataset`'s decode-after-shuffle
    fast path and avoids decoding images that are thrown away.

    Args:
      examples: dataset from `load_split`.
      predicate: fn(example dict with at least "label" and "index") -> bool tensor.
    """
    from kd_keras import data

    lazy = getattr(examples, data._LAZY_ATTR, None)
    if lazy is not None and {"label", "index"} <= set(lazy.records.element_spec):
        return data._lazy_examples(lazy.records.filter(predicate), lazy.decode)
    return examples.filter(predicate)
