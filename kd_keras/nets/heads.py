"""Prediction heads placed on the student backbone during distillation (dropped afterwards)."""

import keras
import tensorflow as tf

from kd_keras import choices
from kd_keras.nets import fused_batch_norm, initializers

HEAD_KINDS = choices.HEADS

# PyTorch's BatchNorm1d defaults (momentum 0.1 there == 0.9 here, epsilon 1e-5); the papers'
# heads were trained with them and Keras' own defaults (0.99, 1e-3) differ.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _bn(name, sync_bn, affine=True):
    return fused_batch_norm.BatchNorm(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        center=affine,
        scale=affine,
        synchronized=sync_bn,
        name=name,
    )


# Hidden layers each head kind has (the sizes --head_hidden_dims may override).
HIDDEN_LAYERS = {"linear": 0, "mlp2": 1, "mlp4": 3, "linear_official": 0, "mlp2_official": 1}


def head_dims(in_dim, out_dim, kind, hidden_dims=None):
    """Feature sizes along the head, input first: e.g. mlp4 -> (m, 2m, m, 2m, d)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"Unknown head kind {kind!r} (--head); choose one of {HEAD_KINDS}.")
    expected = HIDDEN_LAYERS[kind]
    if hidden_dims is not None:
        hidden = tuple(int(h) for h in hidden_dims)
        if len(hidden) != expected:
            raise ValueError(
                f"--head_hidden_dims needs {expected} sizes for a {kind} head, got {hidden}."
            )
    else:
        hidden = (2 * in_dim, in_dim, 2 * in_dim)[:expected]
    return (in_dim, *hidden, out_dim)


def prediction_head(
    in_dim,
    out_dim,
    kind="mlp4",
    hidden_dims=None,
    sync_bn=False,
    name="head",
    init="torch",
    batch_norm=True,
):
    """Builds a SimReg prediction head (supplement B.5, and the authors' code's variants).

    Layer order, with m = in_dim and d = out_dim:
      linear:          Dense(d)
      mlp2:            Dense(2m) BN ReLU Dense(d)
      mlp4:            Dense(2m) BN ReLU Dense(m) Dense(2m) BN ReLU Dense(d)
      linear_official: BN Dense(d)          (UCDvision/simreg `--linear_pred`)
      mlp2_official:   Dense(2m) Dense(d)   (UCDvision/simreg `--n_mlp_layers=2`)
    i.e. in the paper's heads BN + ReLU follow the 1st and 3rd linear layers only; the output
    has neither, so the head can reach any point of the teacher's feature space (mlp4 = two
    stacked mlp2 heads). The authors' code adds BN + ReLU only to its 4-layer MLP (its mlp4 is
    the paper's), so its 2-layer head is two affine maps in a row, and its linear head
    normalises the student's features first (that code path reads an undefined `proj_dim`
    and stops; m is what it means). With batch_norm=False the paper's heads keep their ReLUs
    but lose the BN: mlp2 is then SEED's student MLP (`seed/builder.py`: Linear(m, m) ReLU
    Linear(m, d), with hidden_dims=(m,)). Dense layers are named "linear1", "linear2", ...; the
    last one is also the model output; linear_official's BN is "bn0".

    Args:
      in_dim: student feature size m. out_dim: teacher feature size d.
      kind: one of HEAD_KINDS.
      hidden_dims: optional override of the hidden sizes (e.g. (d, d, d) for the paper's
        Table 2 ablation); HIDDEN_LAYERS[kind] entries.
      sync_bn: synchronise BN statistics across replicas.
      init: "torch" (torch.nn.Linear's init, the reference code's) or "keras" (glorot /
        zeros); see `kd_keras.nets.initializers`.
      batch_norm: BN before the ReLUs of mlp2 / mlp4 (--head_batch_norm; SimReg's heads have
        it, SEED's student MLP not). The other kinds have no such BN.
    Returns:
      keras.Model mapping float [B, m] -> float [B, d].
    """
    dims = head_dims(in_dim, out_dim, kind, hidden_dims)
    inputs = keras.Input((in_dim,), name=f"{name}_input")
    x = inputs
    if kind == "linear_official":
        x = _bn("bn0", sync_bn)(x)
    num_linear = len(dims) - 1
    with_relu = not kind.endswith("_official")
    for i, (fan_in, width) in enumerate(zip(dims[:-1], dims[1:], strict=True), start=1):
        x = initializers.dense(width, fan_in, init, name=f"linear{i}")(x)
        # BN + ReLU after odd-numbered linear layers that are not the output.
        if with_relu and i % 2 == 1 and i < num_linear:
            if batch_norm:
                x = _bn(f"bn{i}", sync_bn)(x)
            x = keras.layers.ReLU(name=f"relu{i}")(x)
    return keras.Model(inputs, x, name=name)


def feature_batch_norm(name, sync_bn=False):
    """BN without affine parameters, used by the Regress-BN baseline on both feature sets."""
    return _bn(name, sync_bn, affine=False)


@keras.saving.register_keras_serializable(package="kd_keras")
class GradientReversal(keras.layers.Layer):
    """Gradient reversal layer (Ganin & Lempitsky): identity forward, gradient * alpha backward.

    Forward: y = x. Backward: dL/dx = alpha * dL/dy. The layer multiplies by `alpha` exactly as
    stored and does NOT negate it again: the sign lives in `alpha`. OSS's schedule
    (`kd_keras.optim.schedules.grl_alpha`) goes from 0 at the first step towards -1 at the last, so
    the feature classifier behind this layer is trained normally while the network in front
    of it receives the classifier's gradient reversed and scaled by |alpha|. alpha = 1 is a
    plain identity, alpha = 0 blocks the gradient.

    `alpha` is a non-trainable float32 scalar variable of the layer (in
    `non_trainable_weights`), so a callback or `train_step` can change it every step without
    retracing and its current value is saved and restored with the weights. Under a
    tf.distribute strategy it may be set in cross-replica context (a callback) or in replica
    context (every replica computes the same value; the first replica's is kept).

    Args:
      alpha: initial multiplier (float).
    Input/output: any float tensor [...], returned unchanged.
    """

    def __init__(self, alpha=0.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_alpha = float(alpha)
        # autocast=False keeps alpha float32 under mixed precision; it is cast to the
        # gradient's dtype only when used.
        self.alpha = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_alpha),
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation="only_first_replica",
            name="alpha",
        )

    def set_alpha(self, value):
        """Sets the gradient multiplier (Python number or scalar tensor, e.g. grl_alpha(...))."""
        self.alpha.assign(tf.cast(value, tf.float32))

    def call(self, inputs):
        return _scale_gradient(inputs, tf.convert_to_tensor(self.alpha))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        # The current alpha travels with the weights; the config keeps the initial value.
        config = super().get_config()
        config["alpha"] = self.initial_alpha
        return config


@tf.custom_gradient
def _scale_gradient(x, alpha):
    def grad(upstream):
        # alpha is a schedule-driven constant: it gets a zero gradient, never an update.
        return upstream * tf.cast(alpha, upstream.dtype), tf.zeros_like(alpha)

    return tf.identity(x), grad


DROPOUT_POSITIONS = ("output", "input")


@keras.saving.register_keras_serializable(package="kd_keras")
class ProjectionHead(keras.layers.Layer):
    """SwAV/OSS projection head: Linear1(hidden) -> BN -> ReLU -> Linear2(out), with an
    optional dropout pass that OSS uses to make extra views (appendix A.1).

    Dropout placement. OSS says dropout is applied "at (Linear1, Linear2)" with rates
    (0.1, 0.05) and its pseudo-code writes normalize(Dropout(h(f(x)))). With
    `dropout_position="output"` (default) dropout acts on each linear layer's output:

      Linear1 -> Dropout(rate1) -> BN -> ReLU -> Linear2 -> Dropout(rate2)

    so the last dropout sits exactly where the pseudo-code puts it (between the head and the
    l2 normalisation). `dropout_position="input"` reads "at Linear_k" as on its input instead:
    Dropout(rate1) -> Linear1 -> BN -> ReLU -> Dropout(rate2) -> Linear2. Without
    `dropout_seed` the head is the plain SwAV head. The dropout is stateless: its mask is a
    function of `dropout_seed` (the caller passes the step and replica), so runs replay
    exactly and no random-generator state enters the checkpoints.

    Args:
      hidden_dim: Linear1 width (2048 in SwAV/OSS).
      output_dim: embedding size E (128).
      dropout_rates: (rate1, rate2), each in [0, 1).
      dropout_position: "output" or "input" (see above).
      sync_bn: synchronise the BN statistics across replicas.
      init: "torch" or "keras", how the two Dense layers start (`kd_keras.nets.initializers`).
    Call: features float [B, m] -> embeddings [B, E] (not normalised).
    """

    def __init__(
        self,
        hidden_dim=2048,
        output_dim=128,
        dropout_rates=(0.1, 0.05),
        dropout_position="output",
        sync_bn=False,
        init="torch",
        **kwargs,
    ):
        super().__init__(**kwargs)
        initializers.check_init(init)
        rates = tuple(float(r) for r in dropout_rates)
        if len(rates) != 2 or not all(0.0 <= r < 1.0 for r in rates):
            raise ValueError(
                f"dropout_rates must be two rates in [0, 1) for (Linear1, Linear2), got "
                f"{dropout_rates!r} (--proj_dropout)."
            )
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(
                f"dropout_position must be one of {DROPOUT_POSITIONS}, got {dropout_position!r}."
            )
        self.hidden_dim = int(hidden_dim)
        self.output_dim = int(output_dim)
        self.dropout_rates = rates
        self.dropout_position = dropout_position
        self.sync_bn = bool(sync_bn)
        self.init = init
        # Initialisers made here, so their seeds are drawn in construction order; Linear1's
        # fan-in (its bias bound under torch's init) is set when the input size is known.
        self.linear1 = initializers.dense(self.hidden_dim, None, init, name="linear1")
        self.bn = _bn("bn1", self.sync_bn)
        self.linear2 = initializers.dense(self.output_dim, self.hidden_dim, init, name="linear2")

    def build(self, input_shape):
        if isinstance(self.linear1.bias_initializer, initializers.TorchLinearUniform):
            self.linear1.bias_initializer.fan_in = int(input_shape[-1])
        self.linear1.build(input_shape)
        self.bn.build((None, self.hidden_dim))
        self.linear2.build((None, self.hidden_dim))
        self.built = True

    def _drop(self, x, k, dropout_seed):
        rate = self.dropout_rates[k]
        if dropout_seed is None or rate == 0.0:
            return x
        seed = tf.stack([tf.cast(dropout_seed[0], tf.int64), tf.cast(dropout_seed[1], tf.int64)])
        seed = tf.random.experimental.stateless_fold_in(seed, k, alg="philox")
        # Counter-based Philox keyed by the seed: the same seed gives the same mask on every
        # run (XLA may still draw other masks than the TF kernels; both are valid dropout).
        keep = tf.random.stateless_uniform(tf.shape(x), seed, alg="philox") >= rate
        return tf.where(keep, x / tf.cast(1.0 - rate, x.dtype), tf.zeros_like(x))

    def call(self, features, training=False, dropout_seed=None):
        """Embeddings [B, E]; `dropout_seed` (int [2]) switches the dropout pass on."""
        x = features
        if self.dropout_position == "input":
            x = self._drop(x, 0, dropout_seed)
        x = self.linear1(x)
        if self.dropout_position == "output":
            x = self._drop(x, 0, dropout_seed)
        x = tf.nn.relu(self.bn(x, training=training))
        if self.dropout_position == "input":
            x = self._drop(x, 1, dropout_seed)
        x = self.linear2(x)
        if self.dropout_position == "output":
            x = self._drop(x, 1, dropout_seed)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            dropout_rates=list(self.dropout_rates),
            dropout_position=self.dropout_position,
            sync_bn=self.sync_bn,
            init=self.init,
        )
        return config


def feature_classifier(
    in_dim, hidden_dim=100, sync_bn=False, name="feature_classifier", init="torch"
):
    """OSS feature classifier D: Linear(100) -> BN -> ReLU -> Linear(2) (teacher 0, student 1).

    It is placed behind a `GradientReversal` layer by the OSS method, not here, so the same
    classifier can be evaluated on its own. `init`: "torch" or "keras" (`nets.initializers`).

    Returns:
      keras.Model float [N, in_dim] -> logits [N, 2].
    """
    inputs = keras.Input((in_dim,), name=f"{name}_input")
    x = initializers.dense(hidden_dim, in_dim, init, name="linear1")(inputs)
    x = _bn("bn1", sync_bn)(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = initializers.dense(2, hidden_dim, init, name="linear2")(x)
    return keras.Model(inputs, x, name=name)
