"""Replaying a golden lockstep trajectory (tests/data/lockstep/*.npz, written by
scripts/lockstep_official.py --fixture=...) with kd_keras, without torch: shared by the SimReg,
CompRess and SEED golden tests.

A fixture holds the official run's settings (JSON), the views as uint8, the official teacher's
features per step, the official losses and rates, and the initial and final state under
"init/<part>/<layer>/<weight>" and "final/<part>/<layer>/<weight>" (part: student, head, ...).
"""

import json
import os

import numpy as np
import tensorflow as tf

from kd_keras.methods import registry
from kd_keras.nets import backbones
from kd_keras.optim import optimizers

DATA = os.path.join(os.path.dirname(__file__), "data", "lockstep")
TEACHER = "official"  # the cached teacher's name in the replayed batches


class CachedTeacher:
    """What a method needs of a teacher whose features come with the batch."""

    def __init__(self, name, feature_dim):
        self.name, self.feature_dim = name, int(feature_dim)


def load(name):
    """{array name: array} of tests/data/lockstep/<name>.npz."""
    data = np.load(os.path.join(DATA, f"{name}.npz"))
    return {k: data[k] for k in data.files}


def settings(golden):
    """The run's settings dict stored in the fixture."""
    return json.loads(str(golden["settings"]))


def part(golden, prefix, name):
    """{"layer/weight": array} stored under "<prefix>/<name>/"."""
    head = f"{prefix}/{name}/"
    return {k[len(head) :]: v for k, v in golden.items() if k.startswith(head)}


def build(cfg, s, feature_dim):
    """kd_keras' method for Config `cfg` on settings `s`, with a cached teacher, compiled and
    built (nothing traced yet)."""
    student = backbones.build_resnet(s["student_arch"], s["image_size"], norm="imagenet")
    teacher = CachedTeacher(TEACHER, feature_dim)
    method = registry.build_method(cfg, student, [teacher], steps_per_epoch=s["steps_per_epoch"])
    method.compile(optimizer=optimizers.make_optimizer(cfg.optim, s["steps_per_epoch"]))
    method.build((None, s["image_size"], s["image_size"], 3))
    return method


def weight_name(layer, weight):
    return f"{layer.name}/{weight.path.split('/')[-1]}"


def set_initial(models, golden):
    """Assigns every weight of {part: model} from the fixture's "init/<part>/..." arrays."""
    for name, model in models.items():
        values = part(golden, "init", name)
        for layer in model.layers:
            for w in layer.weights:
                w.assign(values[weight_name(layer, w)])


def run_steps(method, views_uint8, features, record_rates=False):
    """Trains one step per batch of views (uint8 [steps, B, S, S, 3]) with the official teacher
    features [steps, B, D]; returns the losses [steps] (and the rates each step used)."""
    train = tf.function(method.train_step)
    losses, rates = [], []
    # uint8 / 255 in float32: the exact values both sides trained on.
    all_views = views_uint8.astype(np.float32) / np.float32(255)
    for views, targets in zip(all_views, features, strict=True):
        if record_rates:
            rates.append(float(method.optimizer.learning_rate))
        method.reset_metrics()
        batch = {"student": views, "teacher_features": {TEACHER: targets}}
        losses.append(float(train(batch)["loss"]))
    if record_rates:
        return np.asarray(losses), np.asarray(rates)
    return np.asarray(losses)


def final_weights(models):
    """{"<part>/<layer>/<weight>": array} of {part: model}, the fixture's "final/" names."""
    return {
        f"{name}/{weight_name(layer, w)}": np.asarray(w)
        for name, model in models.items()
        for layer in model.layers
        for w in layer.weights
    }


def errors(final, golden, stored_only=False):
    """max |kd_keras - official| per final array. BN moving variances are left out: Keras
    averages the biased batch variance, torch the unbiased one (documented, training-neutral).
    stored_only: skip arrays the fixture does not hold (else a missing one is a KeyError)."""
    return {
        name: float(np.abs(value - golden[f"final/{name}"]).max())
        for name, value in final.items()
        if "moving_variance" not in name and (not stored_only or f"final/{name}" in golden)
    }


def loss_gap(losses, golden):
    """|kd_keras - official| / official per step."""
    return np.abs(losses - golden["official_losses"]) / golden["official_losses"]
