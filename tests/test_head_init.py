"""--head_init: torch.nn.Linear's initialisation for heads, prototypes and classifiers,
checked against the uniform distribution's statistics and torch's own (saved by
scripts/make_torch_sgd_fixtures.py), and Keras' glorot / zeros kept as the option."""

import math
import os

import keras
import numpy as np
import pytest

from kd_keras import config as config_lib
from kd_keras.nets import clustering, heads, initializers

TORCH_STATS = os.path.join(os.path.dirname(__file__), "data", "torch_sgd", "linear_init.npz")


def _layer(model, name):
    return model.get_layer(name)


@pytest.mark.parametrize("fan_in,fan_out", [(16, 256), (512, 64)])
def test_torch_linear_uniform_matches_torch_statistics(fan_in, fan_out):
    torch_stats = np.load(TORCH_STATS)
    keras.utils.set_random_seed(0)
    bound = 1.0 / math.sqrt(fan_in)
    for name, make in (
        ("kernel", initializers.TorchLinearUniform),
        ("bias", lambda: initializers.TorchLinearUniform(fan_in)),
    ):
        shape = (fan_in, fan_out) if name == "kernel" else (fan_out,)
        # A fresh initializer per layer, as every layer gets its own (one instance repeats).
        draws = np.concatenate([np.ravel(make()(shape)) for _ in range(20)]).astype(np.float64)
        key = f"{fan_in}x{fan_out}_{name}"
        # U(-b, b): every value within b, mean 0, variance b^2 / 3 (standard errors below).
        assert np.abs(draws).max() <= bound
        assert np.abs(draws).max() > 0.95 * bound
        n = draws.size
        assert abs(draws.mean()) < 5 * bound / math.sqrt(3 * n)
        assert abs(draws.var() - bound**2 / 3) < 5 * bound**2 * math.sqrt(4 / 45 / n)
        # torch's draws: the same bound and the same variance (within both samples' noise).
        np.testing.assert_allclose(torch_stats[f"{key}_absmax"], np.abs(draws).max(), rtol=0.05)
        torch_var, torch_n = float(torch_stats[f"{key}_var"]), int(torch_stats[f"{key}_count"])
        noise = bound**2 * math.sqrt(4 / 45) * (1 / math.sqrt(n) + 1 / math.sqrt(torch_n))
        assert abs(draws.var() - torch_var) < 5 * noise


def test_bias_needs_its_fan_in_and_config_round_trips():
    with pytest.raises(ValueError, match="fan_in"):
        initializers.TorchLinearUniform()((8,))
    init = initializers.TorchLinearUniform(fan_in=9, seed=3)
    clone = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert isinstance(clone, initializers.TorchLinearUniform) and clone.fan_in == 9
    assert np.abs(np.asarray(clone((1000,)))).max() <= 1 / 3


def test_prediction_head_layers_start_as_torch_linear_or_keras_dense():
    keras.utils.set_random_seed(1)
    torch_head = heads.prediction_head(8, 12, "mlp4")  # dims 8 -> 16 -> 8 -> 16 -> 12
    for i, fan_in in enumerate((8, 16, 8, 16), start=1):
        kernel, bias = _layer(torch_head, f"linear{i}").get_weights()
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        assert np.abs(bias).max() > 0.3 * bound  # a real draw, not zeros
    keras_head = heads.prediction_head(8, 12, "mlp4", init="keras")
    kernel, bias = _layer(keras_head, "linear1").get_weights()
    assert not bias.any()
    assert np.abs(kernel).max() > 1 / math.sqrt(8)  # glorot: sqrt(6 / 24) = 0.5 > 0.354
    with pytest.raises(ValueError, match="--head_init"):
        heads.prediction_head(8, 12, "linear", init="lecun")


def test_projection_head_reads_its_fan_in_when_built():
    keras.utils.set_random_seed(2)
    head = heads.ProjectionHead(32, 4, dropout_rates=(0.0, 0.0))
    head.build((None, 100))
    _, bias1 = head.linear1.get_weights()
    _, bias2 = head.linear2.get_weights()
    assert 0.05 < np.abs(bias1).max() <= 0.1  # 1 / sqrt(100)
    assert 0.05 < np.abs(bias2).max() <= 1 / math.sqrt(32)
    clone = heads.ProjectionHead.from_config(head.get_config())
    assert clone.init == "torch"
    keras_head = heads.ProjectionHead(32, 4, init="keras")
    keras_head.build((None, 100))
    assert not keras_head.linear1.get_weights()[1].any()


def test_feature_classifier_and_prototypes_take_the_init():
    keras.utils.set_random_seed(3)
    classifier = heads.feature_classifier(16, 10)
    assert 0.15 < np.abs(classifier.get_layer("linear1").get_weights()[1]).max() <= 0.25
    assert (
        not heads.feature_classifier(16, 10, init="keras").get_layer("linear1").bias.numpy().any()
    )
    for init in ("torch", "keras"):
        prototypes = clustering.Prototypes(50, 8, init=init)
        prototypes.build()
        np.testing.assert_allclose(
            np.linalg.norm(prototypes.kernel.numpy(), axis=0), 1.0, rtol=1e-5
        )
        assert clustering.Prototypes.from_config(prototypes.get_config()).init == init


def test_head_init_flag_reaches_the_config(tmp_path):
    config_lib.define_flags()
    fv = config_lib.FLAGS
    fv.unparse_flags()
    fv(["prog", f"--workdir={tmp_path}", "--teacher=recipe:supervised"])
    cfg = config_lib.config_from_flags(fv)
    assert cfg.model.head_init == "torch" and cfg.optim.momentum_form == "torch"
    fv.unparse_flags()
    fv(["prog", f"--workdir={tmp_path}", "--teacher=recipe:supervised", "--head_init=keras"])
    fv(["prog", "--momentum_form=keras"])
    cfg = config_lib.config_from_flags(fv)
    assert cfg.model.head_init == "keras" and cfg.optim.momentum_form == "keras"
