"""Semi-supervised fine-tuning with 1% / 10% of the labels (OSS appendix A.4, SwAV protocol).

The whole network (backbone + a new linear classifier) is trained on a class-balanced label
subset (`kd_keras.eval.subsets.label_subset`), with:

* SGD with PyTorch momentum 0.9 (`TorchSGD`), no weight decay, batch 256, 20 epochs;
* separate learning rates for the backbone and the classifier: 1%: 0.02 / 5, 10%: 0.01 / 0.2;
* both rates multiplied by 0.2 at epochs 12 and 16 (scaled proportionally for other lengths);
* training views: random resized crop (scale 0.08-1) + horizontal flip; BatchNorm in training
  mode; evaluation on centre crops with training=False.

The backbone passed in is copied, never modified. The reported accuracy is the last epoch's.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from kd_keras.data import augment
from kd_keras.data import sources as data
from kd_keras.optim.optimizers import TorchSGD
from kd_keras.optim.schedules import EpochStepDecay


@dataclasses.dataclass(frozen=True)
class FinetunePreset:
    """Hyper-parameters of one fine-tuning protocol (OSS A.4)."""

    fraction: float
    backbone_lr: float
    classifier_lr: float
    epochs: int = 20
    milestones: tuple = (12, 16)
    decay_factor: float = 0.2
    momentum: float = 0.9
    batch_size: int = 256


PRESETS = {
    "finetune1": FinetunePreset(fraction=0.01, backbone_lr=0.02, classifier_lr=5.0),
    "finetune10": FinetunePreset(fraction=0.1, backbone_lr=0.01, classifier_lr=0.2),
}

# torchvision RandomResizedCrop's default area range, used by SwAV's semi-supervised script.
CROP_SCALE = (0.08, 1.0)


def scaled_milestones(preset, epochs):
    """The preset's decay epochs for a run of `epochs` epochs (kept >= 1, < epochs, increasing)."""
    out = []
    for m in preset.milestones:
        e = max(1, int(math.floor(m * epochs / preset.epochs + 0.5)))
        if e < epochs and (not out or e > out[-1]):
            out.append(e)
    return tuple(out)


