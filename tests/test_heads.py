import keras
import numpy as np
import pytest

from kd_keras.nets.heads import prediction_head


def _layer_summary(model):
    out = []
    for layer in model.layers[1:]:
        kind = type(layer).__name__
        if isinstance(layer, keras.layers.BatchNormalization):
            kind = "BatchNormalization"  # kd_keras' fused subclass included
        width = layer.units if kind == "Dense" else None
        out.append((kind, width))
    return out


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("linear", [("Dense", 6)]),
        ("mlp2", [("Dense", 8), ("BatchNormalization", None), ("ReLU", None), ("Dense", 6)]),
        (
            "mlp4",
            [
                ("Dense", 8),
                ("BatchNormalization", None),
                ("ReLU", None),
                ("Dense", 4),
                ("Dense", 8),
                ("BatchNormalization", None),
                ("ReLU", None),
                ("Dense", 6),
            ],
        ),
    ],
)
def test_head_layer_order_and_widths(kind, expected):
    head = prediction_head(4, 6, kind)
    assert _layer_summary(head) == expected
    out = head(np.zeros((3, 4), np.float32))
    assert out.shape == (3, 6)


def test_head_batchnorm_uses_pytorch_defaults():
    head = prediction_head(4, 6, "mlp4", sync_bn=True)
    bns = [layer for layer in head.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 2
    for bn in bns:
        assert bn.momentum == pytest.approx(0.9)
        assert bn.epsilon == pytest.approx(1e-5)
        assert bn.synchronized


def test_head_hidden_dims_override_for_table2_ablation():
    head = prediction_head(4, 6, "mlp4", hidden_dims=(6, 6, 6))
    assert [w for k, w in _layer_summary(head) if k == "Dense"] == [6, 6, 6, 6]
    with pytest.raises(ValueError, match="needs 3 sizes"):
        prediction_head(4, 6, "mlp4", hidden_dims=(6,))


def test_unknown_head_kind_names_the_flag():
    with pytest.raises(ValueError, match="--head"):
        prediction_head(4, 6, "mlp3")


def _numpy_train_bn(x, gamma, beta, eps=1e-5):
    """torch.nn.BatchNorm1d in train mode: batch mean and biased batch variance."""
    mean, var = x.mean(0), x.var(0)
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def test_official_heads_compute_the_authors_layers():
    # UCDvision/simreg mlp_arch: get_linear_proj = BatchNorm1d(m) + Linear(m, d) (--linear_pred);
    # get_mlp(n_layers=2) = Linear(m, 2m) + Linear(2m, d), no BN or ReLU between them.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    linear = prediction_head(4, 6, "linear_official")
    bn, dense = linear.get_layer("bn0"), linear.get_layer("linear1")
    bn.gamma.assign(rng.uniform(0.5, 1.5, 4))
    bn.beta.assign(rng.normal(size=4))
    expected = _numpy_train_bn(x, np.asarray(bn.gamma), np.asarray(bn.beta))
    expected = expected @ np.asarray(dense.kernel) + np.asarray(dense.bias)
    np.testing.assert_allclose(linear(x, training=True), expected, rtol=1e-4, atol=1e-5)

    mlp2 = prediction_head(4, 6, "mlp2_official")
    assert _layer_summary(mlp2) == [("Dense", 8), ("Dense", 6)]
    first, second = (mlp2.get_layer(n) for n in ("linear1", "linear2"))
    x = -np.abs(x)  # negative inputs: a ReLU anywhere would zero much of this
    expected = x @ np.asarray(first.kernel) + np.asarray(first.bias)
    expected = expected @ np.asarray(second.kernel) + np.asarray(second.bias)
    np.testing.assert_allclose(mlp2(x, training=True), expected, rtol=1e-4, atol=1e-5)


def test_official_heads_take_the_hidden_dims_override():
    assert [w.shape for w in prediction_head(4, 6, "mlp2_official", hidden_dims=[3]).weights] == [
        (4, 3), (3,), (3, 6), (6,)
    ]
    with pytest.raises(ValueError, match="needs 0 sizes for a linear_official head"):
        prediction_head(4, 6, "linear_official", hidden_dims=[3])
