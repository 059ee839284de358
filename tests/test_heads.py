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
