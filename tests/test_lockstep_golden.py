"""kd_keras' SimReg replays a golden trajectory of the authors' own code (UCDvision/simreg
main.py, run by scripts/lockstep_official.py --tiny --fixture=...): same initial student and
head, same views, the official teacher's targets, the official per-step learning rates; the
per-step losses and final weights must agree. No torch: everything is in the fixture.

What this pins: the student ResNet and the mlp4 head (forward and backward), BN in training
mode, SimReg's loss, the coupled weight decay, torch's momentum form and the epoch-cosine
staircase. A change to any of them that departs from the authors' code fails here.
"""

import numpy as np
import pytest

from kd_keras import config
from tests import lockstep_replay as replay

# Relative loss agreement reached against the official code on this fixture (float32
# rounding differs between TF and torch kernels; see the fixture's noise floor).
LOSS_RTOL = 1e-4  # measured 2.5e-6; Keras momentum form: 6.6e-3
WEIGHT_ATOL = 2e-4  # measured 3.8e-5 (a conv kernel); Keras momentum: 2e-2


@pytest.fixture(scope="module")
def golden():
    return replay.load("simreg_tiny")


def _replay(golden, momentum_form="torch"):
    """Per-step losses and final {"student/..", "head/.."} weights of kd_keras on the fixture."""
    s = replay.settings(golden)
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
    method = replay.build(cfg, s, features.shape[-1])
    models = {"student": method.student, "head": method.heads[0]}
    replay.set_initial(models, golden)
    losses = replay.run_steps(method, golden["student_views_uint8"], features)
    return losses, replay.final_weights(models)


def test_kd_keras_replays_the_official_simreg_trajectory(golden):
    losses, final = _replay(golden)
    np.testing.assert_allclose(losses, golden["official_losses"], rtol=LOSS_RTOL)
    errors = replay.errors(final, golden)
    assert len(errors) > 20  # student and head weights were all compared
    worst = max(errors, key=errors.get)
    assert errors[worst] < WEIGHT_ATOL, (worst, errors[worst])


def test_the_trajectory_tells_keras_momentum_from_torch_momentum(golden):
    """The fixture's learning rate changes mid-way, so Keras' momentum form leaves it."""
    assert len(set(golden["official_lrs"].tolist())) > 1
    losses, final = _replay(golden, momentum_form="keras")
    assert (
        replay.loss_gap(losses, golden).max() > 10 * LOSS_RTOL
        or max(replay.errors(final, golden).values()) > 10 * WEIGHT_ATOL
    )
