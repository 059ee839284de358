"""Linear-probe evaluation of frozen features (SimReg supplement B.4, OSS appendix A.3).

A single linear layer is trained with labels on top of frozen features and its test accuracy
is reported. Two protocols are provided as `PRESETS`:

* ``"simreg"`` (SimReg B.4, following CompRess): every feature vector is l2-normalised, then
  each dimension is shifted and scaled to zero mean and unit variance with statistics fixed from
  the training set (`FeatureStandardization`); SGD, lr 0.01, momentum 0.9, 40 epochs, lr x0.1
  at epochs 15 and 30, batch 256, no weight decay.
* ``"swav"`` (OSS A.3, SwAV's eval_linear): no feature normalisation; SGD, momentum 0.9,
  lr 0.3 with cosine decay to 0 over 100 epochs (updated once per epoch, like PyTorch's
  CosineAnnealingLR stepped per epoch), weight decay 1e-6, batch 256.

Two paths, and results say which one was used (``"path"``):

* fast, ``"cached_features"`` (`train_linear_probe`): trains on CACHED features, one feature
  vector per image extracted once from the centre crop (`kd_keras.eval.features.extract_features`).
  Cached-feature probes are usually somewhat below the faithful numbers and must not be quoted
  as the papers' protocol.
* faithful, ``"augmented_images"`` (`train_linear_probe_augmented`): every epoch feeds freshly
  augmented images (RandomResizedCrop with area 0.08-1 + horizontal flip, the papers'
  torchvision transforms) through the frozen network; the standardisation statistics of the
  "simreg" preset come from the centre-crop features of the training set.

Both report the accuracy on centre crops of the test split.

Optimisation details (PyTorch semantics, since both papers use torch.optim.SGD):

* momentum follows torch: v = momentum * v + g; w = w - lr * v (Keras' SGD keeps lr inside the
  velocity instead, which differs from torch for a few steps after every lr drop);
* weight decay is torch's coupled L2: 0.5 * wd * ||w||^2 is added to the loss for the Dense
  kernel AND bias (torch's SGD decays every parameter it is given, the bias included), so the
  gradient gains wd * w and goes through the momentum;
* epoch-based schedules are Keras `LearningRateSchedule`s of the optimizer step, given
  steps_per_epoch (the last, partial batch of an epoch is a step too);
* the Dense layer is initialised like torch.nn.Linear: kernel and bias ~ U(-1/sqrt(D), 1/sqrt(D));
* the reported accuracy is the FINAL epoch's, not the best test epoch (choosing the epoch on
  the test set would overstate the result).
"""

import dataclasses
import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from kd_keras.eval.knn import check_features
from kd_keras.optim.optimizers import TorchSGD
from kd_keras.optim.schedules import EpochCosine, EpochStepDecay

PATH_CACHED_FEATURES = "cached_features"
PATH_AUGMENTED_IMAGES = "augmented_images"
# torchvision RandomResizedCrop's default area range, used by both papers' linear evaluation.
AUGMENTED_CROP_SCALE = (0.08, 1.0)


@dataclasses.dataclass(frozen=True)
class LinearProbePreset:
    """Hyper-parameters of one linear-probe protocol.

    Attributes:
      name: preset name (key of `PRESETS`).
      learning_rate: initial learning rate (at `batch_size`; not rescaled when it is overridden).
      momentum: torch-style SGD momentum.
      epochs: training epochs.
      batch_size: examples per step.
      weight_decay: coupled L2 coefficient wd (0.5 * wd * ||w||^2 added to the loss).
      schedule: "step" (multiply by `decay_factor` at each of `milestones`) or "cosine"
        (cosine from learning_rate to final_lr over `epochs`, per epoch).
      milestones: epochs (for a run of `epochs` epochs) at which a step schedule decays; when a
        run is given a different number of epochs they are scaled proportionally.
      decay_factor: multiplier of the step schedule.
      final_lr: end value of the cosine schedule.
      standardize: whether the probe starts with `FeatureStandardization`.
    """

    name: str
    learning_rate: float
    momentum: float
    epochs: int
    batch_size: int
    weight_decay: float
    schedule: str
    milestones: tuple = ()
    decay_factor: float = 0.1
    final_lr: float = 0.0
    standardize: bool = True


