"""How the Dense layers of heads, projection heads, prototypes and classifiers start.

The methods' reference code is PyTorch, whose `nn.Linear` draws its weight with
`kaiming_uniform_(a=sqrt(5))` and its bias uniformly in the same range: both end up
U(-1/sqrt(fan_in), +1/sqrt(fan_in)). Keras' Dense starts from glorot-uniform kernels
(U(+-sqrt(6 / (fan_in + fan_out)))) and zero biases; for a 512 -> 1024 layer that is a
kernel about 1.9x wider, so a head's output is larger at initialisation and a loss that reads
the normalised output takes a smaller effective step (issue 21). `--head_init` chooses.
"""

import math

import keras

from kd_keras import choices

HEAD_INITS = choices.HEAD_INITS


@keras.saving.register_keras_serializable(package="kd_keras")
class TorchLinearUniform(keras.initializers.RandomUniform):
    """U(-1/sqrt(fan_in), +1/sqrt(fan_in)): torch.nn.Linear's default weight and bias init.

    For a Keras Dense kernel [fan_in, units] the fan-in is the first dimension of the shape;
    a bias [units] does not carry it, so pass `fan_in` (the layer's input size) for biases.
    Prototypes [E, K] (one prototype per column) also read fan_in = E from the shape, as
    torch's `nn.Linear(E, K, bias=False)` weight [K, E] does.

    kaiming_uniform_ with a = sqrt(5): gain = sqrt(2 / (1 + a^2)) = sqrt(1/3) and bound =
    sqrt(3) * gain / sqrt(fan_in) = 1 / sqrt(fan_in); torch's bias bound is 1 / sqrt(fan_in)
    by definition. Same bounds, not the same random numbers as torch.

    Args:
      fan_in: None (read it from shape[0]) or the input size (required for biases).
      seed: as keras.initializers.RandomUniform (None: Keras' global seed generator, so
        `keras.utils.set_random_seed` makes it reproducible).
    """

    def __init__(self, fan_in=None, seed=None):
        super().__init__(-1.0, 1.0, seed=seed)
        if fan_in is not None and int(fan_in) < 1:
            raise ValueError(f"TorchLinearUniform: fan_in must be >= 1, got {fan_in!r}.")
        self.fan_in = None if fan_in is None else int(fan_in)

    def bound(self, shape):
        """1 / sqrt(fan_in) for a tensor of `shape`."""
        fan_in = self.fan_in if self.fan_in is not None else shape[0]
        if len(shape) < 2 and self.fan_in is None:
            raise ValueError(
                f"TorchLinearUniform: a {len(shape)}-d shape {tuple(shape)} (a bias) needs "
                "fan_in given explicitly."
            )
        return 1.0 / math.sqrt(fan_in)

    def __call__(self, shape, dtype=None):
        bound = self.bound(shape)
        return keras.random.uniform(
            shape, -bound, bound, dtype=dtype or keras.config.floatx(), seed=self.seed
        )

    def get_config(self):
        config = super().get_config()
        config.pop("minval", None)
        config.pop("maxval", None)
        config["fan_in"] = self.fan_in
        return config


def check_init(init):
    """Raises a ValueError naming --head_init unless `init` is one of HEAD_INITS."""
    if init not in HEAD_INITS:
        raise ValueError(f"--head_init={init!r}: choose one of {HEAD_INITS}.")


def dense_initializers(fan_in, init="torch"):
    """{kernel_initializer, bias_initializer} for a Dense layer of input size `fan_in`.

    torch: both `TorchLinearUniform`; keras: glorot_uniform and zeros (Keras' defaults).
    fan_in may be None when the input size is not known yet: set the bias initializer's
    `fan_in` before the layer is built.
    """
    check_init(init)
    if init == "keras":
        return dict(kernel_initializer="glorot_uniform", bias_initializer="zeros")
    return dict(
        kernel_initializer=TorchLinearUniform(), bias_initializer=TorchLinearUniform(fan_in)
    )


def dense(units, fan_in, init="torch", name=None, **kwargs):
    """A keras.layers.Dense(units) on inputs [..., fan_in] initialised as `init` says."""
    return keras.layers.Dense(units, name=name, **dense_initializers(fan_in, init), **kwargs)
