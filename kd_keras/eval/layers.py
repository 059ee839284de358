"""`--eval_layer`: which activations of a `LoadedModel` are evaluated, as an embedding function.

"backbone" (the pooled backbone output; the SavedModel's serving function when there is one),
any backbone layer ("stem", "stage1".."stage4": a 4-D map is average-pooled over a g x g grid
with g = round(sqrt(m / channels)), so channels * g^2 is about the backbone's dimension m, as in
SimReg Table A4), "head_<teacher>" (a prediction head's output) or "head_<teacher>/<layer>"
(any layer of that head, SimReg Table 2).
"""

import dataclasses
import math

import keras

from kd_keras.eval import EvaluationError


def available_layers(loaded):
    """Names `--eval_layer` accepts for this model."""
    names = ["backbone"]
    if loaded.backbone is not None:
        names += [
            layer.name
            for layer in loaded.backbone.layers
            if layer.name in ("stem", "features") or layer.name.startswith("stage")
        ]
    for head_name, head in loaded.heads.items():
        names.append(head_name)
        names += [f"{head_name}/{layer.name}" for layer in head.layers[1:]]
    return names


def layer_embedding(loaded, layer="backbone"):
    """The embedding function of `--eval_layer` and a description of it.

    Args:
      loaded: `LoadedModel`.
      layer: see the module docstring.
    Returns:
      (embed, info): embed maps images float32 [B, S, S, 3] in [0, 1] to features [B, D]
      (a keras.Model, or the SavedModel function for "backbone" when the model has one);
      info is {"layer": str, "feature_dim": D, "pooling": str or None}.
    Raises:
      EvaluationError for an unknown layer, listing the known ones.
    """
    if layer in ("backbone", ""):
        embed = loaded.serve if loaded.serve is not None else loaded.backbone
        return embed, {"layer": "backbone", "feature_dim": loaded.feature_dim, "pooling": None}
    if loaded.backbone is None:
        raise EvaluationError(
            f"--eval_layer={layer}: {loaded.source} is a bare SavedModel; only 'backbone' is "
            "available (intermediate layers need backbone.keras or a run directory)."
        )
    head_name, _, head_layer = layer.partition("/")
    if head_name in loaded.heads:
        head = loaded.heads[head_name]
        if head_layer:
            try:
                sub = keras.Model(head.inputs, head.get_layer(head_layer).output)
            except ValueError as err:
                raise _unknown_layer(loaded, layer) from err
        else:
            sub = head
        images = keras.Input(loaded.backbone.input_shape[1:], name="images")
        out = sub(loaded.backbone(images, training=False), training=False)
        model = keras.Model(images, out, name=f"eval_{head_name}")
        return model, {"layer": layer, "feature_dim": int(out.shape[-1]), "pooling": None}
    if head_layer:
        raise _unknown_layer(loaded, layer)
    try:
        tensor = loaded.backbone.get_layer(layer).output
    except ValueError as err:
        raise _unknown_layer(loaded, layer) from err
    pooling = None
    if len(tensor.shape) == 4:
        grid = pooling_grid(tensor.shape, loaded.feature_dim)
        tensor = AdaptiveAveragePooling(grid, name="eval_pool")(tensor)
        pooling = f"adaptive average pool to {grid}x{grid}, flattened"
    elif len(tensor.shape) != 2:
        raise EvaluationError(f"--eval_layer={layer}: output shape {tensor.shape} is not usable.")
    model = keras.Model(loaded.backbone.inputs, tensor, name=f"eval_{layer}")
    return model, {"layer": layer, "feature_dim": int(tensor.shape[-1]), "pooling": pooling}


def keras_only(loaded):
    """`loaded` without its serving function, so "backbone" is the Keras backbone (for the
    protocols that train through or around it)."""
    return dataclasses.replace(loaded, serve=None)


def _unknown_layer(loaded, layer):
    return EvaluationError(
        f"--eval_layer={layer}: unknown layer; known: {', '.join(available_layers(loaded))}."
    )


def pooling_grid(shape, target_dim):
    """Grid side g for pooling a [B, H, W, C] map so that C * g^2 is about `target_dim`.

    g = round(sqrt(target_dim / C)), clipped to [1, min(H, W)].
    """
    _, height, width, channels = shape
    g = max(1, int(round(math.sqrt(target_dim / channels))))
    return min(g, int(height), int(width))


def _adaptive_pool(x, grid):
    """PyTorch AdaptiveAvgPool2d: bin i spans [floor(i H / g), ceil((i + 1) H / g))."""
    import tensorflow as tf

    height, width = int(x.shape[1]), int(x.shape[2])
    rows = []
    for i in range(grid):
        top, bottom = (i * height) // grid, -(-((i + 1) * height) // grid)
        cols = []
        for j in range(grid):
            left, right = (j * width) // grid, -(-((j + 1) * width) // grid)
            cols.append(tf.reduce_mean(x[:, top:bottom, left:right, :], axis=[1, 2]))
        rows.append(tf.stack(cols, axis=1))
    pooled = tf.stack(rows, axis=1)  # [B, g, g, C]
    return tf.reshape(pooled, [-1, grid * grid * int(x.shape[-1])])


@keras.saving.register_keras_serializable(package="kd_keras")
class AdaptiveAveragePooling(keras.layers.Layer):
    """[B, H, W, C] -> [B, g * g * C]: average over a g x g grid of bins, then flatten.

    Bins follow PyTorch's AdaptiveAvgPool2d, so g = 1 is global average pooling.
    """

    def __init__(self, grid, **kwargs):
        super().__init__(**kwargs)
        self.grid = int(grid)

    def call(self, inputs):
        return _adaptive_pool(inputs, self.grid)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.grid * self.grid * input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "grid": self.grid}