PRESETS = {
    "simreg": LinearProbePreset(
        name="simreg",
        learning_rate=0.01,
        momentum=0.9,
        epochs=40,
        batch_size=256,
        weight_decay=0.0,
        schedule="step",
        milestones=(15, 30),
        decay_factor=0.1,
        standardize=True,
    ),
    "swav": LinearProbePreset(
        name="swav",
        learning_rate=0.3,
        momentum=0.9,
        epochs=100,
        batch_size=256,
        weight_decay=1e-6,
        schedule="cosine",
        final_lr=0.0,
        standardize=False,
    ),
}


@keras.saving.register_keras_serializable(package="kd_keras")
class FeatureStandardization(keras.layers.Layer):
    """l2-normalises each row, then standardises every dimension with fixed statistics.

    y = (x / max(||x||, 1e-12) - mean) / sqrt(variance + epsilon)

    `mean` and `variance` (shape [D]) are non-trainable weights set by `adapt` from the
    training features: the per-dimension mean and population variance (ddof = 0) of the
    l2-normalised training rows, accumulated in float64. Before `adapt` they are 0 and 1
    (the layer then only l2-normalises, up to epsilon). They are saved with the model.

    Input: float [B, D]. Output: float32 [B, D].

    Args:
      epsilon: added to the variance, so constant dimensions do not divide by zero. Kept small
        because the dimensions of unit-norm D-dimensional rows have variances of order 1 / D.
    """

    def __init__(self, epsilon=1e-8, **kwargs):
        super().__init__(**kwargs)
        if (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, numbers.Real)
            or not np.isfinite(epsilon)
            or epsilon <= 0
        ):
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None:
            raise ValueError("FeatureStandardization needs a known feature dimension")
        self.mean = self.add_weight(name="mean", shape=(dim,), initializer="zeros", trainable=False)
        self.variance = self.add_weight(
            name="variance", shape=(dim,), initializer="ones", trainable=False
        )

    def adapt(self, features):
        """Sets mean and variance from training features (NumPy, float64 accumulation).

        Args:
          features: finite real array [N, D], N >= 1 (the training set's features).
        """
        x = check_features(features, "features")
        if self.built:
            if self.mean.shape[0] != x.shape[1]:
                raise ValueError(
                    f"features has {x.shape[1]} dims but the layer was built for "
                    f"{self.mean.shape[0]}"
                )
        else:
            self.build((None, x.shape[1]))
        unit = _l2_normalize_np(x.astype(np.float64))
        self.mean.assign(unit.mean(axis=0).astype(np.float32))
        self.variance.assign(unit.var(axis=0).astype(np.float32))

    def call(self, inputs):
        x = tf.cast(inputs, tf.float32)
        # Same rule as torch.nn.functional.normalize: divide by max(norm, 1e-12).
        norm = tf.norm(x, axis=-1, keepdims=True)
        x = x / tf.maximum(norm, 1e-12)
        return (x - self.mean) * tf.math.rsqrt(self.variance + self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["epsilon"] = self.epsilon
        return config


def build_linear_probe(
    feature_dim, num_classes, train_features=None, standardize=True, weight_decay=0.0, seed=0
):
    """The probe model: Input [B, feature_dim] -> FeatureStandardization -> Dense logits.

    Args:
      feature_dim: D (>= 1).
      num_classes: C (>= 2).
      train_features: float [N, D]; the standardisation statistics are computed from it. Required
        when `standardize` is True.
      standardize: include the (adapted) `FeatureStandardization` layer (False: raw features go
        straight into the Dense layer, the SwAV protocol).
      weight_decay: coupled L2 coefficient wd >= 0; adds 0.5 * wd * (||kernel||^2 + ||bias||^2)
        to the loss as Keras regularisation losses.
      seed: seed of the Dense initialisers (torch.nn.Linear's U(-1/sqrt(D), 1/sqrt(D))).
    Returns:
      keras.Model mapping float32 [B, D] to logits float32 [B, C].
    """
    feature_dim = _check_int(feature_dim, "feature_dim", 1)
    num_classes = _check_int(num_classes, "num_classes", 2)
    weight_decay = _check_weight_decay(weight_decay)
    seed = _check_int(seed, "seed", 0)
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    if standardize:
        if train_features is None:
            raise ValueError("train_features is required when standardize=True")
        train = check_features(train_features, "train_features")
        if train.shape[1] != feature_dim:
            raise ValueError(
                f"train_features has {train.shape[1]} dims but feature_dim={feature_dim}"
            )
        norm = FeatureStandardization(name="standardize")
        norm.adapt(train)
        x = norm(x)
    bound = 1.0 / math.sqrt(feature_dim)
    # Keras' L2(c) adds c * sum(w^2); c = wd / 2 gives the gradient wd * w of torch's SGD.
    regularizer = keras.regularizers.L2(0.5 * weight_decay) if weight_decay > 0 else None
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed + 1),
        kernel_regularizer=regularizer,
        bias_regularizer=regularizer,
        name="logits",
    )(x)
    return keras.Model(inputs, logits, name="linear_probe")


