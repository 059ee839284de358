"""kd_keras' SimReg replays a golden trajectory of the authors' own code (UCDvision/simreg
main.py, run by scripts/lockstep_official.py --tiny --fixture=...): same initial student and
head, same views, the official teacher's targets, the official per-step learning rates; the
per-step losses and final weights must agree. No torch: everything is in the fixture.

What this pins: the student ResNet and the mlp4 head (forward and backward), BN in training
mode, SimReg's loss, the coupled weight decay, torch's momentum form and the epoch-cosine
staircase. A change to any of them that departs from the authors' code fails here.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from kd_keras import config
from kd_keras.methods import registry
from kd_keras.nets import backbones
from kd_keras.optim import optimizers

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "lockstep", "simreg_tiny.npz")
# Relative loss agreement reached against the official code on this fixture (float32
# rounding differs between TF and torch kernels; see the fixture's noise floor).
LOSS_RTOL = 1e-4  # measured 2.5e-6; Keras momentum form: 6.6e-3
WEIGHT_ATOL = 2e-4  # measured 3.8e-5 (a conv kernel); Keras momentum: 2e-2


class _CachedTeacher:
    """SimReg's view of a teacher whose features come with the batch."""

    def __init__(self, name, feature_dim):
        self.name, self.feature_dim = name, int(feature_dim)


@pytest.fixture(scope="module")
def golden():
    data = np.load(FIXTURE)
    return {k: data[k] for k in data.files}


def _replay(golden, momentum_form="torch"):
    """Per-step losses and final {"student/..", "head/.."} weights of kd_keras on the fixture."""
    s = json.loads(str(golden["settings"]))
    cfg = config.Config(
        workdir="/nonexistent",
        method="simreg",
        sync_bn=False,
        model=config.ModelConfig(student="resnet18", small_stem=False),
        optim=config.OptimConfig(
            batch_size=s["batch_size"],
            epochs=s["epochs"],
            lr=s["lr"],
            lr_scaling="none",
            schedule="epoch_cosine",
            momentum=s["momentum"],
            momentum_form=momentum_form,
            weight_decay=s["weight_decay"],
        ),
    )
    features = golden["teacher_features"]
    student = backbones.build_resnet(s["student_arch"], s["image_size"], norm="imagenet")
    teacher = _CachedTeacher("official", features.shape[-1])
    method = registry.build_method(cfg, student, [teacher], steps_per_epoch=s["steps_per_epoch"])
    method.compile(optimizer=optimizers.make_optimizer(cfg.optim, s["steps_per_epoch"]))
    method.build((None, s["image_size"], s["image_size"], 3))
    models = {"student": method.student, "head": method.heads[0]}
    for part, model in models.items():
        for layer in model.layers:
            for w in layer.weights:
                w.assign(golden[f"init/{part}/{layer.name}/{w.path.split('/')[-1]}"])
    train = tf.function(method.train_step)
    losses = []
    # uint8 / 255 in float32: the exact values both sides trained on.
    all_views = golden["student_views_uint8"].astype(np.float32) / np.float32(255)
    for views, targets in zip(all_views, features, strict=True):
        method.reset_metrics()
        batch = {"student": views, "teacher_features": {"official": targets}}
        losses.append(float(train(batch)["loss"]))
    final = {
        f"{part}/{layer.name}/{w.path.split('/')[-1]}": np.asarray(w)
        for part, model in models.items()
        for layer in model.layers
        for w in layer.weights
    }
    return np.asarray(losses), final


def _weight_errors(final, golden):
    """max |kd_keras - official| per weight; BN moving variances are left out: Keras averages
    the biased batch variance, torch the unbiased one (a documented deviation, training-neutral)."""
    return {
        name: float(np.abs(value - golden[f"final/{name}"]).max())
        for name, value in final.items()
        if "moving_variance" not in name
    }


def test_kd_keras_replays_the_official_simreg_trajectory(golden):
    losses, final = _replay(golden)
    np.testing.assert_allclose(losses, golden["official_losses"], rtol=LOSS_RTOL)
    errors = _weight_errors(final, golden)
    assert len(errors) > 20  # student and head weights were all compared
    worst = max(errors, key=errors.get)
    assert errors[worst] < WEIGHT_ATOL, (worst, errors[worst])


def test_the_trajectory_tells_keras_momentum_from_torch_momentum(golden):
    """The fixture's learning rate changes mid-way, so Keras' momentum form leaves it."""
    assert len(set(golden["official_lrs"].tolist())) > 1
    losses, final = _replay(golden, momentum_form="keras")
    loss_gap = np.abs(losses - golden["official_losses"]) / golden["official_losses"]
    assert (
        loss_gap.max() > 10 * LOSS_RTOL
        or max(_weight_errors(final, golden).values()) > 10 * WEIGHT_ATOL
    )
