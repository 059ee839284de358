"""kd_keras.eval.finetune: label-subset fine-tuning learns, leaves the given backbone untouched."""

import keras
import numpy as np
import tensorflow as tf

from kd_keras.data import augment
from kd_keras.data import sources as data
from kd_keras.eval import finetune, subsets
from kd_keras.nets import backbones


def test_milestones_scale_with_epochs():
    preset = finetune.PRESETS["finetune1"]
    assert finetune.scaled_milestones(preset, 20) == (12, 16)
    assert finetune.scaled_milestones(preset, 10) == (6, 8)
    assert finetune.scaled_milestones(preset, 2) == (1,)  # 1.2 and 1.6 both round to 1
    assert (preset.backbone_lr, preset.classifier_lr) == (0.02, 5.0)
    ten = finetune.PRESETS["finetune10"]
    assert (ten.fraction, ten.backbone_lr, ten.classifier_lr) == (0.1, 0.01, 0.2)


def test_finetune_on_a_label_subset_learns_and_copies_the_backbone():
    keras.utils.set_random_seed(0)
    backbone = backbones.build_backbone("convnet_tiny", 8)
    backbone.trainable = False  # e.g. frozen by a linear probe: the copy is still fine-tuned
    before = [w.copy() for w in backbone.get_weights()]
    examples, info = data.load_split("digits", "train", image_size_hint=8)
    labels = np.array([int(ex["label"]) for ex in examples])
    indices = subsets.label_subset(labels, 0.1, seed=0)
    keep = np.zeros(len(labels), bool)
    keep[indices] = True
    keep_t = tf.constant(keep)
    chosen = examples.filter(lambda ex: tf.gather(keep_t, ex["index"]))
    test_examples, _ = data.load_split("digits", "test", image_size_hint=8)
    test_ds = data.make_eval_dataset(test_examples, lambda im: augment.center_crop(im, 8), 128)
    result = finetune.finetune(
        backbone,
        chosen,
        len(indices),
        test_ds,
        num_classes=10,
        preset="finetune10",
        epochs=15,
        batch_size=32,
    )
    assert result["num_train"] == len(indices) == 145
    assert result["steps"] == 15 * 5  # ceil(145 / 32) steps per epoch, last batch partial
    assert result["milestones"] == [9, 12]
    assert result["top1"] > 0.5  # 10 classes: chance is 0.1
    for a, b in zip(before, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