def make_schedule(preset, steps_per_epoch, epochs=None):
    """The preset's learning-rate schedule for a run of `epochs` epochs.

    Args:
      preset: a `LinearProbePreset` or the name of one.
      steps_per_epoch: optimizer steps per epoch (>= 1).
      epochs: run length (None: the preset's); a step schedule's milestones are scaled by
        epochs / preset.epochs and rounded (kept >= 1 and strictly increasing; milestones that
        would fall at or after the last epoch are dropped).
    Returns:
      `EpochStepDecay` or `EpochCosine`.
    """
    preset = _get_preset(preset)
    epochs = preset.epochs if epochs is None else _check_int(epochs, "epochs", 1)
    if preset.schedule == "cosine":
        return EpochCosine(preset.learning_rate, steps_per_epoch, epochs, preset.final_lr)
    if preset.schedule == "step":
        scaled = []
        for m in preset.milestones:
            e = max(1, int(math.floor(m * epochs / preset.epochs + 0.5)))
            if e < epochs and (not scaled or e > scaled[-1]):
                scaled.append(e)
        return EpochStepDecay(preset.learning_rate, steps_per_epoch, scaled, preset.decay_factor)
    raise ValueError(f"preset.schedule must be 'step' or 'cosine', got {preset.schedule!r}")


def train_linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    preset="simreg",
    epochs=None,
    batch_size=None,
    seed=0,
    verbose=0,
):
    """Trains a linear probe on cached features and reports its test accuracy.

    This is the fast, cached-feature path (see the module docstring): one feature vector per
    example, no augmentation during training.

    The training set is reshuffled every epoch with a permutation that depends only on
    (seed, epoch), so a run is reproducible regardless of TensorFlow's global seed. The number
    of classes is 1 + the largest label in either split.

    Args:
      train_features: finite real array [N, D].
      train_labels: integer array [N], values >= 0, at least two distinct classes.
      test_features: finite real array [M, D].
      test_labels: integer array [M], values >= 0.
      preset: "simreg" or "swav" (see `PRESETS`) or a `LinearProbePreset`.
      epochs: override of the preset's epochs (step milestones are scaled, see `make_schedule`).
      batch_size: override of the preset's batch size (the learning rate is not rescaled).
      seed: integer >= 0 for the initialisation and the data order.
      verbose: passed to keras fit.
    Returns:
      dict with "top1" (float in [0, 1]), "top5" (float, or None when there are <= 5 classes,
      where it would always be 1), "preset", "epochs", "batch_size", "path"
      ("cached_features"), "num_train", "num_test", "num_classes", "final_train_loss"
      (mean loss of the last epoch, regularisation included).
    """
    preset = _get_preset(preset)
    train = check_features(train_features, "train_features")
    test = check_features(test_features, "test_features")
    if test.shape[1] != train.shape[1]:
        raise ValueError(f"test_features has {test.shape[1]} dims, train_features {train.shape[1]}")
    y_train = _check_labels(train_labels, "train_labels", train.shape[0], "train_features")
    y_test = _check_labels(test_labels, "test_labels", test.shape[0], "test_features")
    num_classes = 1 + int(max(y_train.max(), y_test.max()))
    model, history = fit_linear_probe(
        train,
        y_train,
        preset=preset,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        num_classes=num_classes,
        verbose=verbose,
    )
    logits = model.predict(test.astype(np.float32), batch_size=1024, verbose=0)
    top1, top5 = _topk_accuracy(logits, y_test)
    return {
        "top1": top1,
        "top5": top5 if num_classes > 5 else None,
        "preset": preset.name,
        "epochs": history["epochs"],
        "batch_size": history["batch_size"],
        "path": PATH_CACHED_FEATURES,
        "num_train": int(train.shape[0]),
        "num_test": int(test.shape[0]),
        "num_classes": num_classes,
        "final_train_loss": history["loss"][-1],
    }


