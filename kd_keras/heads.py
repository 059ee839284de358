"""Prediction heads placed on the student backbone during distillation (dropped afterwards)."""

import keras

HEAD_KINDS = ("linear", "mlp2", "mlp4")

# PyTorch's BatchNorm1d defaults (momentum 0.1 there == 0.9 here, epsilon 1e-5); the papers'
# heads were trained with them and Keras' own defaults (0.99, 1e-3) differ.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _bn(name, sync_bn, affine=True):
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        center=affine,
        scale=affine,
        synchronized=sync_bn,
        name=name,
    )


def head_dims(in_dim, out_dim, kind, hidden_dims=None):
    """Feature sizes along the head, input first: e.g. mlp4 -> (m, 2m, m, 2m, d)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"Unknown head kind {kind!r} (--head); choose one of {HEAD_KINDS}.")
    if hidden_dims is not None:
        hidden = tuple(int(h) for h in hidden_dims)
        expected = {"linear": 0, "mlp2": 1, "mlp4": 3}[kind]
        if len(hidden) != expected:
            raise ValueError(
                f"--head_hidden_dims needs {expected} sizes for a {kind} head, got {hidden}."
            )
    else:
        hidden = {"linear": (), "mlp2": (2 * in_dim,), "mlp4": (2 * in_dim, in_dim, 2 * in_dim)}[
            kind
        ]
    return (in_dim, *hidden, out_dim)


def prediction_head(in_dim, out_dim, kind="mlp4", hidden_dims=None, sync_bn=False, name="head"):
    """Builds a SimReg prediction head (supplement B.5).

    Layer order, with m = in_dim and d = out_dim:
      linear: Dense(d)
      mlp2:   Dense(2m) BN ReLU Dense(d)
      mlp4:   Dense(2m) BN ReLU Dense(m) Dense(2m) BN ReLU Dense(d)
    i.e. BN + ReLU follow the 1st and 3rd linear layers only; the output has neither, so the
    head can reach any point of the teacher's feature space (mlp4 = two stacked mlp2 heads).
    Dense layers are named "linear1", "linear2", ...; the last one is also the model output.

    Args:
      in_dim: student feature size m. out_dim: teacher feature size d.
      kind: "linear", "mlp2" or "mlp4".
      hidden_dims: optional override of the hidden sizes (e.g. (d, d, d) for the paper's
        Table 2 ablation); must have 0 / 1 / 3 entries for linear / mlp2 / mlp4.
      sync_bn: synchronise BN statistics across replicas.
    Returns:
      keras.Model mapping float [B, m] -> float [B, d].
    """
    dims = head_dims(in_dim, out_dim, kind, hidden_dims)
    inputs = keras.Input((in_dim,), name=f"{name}_input")
    x = inputs
    num_linear = len(dims) - 1
    for i, width in enumerate(dims[1:], start=1):
        x = keras.layers.Dense(width, name=f"linear{i}")(x)
        # BN + ReLU after odd-numbered linear layers that are not the output.
        if i % 2 == 1 and i < num_linear:
            x = _bn(f"bn{i}", sync_bn)(x)
            x = keras.layers.ReLU(name=f"relu{i}")(x)
    return keras.Model(inputs, x, name=name)


def feature_batch_norm(name, sync_bn=False):
    """BN without affine parameters, used by the Regress-BN baseline on both feature sets."""
    return _bn(name, sync_bn, affine=False)