def finetune(
    backbone,
    train_examples,
    num_train,
    test_dataset,
    num_classes,
    preset="finetune10",
    image_size=None,
    epochs=None,
    batch_size=None,
    seed=0,
    verbose=0,
):
    """Fine-tunes a copy of `backbone` plus a linear classifier; returns test accuracy.

    Args:
      backbone: keras.Model images float32 [B, H, W, 3] in [0, 1] -> features [B, m].
      train_examples: tf.data of example dicts ({"image" [H, W, 3], "label", "index"}, as from
        `kd_keras.data.sources.load_split`), already restricted to the label subset.
      num_train: number of examples in `train_examples` (>= 1).
      test_dataset: tf.data of {"image" [B, S, S, 3] centre crops, "label" [B]} batches.
      num_classes: C (>= 2).
      preset: "finetune1", "finetune10" or a `FinetunePreset`.
      image_size: side S of the training crops (default: the backbone's input side).
      epochs, batch_size: overrides of the preset (milestones scale with epochs).
      seed: seeds the classifier initialisation, the data order and the crops.
      verbose: print one line per epoch when > 0.
    Returns:
      dict: "top1", "top5" (None when C <= 5), "epochs", "batch_size", "backbone_lr",
      "classifier_lr", "milestones", "steps", "final_train_loss", "num_train", "num_test".
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    epochs = epochs or preset.epochs
    batch_size = batch_size or preset.batch_size
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    size = image_size or int(backbone.input_shape[1])
    steps_per_epoch = math.ceil(num_train / batch_size)
    milestones = scaled_milestones(preset, epochs)

    trunk = _trainable_copy(backbone)
    classifier = _torch_linear(num_classes, int(trunk.output_shape[-1]), seed)
    train_step = _train_step_fn(trunk, classifier, preset, steps_per_epoch, milestones)

    def view_fn(image, pair):
        # to_float_image: training images may be cached as uint8 (kd_keras.evaluate does).
        image = augment.to_float_image(image)
        return {"image": augment.weak_view(image, pair, size, scale=CROP_SCALE)}

    train_ds = data.make_train_dataset(
        train_examples,
        view_fn,
        batch_size,
        seed=seed,
        shuffle_buffer=max(1, min(num_train, 10000)),
        drop_remainder=False,
        num_epochs=epochs,
    )
    steps, epoch_loss = _train(train_step, train_ds, steps_per_epoch, epochs, verbose)
    top1, top5, num_test = _test_accuracy(trunk, classifier, test_dataset)
    return {
        "top1": top1,
        "top5": top5 if num_classes > 5 else None,
        "epochs": epochs,
        "batch_size": batch_size,
        "backbone_lr": preset.backbone_lr,
        "classifier_lr": preset.classifier_lr,
        "milestones": list(milestones),
        "steps": steps,
        "final_train_loss": epoch_loss,
        "num_train": int(num_train),
        "num_test": num_test,
    }


def _trainable_copy(backbone):
    """A private, fully trainable copy: fine-tuning must not change the model other protocols
    evaluate."""
    trunk = keras.models.clone_model(backbone)
    trunk.set_weights(backbone.get_weights())
    # clone_model copies each layer's trainable flag but not the model's, so a frozen backbone
    # gives a clone whose model-level `trainable = True` would be a no-op: unfreeze per layer.
    for layer in trunk.layers:
        layer.trainable = True
    return trunk


def _torch_linear(num_classes, dim, seed):
    """Dense [B, dim] -> [B, num_classes] initialised like torch.nn.Linear (U(+-1/sqrt(dim)))."""
    bound = 1.0 / math.sqrt(dim)
    classifier = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed + 1),
        name="classifier",
    )
    classifier.build((None, dim))
    return classifier


def _train_step_fn(trunk, classifier, preset, steps_per_epoch, milestones):
    """tf.function (images, labels) -> loss: one SGD step, backbone and classifier each with
    its own learning rate (`preset.backbone_lr`, `preset.classifier_lr`)."""
    opt_trunk = TorchSGD(
        EpochStepDecay(preset.backbone_lr, steps_per_epoch, milestones, preset.decay_factor),
        preset.momentum,
    )
    opt_head = TorchSGD(
        EpochStepDecay(preset.classifier_lr, steps_per_epoch, milestones, preset.decay_factor),
        preset.momentum,
    )
    opt_trunk.build(trunk.trainable_variables)
    opt_head.build(classifier.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            logits = classifier(trunk(images, training=True))
            loss = loss_fn(labels, logits)
        trunk_vars = trunk.trainable_variables
        head_vars = classifier.trainable_variables
        grads = tape.gradient(loss, trunk_vars + head_vars)
        opt_trunk.apply_gradients(zip(grads[: len(trunk_vars)], trunk_vars, strict=True))
        opt_head.apply_gradients(zip(grads[len(trunk_vars) :], head_vars, strict=True))
        return loss

    return train_step


def _train(train_step, train_ds, steps_per_epoch, epochs, verbose):
    """(steps, mean loss of the last epoch) of running `train_step` over `train_ds`."""
    epoch_loss = float("nan")
    steps = 0
    losses = []
    for batch in train_ds:
        losses.append(float(train_step(batch["image"], tf.cast(batch["label"], tf.int64))))
        steps += 1
        if steps % steps_per_epoch == 0:
            epoch_loss = float(np.mean(losses))
            if verbose:
                print(f"fine-tune epoch {steps // steps_per_epoch}/{epochs}: loss {epoch_loss:.4f}")
            losses = []
    if not np.isfinite(epoch_loss):
        raise ValueError(f"fine-tuning diverged (final loss {epoch_loss}); try a lower lr.")
    return steps, epoch_loss


def _test_accuracy(trunk, classifier, test_dataset):
    """(top-1, top-5, number of test examples) of classifier(trunk(x)) on centre crops."""

    @tf.function
    def predict(images):
        return classifier(trunk(images, training=False))

    logits, labels = [], []
    for batch in test_dataset:
        logits.append(predict(batch["image"]).numpy())
        labels.append(np.asarray(batch["label"], np.int64))
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = float(np.mean(order[:, 0] == labels))
    top5 = float(np.mean(np.any(order[:, :5] == labels[:, None], axis=1)))
    return top1, top5, int(labels.shape[0])
