"""Data of the evaluation protocols: feature extraction from an embedding function over a
labelled tf.data split, every-n-th subsampling, label arrays, in-memory training images."""

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

    `kd_keras.data.sources.load_split` returns datasets that carry their undecoded records (file names
    plus "label" and "index"); filtering those keeps `make_train_dataset`'s decode-after-shuffle
    fast path and avoids decoding images that are thrown away.

    Args:
      examples: dataset from `load_split`.
      predicate: fn(example dict with at least "label" and "index") -> bool tensor.
    """
    from kd_keras.data import sources as data

    lazy = data.lazy_source(examples)
    if lazy is not None and {"label", "index"} <= set(lazy.records.element_spec):
        return data._lazy_examples(lazy.records.filter(predicate), lazy.decode)
    return examples.filter(predicate)


# Every n-th example. Image folders list their files class by class, so the first `cap` examples
# would miss classes; every s-th example (s = ceil(num / cap)) keeps all of them. The selection is
# by the examples' "index" (their position in the split), so it is the same whether it is made
# on rows of features (`every_nth_indices`) or on the examples before decoding
# (`every_nth_examples`).


def every_nth_stride(num, cap):
    """Stride s >= 1 such that rows 0, s, 2s, ... of `num` rows are at most `cap` of them.

    Args:
      num: number of rows (>= 0).
      cap: maximum kept, or None / 0 for no bound.
    Returns:
      int: 1 when nothing is dropped, else ceil(num / cap).
    """
    if not cap or cap >= num:
        return 1
    return -(-num // cap)


def every_nth_indices(num, cap):
    """int64 [n] row indices 0, s, 2s, ... < num with s = `every_nth_stride(num, cap)`."""
    return np.arange(0, num, every_nth_stride(num, cap), dtype=np.int64)


def every_nth_count(num, cap):
    """How many rows `every_nth_indices(num, cap)` keeps (ceil(num / s)), without building it."""
    return -(-num // every_nth_stride(num, cap)) if num > 0 else 0


def every_nth_examples(examples, num, cap):
    """The examples whose "index" is a multiple of `every_nth_stride(num, cap)`.

    Args:
      examples: dataset of example dicts with "index" (from `kd_keras.data.sources.load_split`; a lazy
        one is filtered before decoding, see `select_examples`).
      num: its size; cap: as in `every_nth_stride`.
    Returns:
      `examples` itself when nothing is dropped, else the filtered dataset.
    """
    stride = every_nth_stride(num, cap)
    if stride == 1:
        return examples
    return select_examples(examples, lambda ex: ex["index"] % stride == 0)


def label_array(examples, num_examples):
    """int64 [N] labels indexed by the examples' "index" (images are not decoded).

    Raises:
      EvaluationError: some example has no label.
    """
    from kd_keras.data import sources as data
    from kd_keras.eval import EvaluationError

    lazy = data.lazy_source(examples)
    labels = np.full(num_examples, -1, np.int64)
    source = examples
    if lazy is not None and {"label", "index"} <= set(lazy.records.element_spec):
        source = lazy.records  # labels without decoding the images
    for batch in source.map(lambda ex: (ex["index"], ex["label"])).batch(4096):
        labels[batch[0].numpy()] = batch[1].numpy()
    if np.any(labels < 0):
        raise EvaluationError("some training examples have no label; fine-tuning needs labels.")
    return labels


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
      examples: dataset of example dicts from `kd_keras.data.sources.load_split`.
      num_examples: its size.
      size: crop side S of the protocol.
    """
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
