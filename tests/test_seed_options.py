"""Options that reproduce SEED's own training code (issue 21, found by the SEED lockstep):
--head_batch_norm=false (SEED's student MLP has no BatchNorm) and --warmup_epochs with
--schedule=epoch_cosine (SEED's per-epoch warm-up before its per-epoch cosine)."""

import math

import numpy as np
import pytest

from kd_keras import config as config_lib
from kd_keras.nets import heads
from kd_keras.optim import optimizers, schedules
from tests.helpers import parsed_flags


def test_mlp2_without_batch_norm_is_linear_relu_linear():
    head = heads.prediction_head(6, 4, "mlp2", hidden_dims=(6,), batch_norm=False)
    names = [layer.name for layer in head.layers[1:]]
    assert names == ["linear1", "relu1", "linear2"]
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    w1, b1 = head.get_layer("linear1").get_weights()
    w2, b2 = head.get_layer("linear2").get_weights()
    expected = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    np.testing.assert_allclose(head(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_heads_keep_batch_norm_by_default():
    for kind, bns in (("mlp2", ["bn1"]), ("mlp4", ["bn1", "bn3"])):
        head = heads.prediction_head(8, 4, kind)
        assert [layer.name for layer in head.layers if layer.name.startswith("bn")] == bns
        no_bn = heads.prediction_head(8, 4, kind, batch_norm=False)
        assert not [layer.name for layer in no_bn.layers if layer.name.startswith("bn")]


def test_head_batch_norm_flag_reaches_the_config(tmp_path):
    cfg = config_lib.config_from_flags(parsed_flags(tmp_path, "--method=seed"))
    assert cfg.model.head_batch_norm is True
    cfg = config_lib.config_from_flags(
        parsed_flags(tmp_path, "--method=seed", "--head=mlp2", "--head_batch_norm=false")
    )
    assert cfg.model.head_batch_norm is False and cfg.model.head == "mlp2"


@pytest.mark.parametrize(
    "argv,message",
    [
        # nothing to leave out of a linear head
        (["--method=seed", "--head=linear", "--head_batch_norm=false"], "--head_batch_norm"),
        # a method without a student head
        (["--method=oss_offline", "--head_batch_norm=false"], "head_batch_norm"),
        (["--method=seed", "--head=mlp2_official", "--head_batch_norm=false"], "head_batch_norm"),
        (
            [
                "--method=compress_2q",
                "--compress_student_features=backbone",
                "--head_batch_norm=false",
            ],
            "head_batch_norm",
        ),
        # epoch_cosine sets the rate per epoch: whole warm-up epochs only
        (["--schedule=epoch_cosine", "--warmup_epochs=2.5"], "--warmup_epochs"),
        (["--schedule=epoch_cosine", "--epochs=5", "--warmup_epochs=5"], "--warmup_epochs"),
    ],
)
def test_seed_options_refuse_what_would_do_nothing(tmp_path, argv, message):
    with pytest.raises(Exception, match=message):
        config_lib.config_from_flags(parsed_flags(tmp_path, *argv))


def _seed_adjust_learning_rate(lr, batch_size, epochs, epoch, warmup_epochs=5):
    """SEED tools/utils.py adjust_learning_rate (distributed path: lr_mult = batch / 256)."""
    lr_mult = batch_size / 256
    if epoch < warmup_epochs:
        return lr + (lr * lr_mult - lr) / warmup_epochs * epoch
    return lr * lr_mult * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@pytest.mark.parametrize("batch_size,lr_scaling", [(1024, "linear"), (128, "none")])
def test_epoch_cosine_with_warmup_is_seeds_schedule(batch_size, lr_scaling):
    epochs, steps_per_epoch, lr = 12, 3, 0.03
    cfg = config_lib.OptimConfig(
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        lr_scaling=lr_scaling,
        schedule="epoch_cosine",
        warmup_epochs=5,
    )
    schedule = optimizers.learning_rate_schedule(cfg, steps_per_epoch)
    got = [float(schedule(step)) for step in range(epochs * steps_per_epoch)]
    # One process (lr_mult = 1) holds --lr through the warm-up: --lr_scaling=none.
    scale_batch = batch_size if lr_scaling == "linear" else 256
    expected = [
        _seed_adjust_learning_rate(lr, scale_batch, epochs, e)
        for e in range(epochs)
        for _ in range(steps_per_epoch)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    if lr_scaling == "linear":
        assert got[0] == pytest.approx(lr) and got[14] == pytest.approx(lr * 3.4)


def test_epoch_cosine_warmup_serialises_and_old_configs_still_load():
    with_warmup = schedules.EpochCosine(0.1, 2, 8, warmup_epochs=3, warmup_start_lr=0.01)
    again = schedules.EpochCosine.from_config(with_warmup.get_config())
    assert [float(again(s)) for s in range(16)] == [float(with_warmup(s)) for s in range(16)]
    plain = schedules.EpochCosine(0.1, 2, 8)
    assert set(plain.get_config()) == {"initial_lr", "steps_per_epoch", "epochs", "final_lr"}
    with pytest.raises(ValueError, match="warmup_epochs"):
        schedules.EpochCosine(0.1, 2, 8, warmup_epochs=8)
