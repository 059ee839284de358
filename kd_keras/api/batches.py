"""What the distillers' `fit` accepts, turned into the dict batches the methods train on.

Accepted (`ACCEPTED`): image batches [B, H, W, 3] (float in [0, 1] or uint8), (images,
labels) pairs, or dict batches {"student": ...} / {"large": ...}, as a tf.data.Dataset of
batches; or NumPy arrays / tensors of all images [N, H, W, 3] (with optional labels), which
are batched here. Everything is checked on the structure alone, before Keras sees a batch,
so a wrong input raises here and leaves the distiller untouched.
"""

import dataclasses

import numpy as np
import tensorflow as tf

ACCEPTED = (
    "fit accepts: a tf.data.Dataset of image batches [B, H, W, 3] (float in [0, 1] or uint8), "
    "of (images, labels) pairs, or of dict batches {'student': images, ...}; or a NumPy array "
    "/ tensor of images [N, H, W, 3] (labels as y=), a tuple (images, labels) of arrays, or a "
    "dict of arrays {'student': ...}"
)
DICT_KEYS = ("student", "large")
DEFAULT_BATCH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A dataset of dict batches and what is known of the data behind it."""

    dataset: tf.data.Dataset
    batch_size: int
    num_examples: int | None  # None: not known (an infinite or unsized dataset)


def _wrong(what):
    return TypeError(f"{what}. {ACCEPTED}.")


def _check_images(spec, where):
    shape = spec.shape
    if shape.rank != 4 or shape[-1] != 3:
        raise ValueError(
            f"{where} must be images [batch, height, width, 3], got shape {shape}. {ACCEPTED}."
        )
    if not (spec.dtype.is_floating or spec.dtype == tf.uint8):
        raise ValueError(
            f"{where} must be float in [0, 1] or uint8, got {spec.dtype.name}. {ACCEPTED}."
        )


def _check_labels(spec, where):
    if spec.shape.rank != 1 or not spec.dtype.is_integer:
        raise ValueError(
            f"{where} must be integer class labels [batch], got {spec.dtype.name} of shape "
            f"{spec.shape}. {ACCEPTED}."
        )


def _batch_spec(element_spec):
    """(kind, spec) with kind "images", "pair" or "dict"; raises on anything else."""
    if isinstance(element_spec, tf.TensorSpec):
        _check_images(element_spec, "each batch")
        return "images"
    if isinstance(element_spec, tuple) and len(element_spec) == 2:
        images, labels = element_spec
        if isinstance(images, tf.TensorSpec) and isinstance(labels, tf.TensorSpec):
            _check_images(images, "the images of each (images, labels) batch")
            _check_labels(labels, "the labels of each (images, labels) batch")
            return "pair"
    if isinstance(element_spec, dict):
        if not any(k in element_spec for k in DICT_KEYS):
            raise ValueError(
                f"a dict batch needs a 'student' (or multi-crop 'large') entry, got keys "
                f"{sorted(element_spec)}. {ACCEPTED}."
            )
        return "dict"
    raise _wrong(f"got a dataset of {element_spec}")


def _as_array_dataset(x, y):
    """(dataset of unbatched examples, N) from arrays, numbered by "index"."""
    if isinstance(x, dict):
        arrays = {k: np.asarray(v) if not tf.is_tensor(v) else v for k, v in x.items()}
        if not any(k in arrays for k in DICT_KEYS):
            raise ValueError(f"a dict of arrays needs a 'student' entry. {ACCEPTED}.")
        n = int(next(iter(arrays.values())).shape[0])
        if "index" not in arrays:
            arrays["index"] = np.arange(n, dtype=np.int64)
        ds = tf.data.Dataset.from_tensor_slices(arrays)
        return ds, n, "dict"
    images = x if tf.is_tensor(x) else np.asarray(x)
    _check_images(tf.TensorSpec(images.shape, tf.as_dtype(images.dtype)), "the images")
    n = int(images.shape[0])
    columns = {"image": images, "index": np.arange(n, dtype=np.int64)}
    if y is not None:
        labels = y if tf.is_tensor(y) else np.asarray(y)
        _check_labels(tf.TensorSpec(labels.shape, tf.as_dtype(labels.dtype)), "y")
        if int(labels.shape[0]) != n:
            raise ValueError(f"y has {labels.shape[0]} labels for {n} images.")
        columns["label"] = labels
    return tf.data.Dataset.from_tensor_slices(columns), n, "columns"


def _dataset_batch_size(ds, kind):
    """The batch size of a dataset of batches (static, else read from its first batch)."""
    spec = ds.element_spec
    first = spec if kind == "images" else spec[0] if kind == "pair" else None
    if kind == "dict":
        first = spec.get("student", spec.get("large"))
    if first.shape[0] is not None:
        return int(first.shape[0])
    element = next(iter(ds.take(1)))
    value = (
        element
        if kind == "images"
        else element[0]
        if kind == "pair"
        else (element.get("student", element.get("large")))
    )
    return int(value.shape[0])


def _num_examples(ds, batch_size):
    cardinality = int(ds.cardinality())
    return cardinality * batch_size if cardinality > 0 else None


def prepare(x, y=None, batch_size=None, shuffle=True, views=None, keep_images=False):
    """A `Prepared` of dict batches {"student" | "large"/"small", "label"?, "index"?}.

    Args:
      x, y: what the user gave `fit` (see `ACCEPTED`); y only with arrays.
      batch_size: for arrays (default 32, at most N); must be None for datasets.
      shuffle: shuffle arrays each epoch (datasets are used in their own order).
      views: `kd_keras.api.views.Views` applied to image batches, or None (images as given,
        converted to float32 in [0, 1]). Dict batches are never changed.
      keep_images: with views=None, keep the raw images under "image" (the training step
        makes the views).
    Raises:
      TypeError / ValueError listing the accepted forms.
    """
    if x is None:
        raise _wrong("got no data")
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError(f"y= goes with arrays; a dataset carries its own labels. {ACCEPTED}.")
        if batch_size is not None:
            raise ValueError(f"batch_size= goes with arrays; batch the dataset itself. {ACCEPTED}.")
        kind = _batch_spec(x.element_spec)
        size = _dataset_batch_size(x, kind)
        ds = x.map(_columns(kind), num_parallel_calls=tf.data.AUTOTUNE)
        examples = _num_examples(x, size)
    else:
        if isinstance(x, tuple) and len(x) == 2 and y is None:
            x, y = x
        if isinstance(x, (list, tuple)) or not (
            isinstance(x, (np.ndarray, dict)) or tf.is_tensor(x)
        ):
            raise _wrong(f"got {type(x).__name__}")
        ds, examples, kind = _as_array_dataset(x, y)
        size = min(int(batch_size or DEFAULT_BATCH_SIZE), examples)
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if shuffle:
            ds = ds.shuffle(examples, reshuffle_each_iteration=True)
        # Whole batches only: the methods' banks take fixed-size pushes.
        ds = ds.batch(size, drop_remainder=True)
    ds = ds.map(_make_views(views, keep_images), num_parallel_calls=tf.data.AUTOTUNE)
    return Prepared(ds.prefetch(tf.data.AUTOTUNE), size, examples)


def _columns(kind):
    """Dataset element -> {"image", "label"?} (dicts pass through)."""
    if kind == "images":
        return lambda images: {"image": images}
    if kind == "pair":
        return lambda images, labels: {"image": images, "label": labels}
    return lambda batch: batch


def _to_unit_float(images):
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


def _make_views(views, keep_images):
    def fn(batch):
        if "image" not in batch or keep_images:  # a dict batch: the user's own views
            return batch
        out = {k: v for k, v in batch.items() if k != "image"}
        images = batch["image"]
        if views is not None:
            out.update(views(images))
        else:
            out["student"] = _to_unit_float(images)
        return out

    return fn


def images_only(x, batch_size=None):
    """For `predict`: a dataset of float image batches from any accepted form."""
    prepared = prepare(x, batch_size=batch_size, shuffle=False, views=None)
    if isinstance(x, np.ndarray) or tf.is_tensor(x):
        # predict keeps every image: re-batch without dropping the remainder.
        images = _to_unit_float(tf.convert_to_tensor(x))
        return tf.data.Dataset.from_tensor_slices(images).batch(
            int(batch_size or DEFAULT_BATCH_SIZE)
        )
    return prepared.dataset.map(lambda b: b["student"])