def fit_linear_probe(
    train_features,
    train_labels,
    preset="simreg",
    epochs=None,
    batch_size=None,
    seed=0,
    num_classes=None,
    verbose=0,
):
    """Builds and trains a probe on cached features; the training half of `train_linear_probe`.

    The training set is reshuffled every epoch by a permutation that depends only on
    (seed, epoch) (see `shuffled_batches`), so a run is reproducible whatever TensorFlow's global
    seed is. There are ceil(N / batch_size) steps per epoch, the last one possibly partial.

    Args:
      train_features: finite real array [N, D].
      train_labels: integer array [N], values >= 0, at least two distinct classes.
      preset, epochs, batch_size, seed, verbose: as in `train_linear_probe`.
      num_classes: C (None: 1 + the largest training label); must exceed every label.
    Returns:
      (model: keras.Model [B, D] -> logits [B, C],
       history: {"loss": [mean loss per epoch], "epochs": int, "batch_size": int,
                 "steps_per_epoch": int}).
    """
    preset = _get_preset(preset)
    train = check_features(train_features, "train_features")
    y_train = _check_labels(train_labels, "train_labels", train.shape[0], "train_features")
    if np.unique(y_train).size < 2:
        raise ValueError("train_labels must contain at least 2 distinct classes")
    epochs = preset.epochs if epochs is None else _check_int(epochs, "epochs", 1)
    batch_size = (
        preset.batch_size if batch_size is None else _check_int(batch_size, "batch_size", 1)
    )
    seed = _check_int(seed, "seed", 0)
    if num_classes is None:
        num_classes = 1 + int(y_train.max())
    num_classes = _check_int(num_classes, "num_classes", 2)
    if y_train.max() >= num_classes:
        raise ValueError(
            f"train_labels contains {int(y_train.max())} but num_classes={num_classes}"
        )

    steps_per_epoch = math.ceil(train.shape[0] / batch_size)
    model = build_linear_probe(
        train.shape[1],
        num_classes,
        train if preset.standardize else None,
        standardize=preset.standardize,
        weight_decay=preset.weight_decay,
        seed=seed,
    )
    model.compile(
        optimizer=TorchSGD(make_schedule(preset, steps_per_epoch, epochs), preset.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # steps_per_epoch makes Keras keep one iterator over the whole multi-epoch stream.
    fit = model.fit(
        shuffled_batches(train, y_train, epochs, batch_size, seed),
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        verbose=verbose,
        shuffle=False,
    )
    history = {
        "loss": [float(v) for v in fit.history["loss"]],
        "epochs": epochs,
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
    }
    return model, history


def train_linear_probe_augmented(
    embed_model,
    train_examples,
    num_train,
    train_features,
    test_features,
    test_labels,
    num_classes,
    preset="simreg",
    image_size=None,
    epochs=None,
    batch_size=None,
    seed=0,
    verbose=0,
):
    """The faithful linear probe: augmented images through the frozen network every epoch.

    Args:
      embed_model: keras.Model images float32 [B, S, S, 3] in [0, 1] -> features [B, D]; run
        with training=False and never updated (BatchNorm keeps its moving statistics).
      train_examples: tf.data of example dicts ({"image" [H, W, 3], "label", "index"}) from
        `kd_keras.data.sources.load_split`.
      num_train: number of examples in `train_examples`.
      train_features: float [N, D] centre-crop features of the training split (statistics of
        the "simreg" standardisation; also checks D).
      test_features: float [M, D] centre-crop features of the test split; test_labels int [M].
      num_classes: C (>= 2).
      preset, epochs, batch_size, seed, verbose: as in `train_linear_probe`.
      image_size: side S of the training crops (default: embed_model's input side).
    Returns:
      the dict of `train_linear_probe` with "path": "augmented_images".
    """
    from kd_keras.data import augment
    from kd_keras.data import sources as data

    preset = _get_preset(preset)
    train = check_features(train_features, "train_features")
    test = check_features(test_features, "test_features")
    dim = int(embed_model.output_shape[-1])
    for name, x in (("train_features", train), ("test_features", test)):
        if x.shape[1] != dim:
            raise ValueError(f"{name} has {x.shape[1]} dims but the model gives {dim}")
    y_test = _check_labels(test_labels, "test_labels", test.shape[0], "test_features")
    num_classes = _check_int(num_classes, "num_classes", 2)
    num_train = _check_int(num_train, "num_train", 1)
    epochs = preset.epochs if epochs is None else _check_int(epochs, "epochs", 1)
    batch_size = (
        preset.batch_size if batch_size is None else _check_int(batch_size, "batch_size", 1)
    )
    size = image_size or int(embed_model.input_shape[1])
    steps_per_epoch = math.ceil(num_train / batch_size)

    probe = build_linear_probe(
        dim,
        num_classes,
        train if preset.standardize else None,
        standardize=preset.standardize,
        weight_decay=preset.weight_decay,
        seed=seed,
    )
    was_trainable = embed_model.trainable
    embed_model.trainable = False  # restored below: the caller's model must not change
    images = keras.Input(embed_model.input_shape[1:], name="images")
    model = keras.Model(images, probe(embed_model(images, training=False)))
    model.compile(
        optimizer=TorchSGD(make_schedule(preset, steps_per_epoch, epochs), preset.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    def view_fn(image, pair):
        # to_float_image: training images may be cached as uint8 (kd_keras.evaluate does).
        image = augment.to_float_image(image)
        return {"image": augment.weak_view(image, pair, size, scale=AUGMENTED_CROP_SCALE)}

    train_ds = data.make_train_dataset(
        train_examples,
        view_fn,
        batch_size,
        seed=seed,
        shuffle_buffer=min(num_train, 10000),
        drop_remainder=False,
        num_epochs=epochs,
    ).map(lambda b: (b["image"], tf.cast(b["label"], tf.int64)))
    try:
        fit = model.fit(
            train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=verbose, shuffle=False
        )
    finally:
        embed_model.trainable = was_trainable
    logits = probe.predict(test.astype(np.float32), batch_size=1024, verbose=0)
    top1, top5 = _topk_accuracy(logits, y_test)
    return {
        "top1": top1,
        "top5": top5 if num_classes > 5 else None,
        "preset": preset.name,
        "epochs": epochs,
        "batch_size": batch_size,
        "path": PATH_AUGMENTED_IMAGES,
        "num_train": num_train,
        "num_test": int(test.shape[0]),
        "num_classes": num_classes,
        "final_train_loss": float(fit.history["loss"][-1]),
    }


def shuffled_batches(features, labels, epochs, batch_size, seed):
    """tf.data of (features float32 [b, D], labels int64 [b]) for `epochs` epochs, in order.

    Epoch e visits the rows in the order of a stateless permutation keyed by (seed, e); the
    last batch of an epoch may be partial (b < batch_size) and batches never straddle epochs.

    Args:
      features: real array [N, D]; labels: integer array [N]; epochs, batch_size: >= 1;
      seed: integer >= 0.
    Returns:
      tf.data.Dataset of epochs * ceil(N / batch_size) batches.
    """
    x = tf.constant(features, tf.float32)
    y = tf.constant(labels, tf.int64)
    n = features.shape[0]

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    ds = tf.data.Dataset.range(epochs).flat_map(one_epoch)
    ds = ds.map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
    return ds.prefetch(tf.data.AUTOTUNE)


def _topk_accuracy(logits, labels):
    """Top-1 and top-5 accuracy; ties between logits go to the lower class index."""
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = float(np.mean(order[:, 0] == labels))
    k = min(5, logits.shape[1])
    top5 = float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1)))
    return top1, top5


def _l2_normalize_np(x):
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _get_preset(preset):
    if isinstance(preset, LinearProbePreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def _check_labels(labels, name, rows, features_name):
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"{name} has shape {labels.shape} but {features_name} has {rows} rows")
    if labels.min() < 0:
        raise ValueError(f"{name} must be >= 0, found {int(labels.min())}")
    return labels.astype(np.int64)


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return int(value)


def _check_positive_float(value, name):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not np.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_weight_decay(value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not np.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {value!r}")
    return float(value)
