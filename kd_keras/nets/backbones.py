"""Student / teacher backbone networks, built by name.

Every backbone is a functional `keras.Model` that maps images float32 [B, H, W, 3] with values in
[0, 1] to features float32 [B, m], the global average pool of its last stage. Input normalisation
is the model's first layer (`InputNormalization`), so callers always feed [0, 1] images and an
exported backbone carries its own preprocessing.

Names and feature sizes m (`FEATURE_DIMS`):

  resnet18, resnet34   512    torchvision layout, BasicBlock, [2,2,2,2] / [3,4,6,3]
  resnet50             2048   torchvision v1.5 layout, Bottleneck (stride on the 3x3 conv)
  mobilenetv2          1280   keras.applications.MobileNetV2 (alpha 1.0), weights=None
  efficientnetb0       1280   keras.applications.EfficientNetB0, weights=None
  resnet_small         256    BasicBlock, [1,1,1,1], widths 32/64/128/256 (quick CPU teachers)
  resnet_tiny          64     BasicBlock, [1,1,1,1], widths 8/16/32/64, small stem (tests, CI)
  convnet_tiny         64     3 x (conv3x3/2 BN ReLU), widths 16/32/64 (tests, CI)
  regnety600mf         608    RegNetY-600MF (pycls), torchvision RegNet layout, widths
                              48/112/256/608, depths 1/3/7/4, group width 16, SE 0.25

Stable layer names, for `model.get_layer(name).output`:
  ResNets, RegNets: "stem" (output of the stem), "stage1".."stage4" (output of each stage).
  convnet_tiny: "stage1".."stage3".
  All backbones: "images" (the input), "input_normalization", "features" (the pooled output).
The keras.applications backbones keep their own inner layer names (no "stageN" layers).
"""

import dataclasses
import itertools
import re

import keras
import numpy as np
from keras import layers, ops

from kd_keras.nets import fused_batch_norm

FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "mobilenetv2": 1280,
    "efficientnetb0": 1280,
    "resnet_small": 256,
    "resnet_tiny": 64,
    "convnet_tiny": 64,
    "regnety600mf": 608,
}
BACKBONE_NAMES = tuple(FEATURE_DIMS)

# Concrete normalisations that `normalize_images` applies; "native" is resolved per architecture
# by `resolve_norm` before it reaches them.
NORM_MODES = ("imagenet", "unit", "minus_one_one")
NORMS = (*NORM_MODES, "native")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PyTorch's BatchNorm defaults: its momentum 0.1 weights the *new* batch statistic, Keras'
# momentum weights the *old* running value, so 0.1 there == 0.9 here. Keras' own defaults
# (0.99, 1e-3) would change the training dynamics the recipes were tuned with.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Inputs at most this many pixels wide get the CIFAR-style stem when small_stem is None: the
# ImageNet stem would shrink a 32 px image to 8 px before the first residual stage.
SMALL_STEM_MAX_SIZE = 64

# keras.applications refuse inputs smaller than this.
_MIN_APPLICATION_SIZE = 32

# name -> (block kind, blocks per stage, base widths per stage). The stem width is widths[0].
_RESNET_SPECS = {
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet_small": ("basic", (1, 1, 1, 1), (32, 64, 128, 256)),
    "resnet_tiny": ("basic", (1, 1, 1, 1), (8, 16, 32, 64)),
}
_CONVNET_TINY_WIDTHS = (16, 32, 64)

# What each architecture "natively" expects, as a concrete mode. EfficientNetB0's own
# Rescaling(1/255) is undone in front of it (see `_application_features`) and its Normalization
# layer is the identity without ImageNet weights, so natively its stem sees [0, 1] images.
_NATIVE_NORMS = {
    "resnet18": "imagenet",
    "resnet34": "imagenet",
    "resnet50": "imagenet",
    "resnet_small": "imagenet",
    "resnet_tiny": "imagenet",
    "convnet_tiny": "imagenet",
    "regnety600mf": "imagenet",
    "mobilenetv2": "minus_one_one",
    "efficientnetb0": "unit",
}


def _check_name(name):
    if name not in FEATURE_DIMS:
        raise ValueError(f"Unknown backbone name {name!r}; valid names are {BACKBONE_NAMES}.")


def resolve_norm(name, norm):
    """The concrete normalisation mode (one of `NORM_MODES`) used by backbone `name`.

    "native" means what the architecture expects: "imagenet" mean/std for the ResNets and tiny
    nets, "minus_one_one" ([-1, 1]) for MobileNetV2, and for EfficientNetB0 the [0, 1] images that
    keras.applications' untrained EfficientNetB0 sees after its internal Rescaling(1/255), i.e.
    exactly as if the application were fed x * 255. Other modes are returned unchanged.
    """
    _check_name(name)
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {NORMS}.")
    return _NATIVE_NORMS[name] if norm == "native" else norm


def normalize_images(images, mode):
    """Normalises images with values in [0, 1] (pure function, no state).

    Args:
      images: float tensor or array [..., 3] (any leading shape, channels last) in [0, 1].
        "unit" and "minus_one_one" accept any number of channels.
      mode: "imagenet" ((x - mean) / std with ImageNet's per-channel RGB statistics),
        "unit" (identity) or "minus_one_one" (x * 2 - 1). "native" depends on the architecture:
        resolve it first with `resolve_norm(name, "native")`.

    Returns:
      A tensor with the shape and float dtype of `images`.
    """
    if mode not in NORM_MODES:
        hint = " (resolve 'native' with resolve_norm(name, norm))" if mode == "native" else ""
        raise ValueError(f"Unknown normalisation mode {mode!r}{hint}; choose one of {NORM_MODES}.")
    images = ops.convert_to_tensor(images)
    if "float" not in str(images.dtype):
        # Integer images are almost surely uint8 in [0, 255]; silently casting them would feed
        # the network values 255 times too large.
        raise ValueError(
            f"images must be floats in [0, 1], got dtype {images.dtype}; "
            "convert with images / 255 first."
        )
    if mode == "unit":
        return images
    if mode == "minus_one_one":
        return images * 2.0 - 1.0
    if images.shape[-1] is not None and images.shape[-1] != 3:
        raise ValueError(
            f"images must have 3 (RGB) channels for 'imagenet' normalisation, got shape "
            f"{tuple(images.shape)}."
        )
    mean = ops.convert_to_tensor(IMAGENET_MEAN, dtype=images.dtype)
    std = ops.convert_to_tensor(IMAGENET_STD, dtype=images.dtype)
    return (images - mean) / std


@keras.saving.register_keras_serializable(package="kd_keras")
class InputNormalization(keras.layers.Layer):
    """Applies `normalize_images(inputs, mode)`; has no weights.

    Input: float [B, H, W, C] in [0, 1]. Output: same shape, in the layer's compute dtype.

    Args:
      mode: one of `NORM_MODES` ("imagenet", "unit", "minus_one_one").
    """

    def __init__(self, mode="imagenet", **kwargs):
        super().__init__(**kwargs)
        if mode not in NORM_MODES:
            raise ValueError(
                f"InputNormalization: unknown mode {mode!r}; choose one of {NORM_MODES}."
            )
        self.mode = mode

    def call(self, inputs):
        return normalize_images(inputs, self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _in_xla_context():
    """Whether the op being traced is XLA-compiled (a jit_compile=True tf.function)."""
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # not the TensorFlow backend, or TF moved the helper: assume not
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _block_diagonal(kernel, groups):
    """The dense [k, k, C_in, C_out] kernel equal to a grouped [k, k, C_in / G, C_out] one."""
    kh, kw, cin_g, cout = kernel.shape
    cout_g = cout // groups
    blocks = ops.reshape(kernel, (kh, kw, cin_g, groups, cout_g))
    eye = ops.eye(groups, dtype=kernel.dtype)
    dense = ops.einsum("hwiao,ab->hwaibo", blocks, eye)
    return ops.reshape(dense, (kh, kw, groups * cin_g, cout))


@keras.saving.register_keras_serializable(package="kd_keras")
class GroupedConv2D(layers.Conv2D):
    """`keras.layers.Conv2D(groups=G)` with a TensorFlow op chosen for speed (same weights).

    Keras' TensorFlow backend compiles every grouped convolution with XLA ("broken on CPU
    without XLA", true of old TF). In TF 2.21 the CPU kernel computes grouped convolutions and
    their gradients correctly (tests/test_regnet.py checks it against a block-diagonal dense
    conv), and XLA's CPU grouped convolution is very slow: a 256-channel, group-width-16 3x3
    conv at batch 32, 4 x 4 px took 455 ms forward + backward under XLA against 6 ms with TF's
    kernel (docs/regnet.md). So this layer calls the op directly; inside an XLA-compiled step
    on a machine without a GPU it runs the equivalent dense conv with a block-diagonal kernel
    (G times the FLOPs, 28 ms there), which XLA's CPU backend does well. On GPUs the grouped op
    is used as it is (cuDNN), with or without XLA.

    Input/output as Conv2D ([B, H, W, C_in] -> [B, H', W', filters], channels_last only); the
    kernel is [kh, kw, C_in / groups, filters], so checkpoints and the converter see a Conv2D.
    """

    def convolution_op(self, inputs, kernel):
        if keras.backend.backend() != "tensorflow" or self.groups == 1:
            return super().convolution_op(inputs, kernel)
        import tensorflow as tf

        if self.data_format != "channels_last":
            raise ValueError("GroupedConv2D supports channels_last only.")
        if _in_xla_context() and not tf.config.list_logical_devices("GPU"):
            kernel = _block_diagonal(kernel, self.groups)
        return tf.nn.convolution(
            inputs,
            kernel,
            strides=list(self.strides),
            padding=self.padding.upper(),
            dilations=list(self.dilation_rate),
            data_format="NHWC",
        )


def batch_norm(
    name=None, sync_bn=False, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, axis=-1, **kwargs
):
    """A BatchNormalization layer with PyTorch's defaults (momentum 0.9 == torch's 0.1, eps 1e-5).

    Args:
      name: layer name.
      sync_bn: bool, `synchronized=True`: batch statistics are all-reduced over the replicas of
        a tf.distribute strategy (TensorFlow backend only).
      momentum, epsilon, axis: as in keras.layers.BatchNormalization.
      **kwargs: passed on (e.g. center=False, scale=False).

    Returns:
      A keras.layers.BatchNormalization (`fused_batch_norm.BatchNorm`, on TF's fused kernel)
      mapping [..., C] -> [..., C].
    """
    return fused_batch_norm.BatchNorm(
        axis=axis,
        momentum=momentum,
        epsilon=epsilon,
        synchronized=bool(sync_bn),
        name=name,
        **kwargs,
    )


def conv_initializer():
    """He-normal with fan_out, as torchvision's ResNets (kaiming_normal_, mode="fan_out")."""
    # Untruncated, like torch's kaiming_normal_; keras' HeNormal truncates and uses fan_in.
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal"
    )


def _conv(x, filters, kernel, stride, name, groups=1):
    """Bias-free conv with torchvision's symmetric padding (kernel // 2 on every side).

    groups > 1: grouped conv (`GroupedConv2D`, kernel [k, k, C_in / groups, filters]); channel
    groups are contiguous, as in torch, so torch kernels transpose onto it directly.
    """
    pad = kernel // 2
    if stride > 1 and pad > 0:
        # Keras' "same" pads stride-2 convs asymmetrically (more at the bottom/right), which
        # shifts the sampling grid relative to torchvision; explicit padding keeps them aligned.
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    conv = GroupedConv2D if groups > 1 else layers.Conv2D
    return conv(
        filters,
        kernel,
        strides=stride,
        padding=padding,
        groups=groups,
        use_bias=False,
        kernel_initializer=conv_initializer(),
        name=name,
    )(x)


def _basic_block(x, filters, stride, name, out_name, bn):
    shortcut = x
    y = _conv(x, filters, 3, stride, f"{name}_conv1")
    y = bn(f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = _conv(y, filters, 3, 1, f"{name}_conv2")
    y = bn(f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(x, filters, 1, stride, f"{name}_proj_conv")
        shortcut = bn(f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=out_name)(y)


def _bottleneck_block(x, filters, stride, name, out_name, bn, out_filters=None):
    # out_filters differs from 4 * filters only in wide ResNets (torchvision's wide_resnet*_2
    # widen the two inner convs, not the block output).
    out_filters = 4 * filters if out_filters is None else out_filters
    shortcut = x
    y = _conv(x, filters, 1, 1, f"{name}_conv1")
    y = bn(f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    # ResNet v1.5: the stride sits on the 3x3 conv, not on the first 1x1 (which would discard
    # three quarters of the input before any spatial filtering).
    y = _conv(y, filters, 3, stride, f"{name}_conv2")
    y = bn(f"{name}_bn2")(y)
    y = layers.ReLU(name=f"{name}_relu2")(y)
    y = _conv(y, out_filters, 1, 1, f"{name}_conv3")
    y = bn(f"{name}_bn3")(y)
    if stride != 1 or x.shape[-1] != out_filters:
        shortcut = _conv(x, out_filters, 1, stride, f"{name}_proj_conv")
        shortcut = bn(f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=out_name)(y)


def _resnet_features(x, name, small_stem, bn):
    kind, blocks, widths = _RESNET_SPECS[name]
    return _resnet_spec_features(x, ResNetSpec(kind, blocks, widths), small_stem, bn)


def _resnet_spec_features(x, spec, small_stem, bn, max_pool="torch"):
    """The ResNet trunk of `spec` grown on `x`; max_pool "torch" or "tf_same" (see build_resnet)."""
    if small_stem:
        x = _conv(x, spec.stem_width, 3, 1, "stem_conv")
        x = bn("stem_bn")(x)
        x = layers.ReLU(name="stem")(x)
    else:
        x = _conv(x, spec.stem_width, 7, 2, "stem_conv")
        x = bn("stem_bn")(x)
        x = layers.ReLU(name="stem_relu")(x)
        if max_pool == "tf_same":
            # TF's SAME pooling: the window grid starts at row/column 0 and any padding goes to
            # the bottom/right (none for odd sides, one row/column for even sides).
            x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem")(x)
        else:
            # Zero padding equals torch's -inf padding here because the inputs are post-ReLU
            # (>= 0).
            x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
            x = layers.MaxPooling2D(3, strides=2, name="stem")(x)
    for s, num_blocks in enumerate(spec.blocks, start=1):
        for b in range(num_blocks):
            stride = 2 if (s > 1 and b == 0) else 1
            out_name = f"stage{s}" if b == num_blocks - 1 else f"stage{s}_block{b}_out"
            block_name = f"stage{s}_block{b}"
            if spec.block == "basic":
                x = _basic_block(x, spec.widths[s - 1], stride, block_name, out_name, bn)
            else:
                x = _bottleneck_block(
                    x,
                    spec.inner_widths[s - 1],
                    stride,
                    block_name,
                    out_name,
                    bn,
                    out_filters=spec.out_widths[s - 1],
                )
    return x


def _convnet_tiny_features(x, bn):
    for s, filters in enumerate(_CONVNET_TINY_WIDTHS, start=1):
        x = _conv(x, filters, 3, 2, f"stage{s}_conv")
        x = bn(f"stage{s}_bn")(x)
        x = layers.ReLU(name=f"stage{s}")(x)
    return x


def _application_features(x, name, image_size):
    """Last feature map of a keras.applications net (weights=None) grown on tensor `x`.

    `x` is already normalised by our InputNormalization; passing it as `input_tensor` puts the
    application's layers into the same flat graph (not a nested model), so their BN layers are
    reachable from `model.layers` and `get_layer` sees their names.
    """
    shape = (image_size, image_size, 3)
    if name == "efficientnetb0":
        # The application starts with Rescaling(1/255) followed by a Normalization layer whose
        # mean/variance are 0/1 unless ImageNet weights are loaded (never here). Multiplying by
        # 255 cancels the rescaling so its stem sees exactly our normalised images.
        x = layers.Rescaling(255.0, name="undo_efficientnet_rescaling")(x)
        app = keras.applications.EfficientNetB0(
            include_top=False, weights=None, input_tensor=x, input_shape=shape, pooling=None
        )
    else:
        app = keras.applications.MobileNetV2(
            include_top=False, weights=None, input_tensor=x, input_shape=shape, pooling=None
        )
    return app.output, app.layers


def _validate(name, image_size, small_stem, norm, sync_bn, bn_momentum, bn_epsilon, name_prefix):
    _check_name(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (pixels), got {image_size!r}.")
    if name in ("mobilenetv2", "efficientnetb0") and image_size < _MIN_APPLICATION_SIZE:
        raise ValueError(
            f"image_size must be >= {_MIN_APPLICATION_SIZE} for {name}, got {image_size}."
        )
    if small_stem not in (None, True, False):
        raise ValueError(f"small_stem must be None (auto), True or False, got {small_stem!r}.")
    if small_stem and name not in _RESNET_SPECS and name not in _STUDENT_REGNETS:
        raise ValueError(
            f"small_stem=True applies to ResNets and RegNets only; {name!r} has no replaceable "
            "stem."
        )
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {NORMS}.")
    if sync_bn not in (True, False):
        raise ValueError(f"sync_bn must be a bool, got {sync_bn!r}.")
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum!r}.")
    if not bn_epsilon > 0.0:
        raise ValueError(f"bn_epsilon must be > 0, got {bn_epsilon!r}.")
    if name_prefix is not None and (not isinstance(name_prefix, str) or "/" in name_prefix):
        raise ValueError(f"name_prefix must be a string without '/', got {name_prefix!r}.")


def build_backbone(
    name,
    image_size,
    small_stem=None,
    norm="imagenet",
    sync_bn=False,
    bn_momentum=BN_MOMENTUM,
    bn_epsilon=BN_EPSILON,
    name_prefix=None,
    any_input_size=False,
):
    """Builds a backbone: images float32 [B, S, S, 3] in [0, 1] -> features [B, FEATURE_DIMS[name]].

    Args:
      name: one of `BACKBONE_NAMES`.
      image_size: int S, side of the square input in pixels (fixed in the model's input shape).
      small_stem: ResNets and RegNets only. True: CIFAR stem (conv3x3/1 + BN + ReLU, no
        max-pool); False: ImageNet stem (ResNets: conv7x7/2 + BN + ReLU + maxpool3x3/2; RegNets:
        conv3x3/2 + BN + ReLU); None: True iff S <= 64. resnet_tiny uses the small stem unless
        small_stem=False. Must not be True for the others.
      norm: "imagenet", "unit", "minus_one_one" or "native" (see `resolve_norm`); applied by the
        model's first layer, an `InputNormalization`.
      sync_bn: bool, synchronized BatchNorm across tf.distribute replicas.
      bn_momentum, bn_epsilon: BatchNorm settings (Keras convention; defaults = PyTorch's). For
        mobilenetv2 / efficientnetb0 these and sync_bn are set on every application BN layer
        too (their own defaults are momentum 0.999 / 0.99 and epsilon 1e-3).
      name_prefix: optional string; the model is named f"{name_prefix}_{name}" (e.g. "student_"
        and "teacher_" copies of one architecture can then sit in the same functional graph).
        Layer names are not prefixed, so get_layer("stage3") works for every model.
      any_input_size: accept images of any side (input shape [B, None, None, 3]), as SwAV's
        multi-crop needs (224 and 96 px crops through one network); `image_size` then only
        chooses the stem. ResNets, RegNets and convnet_tiny only (the keras.applications nets
        fix it).

    Returns:
      A functional keras.Model with input "images" float32 [B, S, S, 3] and output "features"
      [B, m] (the layer dtype policy's compute dtype, float32 by default).
    """
    _validate(name, image_size, small_stem, norm, sync_bn, bn_momentum, bn_epsilon, name_prefix)
    mode = resolve_norm(name, norm)

    def bn(layer_name):
        return batch_norm(layer_name, sync_bn=sync_bn, momentum=bn_momentum, epsilon=bn_epsilon)

    if any_input_size and name not in (*_RESNET_SPECS, *_STUDENT_REGNETS, "convnet_tiny"):
        raise ValueError(
            f"{name} cannot take images of several sizes (multi-crop); use a ResNet, a RegNet "
            "or convnet_tiny."
        )
    side = None if any_input_size else image_size
    images = keras.Input(shape=(side, side, 3), dtype="float32", name="images")
    x = InputNormalization(mode, name="input_normalization")(images)
    if name in _RESNET_SPECS or name in _STUDENT_REGNETS:
        if small_stem is None:
            small_stem = name == "resnet_tiny" or image_size <= SMALL_STEM_MAX_SIZE
        if name in _RESNET_SPECS:
            x = _resnet_features(x, name, small_stem, bn)
        else:
            x = _regnet_features(x, REGNET_ARCHS[name], small_stem, bn)
    elif name == "convnet_tiny":
        x = _convnet_tiny_features(x, bn)
    else:
        x, app_layers = _application_features(x, name, image_size)
        # The layers are already built but BatchNormalization reads momentum, epsilon and
        # synchronized only when called (and get_config serialises the new values), so
        # changing them here, before any call, takes full effect.
        for layer in app_layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = float(bn_momentum)
                layer.epsilon = float(bn_epsilon)
                layer.synchronized = bool(sync_bn)
    features = layers.GlobalAveragePooling2D(name="features")(x)
    model_name = name if not name_prefix else f"{name_prefix.rstrip('_')}_{name}"
    return keras.Model(images, features, name=model_name)


def feature_dim(model):
    """Feature size m of a backbone, read from its static output shape [B, m]."""
    try:
        shape = model.output_shape
    except (AttributeError, ValueError) as err:
        raise ValueError(
            f"model {getattr(model, 'name', model)!r} has no static output shape; "
            "build it (call it once or use a functional model) first."
        ) from err
    if isinstance(shape, list) or len(shape) != 2 or shape[-1] is None:
        raise ValueError(
            f"model {model.name!r} must output one feature tensor [B, m], has output shape {shape}."
        )
    return int(shape[-1])


def freeze(model):
    """Makes `model` non-trainable (for teachers) and returns it.

    With trainable=False, Keras 3 BatchNormalization also runs in inference mode (moving
    statistics, no updates) even when called with training=True.
    """
    model.trainable = False
    return model


# ----------------------------------------------------------------------------------------------
# ResNets by architecture string, for teachers converted from other frameworks (kd_keras.convert).
# They are kept apart from BACKBONE_NAMES (the students): same layer names and padding, more
# depths and widths.


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """The shape of a torchvision-style ResNet.

    Attributes:
      block: "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3 with the stride, 1x1).
      blocks: blocks per stage, 4 ints.
      widths: base width of each stage (torchvision's `planes`), 4 ints; the stem has widths[0]
        channels unless `stem` is given.
      width_factor: bottleneck only; the two inner convs have widths * width_factor channels
        (torchvision's wide_resnet*_2: 2), the block output stays 4 * widths.
      stem: stem width (default widths[0]).
    """

    block: str
    blocks: tuple
    widths: tuple
    width_factor: int = 1
    stem: int | None = None

    def __post_init__(self):
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"ResNet block must be 'basic' or 'bottleneck', got {self.block!r}.")
        if len(self.blocks) != 4 or len(self.widths) != 4:
            raise ValueError(
                f"a ResNet has 4 stages, got blocks {self.blocks} widths {self.widths}."
            )
        if min(self.blocks) < 1 or min(self.widths) < 1 or self.width_factor < 1:
            raise ValueError(f"ResNet sizes must be positive, got {self}.")
        if self.block == "basic" and self.width_factor != 1:
            raise ValueError("width_factor applies to bottleneck ResNets only.")

    @property
    def stem_width(self):
        return self.widths[0] if self.stem is None else self.stem

    @property
    def inner_widths(self):
        return tuple(w * self.width_factor for w in self.widths)

    @property
    def out_widths(self):
        return tuple(w * 4 for w in self.widths) if self.block == "bottleneck" else self.widths

    @property
    def feature_dim(self):
        return self.out_widths[-1]


_BASE_WIDTHS = (64, 128, 256, 512)
RESNET_ARCHS = {
    "resnet18": ResNetSpec("basic", (2, 2, 2, 2), _BASE_WIDTHS),
    "resnet34": ResNetSpec("basic", (3, 4, 6, 3), _BASE_WIDTHS),
    "resnet50": ResNetSpec("bottleneck", (3, 4, 6, 3), _BASE_WIDTHS),
    "resnet101": ResNetSpec("bottleneck", (3, 4, 23, 3), _BASE_WIDTHS),
    "resnet152": ResNetSpec("bottleneck", (3, 8, 36, 3), _BASE_WIDTHS),
    "wide_resnet50_2": ResNetSpec("bottleneck", (3, 4, 6, 3), _BASE_WIDTHS, width_factor=2),
    "wide_resnet101_2": ResNetSpec("bottleneck", (3, 4, 23, 3), _BASE_WIDTHS, width_factor=2),
    # SimCLR's width multiplier scales every width, the stem included (its r50 2x / 4x).
    "resnet50_x2": ResNetSpec("bottleneck", (3, 4, 6, 3), tuple(2 * w for w in _BASE_WIDTHS)),
    "resnet50_x4": ResNetSpec("bottleneck", (3, 4, 6, 3), tuple(4 * w for w in _BASE_WIDTHS)),
}
_ARCH_PATTERN = re.compile(
    r"resnet-(basic|bottleneck)-(\d+)\.(\d+)\.(\d+)\.(\d+)-(\d+)(?:-wide(\d+))?(?:-stem(\d+))?$"
)
ARCH_HELP = (
    f"one of {tuple(RESNET_ARCHS)} or resnet-<basic|bottleneck>-<b1>.<b2>.<b3>.<b4>-<width>"
    "[-wide<f>][-stem<s>] (blocks per stage; stage widths width, 2x, 4x, 8x; wide: inner "
    "factor f; stem: s stem channels, default width, e.g. 64 for torch ResNets built with a "
    "width multiplier)"
)


def parse_resnet_arch(arch):
    """The `ResNetSpec` of an architecture string (a name of `RESNET_ARCHS` or the pattern
    resnet-<block>-<b1>.<b2>.<b3>.<b4>-<w>[-wide<f>], e.g. "resnet-basic-1.1.1.1-8").

    Raises:
      ValueError: naming the string and what is accepted.
    """
    if arch in RESNET_ARCHS:
        return RESNET_ARCHS[arch]
    match = _ARCH_PATTERN.match(arch or "")
    if not match:
        raise ValueError(f"unknown architecture {arch!r}; use {ARCH_HELP}.")
    block, *numbers = match.groups()
    blocks = tuple(int(n) for n in numbers[:4])
    width = int(numbers[4])
    factor = int(numbers[5]) if numbers[5] else 1
    stem = int(numbers[6]) if numbers[6] else None
    widths = tuple(width * 2**i for i in range(4))
    return ResNetSpec(block, blocks, widths, width_factor=factor, stem=stem)


MAX_POOLS = ("torch", "tf_same")


def build_resnet(
    arch,
    image_size=224,
    norm="imagenet",
    max_pool="torch",
    small_stem=False,
    any_input_size=False,
    name=None,
):
    """A ResNet of any depth/width: images [B, S, S, 3] in [0, 1] -> features [B, m].

    Same layer names and padding as `build_backbone`'s ResNets (torchvision's symmetric
    padding), so a model converted from torchvision weights computes what torch computes.

    Args:
      arch: `ResNetSpec` or architecture string (see `parse_resnet_arch`).
      image_size: side S (ignored with any_input_size except for the input signature).
      norm: one of `NORM_MODES`, applied by the first layer.
      max_pool: "torch" (pad 1 on every side, torchvision) or "tf_same" (TF's SAME pooling,
        as SimCLR's TF ResNets: no padding at the top/left, one row/column at the bottom/right
        for even sides).
      small_stem: CIFAR stem (conv3x3/1, no max-pool) instead of the ImageNet stem.
      any_input_size: input shape [B, None, None, 3].
      name: model name (default: the arch string).

    Returns:
      keras.Model "images" -> "features" [B, spec.feature_dim], BN momentum/eps = torch's.
    """
    spec = parse_resnet_arch(arch) if isinstance(arch, str) else arch
    if norm not in NORM_MODES:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {NORM_MODES}.")
    if max_pool not in MAX_POOLS:
        raise ValueError(f"max_pool must be one of {MAX_POOLS}, got {max_pool!r}.")
    side = None if any_input_size else int(image_size)
    images = keras.Input(shape=(side, side, 3), dtype="float32", name="images")
    x = InputNormalization(norm, name="input_normalization")(images)
    x = _resnet_spec_features(x, spec, bool(small_stem), batch_norm, max_pool=max_pool)
    features = layers.GlobalAveragePooling2D(name="features")(x)
    model_name = name or (arch if isinstance(arch, str) else "resnet")
    return keras.Model(images, features, name=re.sub(r"[^A-Za-z0-9_]", "_", model_name))


# ----------------------------------------------------------------------------------------------
# RegNets (Radosavovic et al., 2020, "Designing Network Design Spaces"), in torchvision's layout
# (torchvision.models.regnet): a stem conv3x3/2, stages of Y blocks (1x1 conv, grouped 3x3 conv
# carrying the stride, squeeze-excitation, 1x1 conv; a projection shortcut where the shape
# changes), global average pool. Every stage halves the resolution, the first one included.

REGNET_ROUNDINGS = ("pycls", "torchvision")


def regnet_stages(
    depth, w0, wa, wm, group_width, bottleneck_ratio=1.0, quantum=8, rounding="pycls"
):
    """Per-stage widths, depths and group widths of a RegNet from its design-space parameters.

    The paper's procedure (Sec. 3.3; pycls `generate_regnet` and `adjust_ws_gs_comp`): block j
    of `depth` gets the linear width u_j = w0 + wa * j, which is snapped to the geometric
    sequence w0 * wm^s_j with s_j = round(log(u_j / w0) / log(wm)) and quantised to a multiple
    of `quantum`; consecutive blocks of equal width form a stage. Then each stage's bottleneck
    width w * b is made a multiple of its group width g' = min(group_width, w * b).

    Args:
      depth: number of blocks d (int >= 1).
      w0: initial width (> 0, a multiple of `quantum`); wa: slope (>= 0); wm: multiplier (> 1).
      group_width: group width g of the 3x3 convs.
      bottleneck_ratio: b, bottleneck width / block width (1 for RegNetX/Y).
      quantum: widths are multiples of this (8 in the paper).
      rounding: how the bottleneck width is rounded to a multiple of g': "pycls"
        (round(w / g') * g', Python's round-half-to-even) or "torchvision" (its
        `_make_divisible`: half rounds up, never below 90 %). They differ only on an exact half,
        e.g. torchvision's RegNetY-800MF has a last stage of 784 channels, pycls' 768.

    Returns:
      (widths, depths, group_widths), tuples of ints, one entry per stage.

    Raises:
      ValueError: for parameters outside the design space.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"RegNet depth must be an int >= 1, got {depth!r}.")
    if not (w0 > 0 and w0 % quantum == 0 and wa >= 0 and wm > 1 and group_width >= 1):
        raise ValueError(
            f"RegNet parameters out of range: need w0 > 0 a multiple of {quantum}, wa >= 0, "
            f"wm > 1, group width >= 1; got w0={w0}, wa={wa}, wm={wm}, g={group_width}."
        )
    if rounding not in REGNET_ROUNDINGS:
        raise ValueError(f"rounding must be one of {REGNET_ROUNDINGS}, got {rounding!r}.")
    linear = w0 + wa * np.arange(depth)
    exponents = np.round(np.log(linear / w0) / np.log(wm))
    block_widths = (np.round(w0 * np.power(wm, exponents) / quantum) * quantum).astype(int)
    widths, depths = [], []
    for width, run in itertools.groupby(block_widths.tolist()):
        widths.append(width)
        depths.append(len(list(run)))
    group_widths, adjusted = [], []
    for width in widths:
        bottleneck = int(width * bottleneck_ratio)
        g = min(group_width, bottleneck)
        bottleneck = _round_to_multiple(bottleneck, g, rounding)
        group_widths.append(g)
        adjusted.append(int(bottleneck / bottleneck_ratio))
    return tuple(adjusted), tuple(depths), tuple(group_widths)


def _round_to_multiple(value, divisor, rounding):
    if rounding == "pycls":
        return int(round(value / divisor) * divisor)
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclasses.dataclass(frozen=True)
class RegNetSpec:
    """The shape of a torchvision-layout RegNet (one entry per stage in the tuples).

    Attributes:
      depths: blocks per stage.
      widths: output width of each stage's blocks.
      group_widths: channels per group of each stage's grouped 3x3 conv.
      bottleneck_ratio: the inner (bottleneck) width is round(width * ratio).
      se_ratio: squeeze-excitation squeeze width = round(se_ratio * block input width), as in
        pycls and torchvision (the block's input, not its bottleneck); None: no SE (RegNetX).
      stem: stem width (32 in every published RegNet).
    """

    depths: tuple
    widths: tuple
    group_widths: tuple
    bottleneck_ratio: float = 1.0
    se_ratio: float | None = 0.25
    stem: int = 32

    def __post_init__(self):
        n = len(self.depths)
        if n < 1 or len(self.widths) != n or len(self.group_widths) != n:
            raise ValueError(
                f"a RegNet needs as many depths, widths and group widths as stages, got "
                f"depths {self.depths} widths {self.widths} group widths {self.group_widths}."
            )
        if min(self.depths) < 1 or min(self.widths) < 1 or min(self.group_widths) < 1:
            raise ValueError(f"RegNet sizes must be positive, got {self}.")
        if self.stem < 1 or self.bottleneck_ratio <= 0:
            raise ValueError(f"RegNet stem and bottleneck ratio must be positive, got {self}.")
        if self.se_ratio is not None and not 0 < self.se_ratio <= 1:
            raise ValueError(f"RegNet se_ratio must be in (0, 1] or None, got {self.se_ratio}.")
        for width, g in zip(self.bottleneck_widths, self.group_widths, strict=True):
            if width % g:
                raise ValueError(
                    f"RegNet bottleneck width {width} is not a multiple of its group width {g}."
                )

    @property
    def bottleneck_widths(self):
        return tuple(int(round(w * self.bottleneck_ratio)) for w in self.widths)

    @property
    def feature_dim(self):
        return self.widths[-1]


# name -> (depth, w0, wa, wm, group width, rounding): the published RegNetY configurations
# (pycls configs/dds_baselines/regnety; torchvision.models.regnet_y_*). All have b = 1,
# SE ratio 0.25 and a 32-wide stem. 600MF is pycls' (torchvision has none); 400MF and 800MF
# are torchvision's, whose rounding gives 800MF a 784-wide last stage (pycls: 768), so that
# torchvision's checkpoints convert.
_REGNETY_DESIGNS = {
    "regnety400mf": (16, 48, 27.89, 2.09, 8, "torchvision"),
    "regnety600mf": (15, 48, 32.54, 2.32, 16, "pycls"),
    "regnety800mf": (14, 56, 38.84, 2.4, 16, "torchvision"),
}


def _regnety(depth, w0, wa, wm, group_width, rounding):
    widths, depths, groups = regnet_stages(depth, w0, wa, wm, group_width, rounding=rounding)
    return RegNetSpec(depths, widths, groups)


REGNET_ARCHS = {name: _regnety(*design) for name, design in _REGNETY_DESIGNS.items()}
# Students (names of build_backbone); the other RegNets are converter architectures.
_STUDENT_REGNETS = ("regnety600mf",)
_REGNET_PATTERN = re.compile(r"regnety-(\d+(?:\.\d+)*)-(\d+(?:\.\d+)*)-g(\d+)(?:-stem(\d+))?$")
REGNET_ARCH_HELP = (
    f"one of {tuple(REGNET_ARCHS)} or regnety-<d1>.<d2>...-<w1>.<w2>...-g<g>[-stem<s>] "
    "(blocks and width per stage, group width g, capped at the stage width; SE 0.25, b = 1, "
    "stem 32 unless given)"
)

ALL_ARCH_HELP = f"{ARCH_HELP}; or {REGNET_ARCH_HELP}"


def parse_regnet_arch(arch):
    """The `RegNetSpec` of a name of `REGNET_ARCHS` or of the explicit form
    regnety-<depths>-<widths>-g<g>[-stem<s>], e.g. "regnety-1.2-8.16-g4-stem8".

    Raises:
      ValueError: naming the string and what is accepted.
    """
    if arch in REGNET_ARCHS:
        return REGNET_ARCHS[arch]
    match = _REGNET_PATTERN.match(arch or "")
    if not match:
        raise ValueError(f"unknown RegNet architecture {arch!r}; use {REGNET_ARCH_HELP}.")
    depths = tuple(int(n) for n in match.group(1).split("."))
    widths = tuple(int(n) for n in match.group(2).split("."))
    if len(depths) != len(widths):
        raise ValueError(f"{arch!r}: {len(depths)} stage depths but {len(widths)} stage widths.")
    group = int(match.group(3))
    stem = int(match.group(4)) if match.group(4) else 32
    try:
        return RegNetSpec(depths, widths, tuple(min(group, w) for w in widths), stem=stem)
    except ValueError as err:
        raise ValueError(f"{arch!r}: {err}") from err


def parse_arch(arch):
    """`RegNetSpec` for RegNet strings ("regnet..."), else `ResNetSpec` (see the two parsers).

    Raises:
      ValueError: naming the string and every accepted form.
    """
    if (arch or "").startswith("regnet"):
        return parse_regnet_arch(arch)
    try:
        return parse_resnet_arch(arch)
    except ValueError:
        raise ValueError(f"unknown architecture {arch!r}; use {ALL_ARCH_HELP}.") from None


def _squeeze_excite(x, squeeze, name):
    """x * sigmoid(fc2(relu(fc1(mean over H, W of x)))); torchvision.ops.SqueezeExcitation."""
    init = conv_initializer()
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_se_pool")(x)
    s = layers.Conv2D(squeeze, 1, kernel_initializer=init, name=f"{name}_se_fc1")(s)
    s = layers.ReLU(name=f"{name}_se_relu")(s)
    s = layers.Conv2D(x.shape[-1], 1, kernel_initializer=init, name=f"{name}_se_fc2")(s)
    s = layers.Activation("sigmoid", name=f"{name}_se_gate")(s)
    return layers.Multiply(name=f"{name}_se_scale")([x, s])


def _regnet_block(x, width, stride, group_width, spec, name, out_name, bn):
    """One Y block (torchvision's ResBottleneckBlock): [B, H, W, C] -> [B, H/stride, W/s, width]."""
    width_in = x.shape[-1]
    inner = int(round(width * spec.bottleneck_ratio))
    shortcut = x
    if stride != 1 or width_in != width:
        shortcut = _conv(x, width, 1, stride, f"{name}_proj_conv")
        shortcut = bn(f"{name}_proj_bn")(shortcut)
    y = _conv(x, inner, 1, 1, f"{name}_a_conv")
    y = bn(f"{name}_a_bn")(y)
    y = layers.ReLU(name=f"{name}_a_relu")(y)
    y = _conv(y, inner, 3, stride, f"{name}_b_conv", groups=inner // group_width)
    y = bn(f"{name}_b_bn")(y)
    y = layers.ReLU(name=f"{name}_b_relu")(y)
    if spec.se_ratio:
        y = _squeeze_excite(y, int(round(spec.se_ratio * width_in)), name)
    y = _conv(y, width, 1, 1, f"{name}_c_conv")
    y = bn(f"{name}_c_bn")(y)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=out_name)(y)


def _regnet_features(x, spec, small_stem, bn):
    """The RegNet trunk of `spec` grown on `x` ([B, H, W, 3] -> [B, H/32, W/32, widths[-1]]).

    small_stem: the stem conv runs at stride 1 (pycls' CIFAR stem, ResStemCifar), so 32 px
    images reach the last stage at 2 x 2 instead of 1 x 1.
    """
    x = _conv(x, spec.stem, 3, 1 if small_stem else 2, "stem_conv")
    x = bn("stem_bn")(x)
    x = layers.ReLU(name="stem")(x)
    stages = zip(spec.depths, spec.widths, spec.group_widths, strict=True)
    for s, (depth, width, group_width) in enumerate(stages, start=1):
        for b in range(depth):
            out_name = f"stage{s}" if b == depth - 1 else f"stage{s}_block{b}_out"
            x = _regnet_block(
                x, width, 2 if b == 0 else 1, group_width, spec, f"stage{s}_block{b}", out_name, bn
            )
    return x


def build_regnet(
    arch, image_size=224, norm="imagenet", small_stem=False, any_input_size=False, name=None
):
    """A RegNet: images [B, S, S, 3] in [0, 1] -> features [B, spec.feature_dim].

    Args:
      arch: `RegNetSpec` or architecture string (see `parse_regnet_arch`).
      image_size: side S (ignored with any_input_size except for the input signature).
      norm: one of `NORM_MODES`, applied by the first layer.
      small_stem: stem conv at stride 1 (for 32 px images) instead of 2.
      any_input_size: input shape [B, None, None, 3].
      name: model name (default: the arch string).

    Returns:
      keras.Model "images" -> "features", BN momentum/eps = torch's; layer names "stem",
      "stage1".."stageN" as the ResNets', convertible from torchvision (layouts.py).
    """
    spec = parse_regnet_arch(arch) if isinstance(arch, str) else arch
    if norm not in NORM_MODES:
        raise ValueError(f"Unknown norm {norm!r}; choose one of {NORM_MODES}.")
    side = None if any_input_size else int(image_size)
    images = keras.Input(shape=(side, side, 3), dtype="float32", name="images")
    x = InputNormalization(norm, name="input_normalization")(images)
    x = _regnet_features(x, spec, bool(small_stem), batch_norm)
    features = layers.GlobalAveragePooling2D(name="features")(x)
    model_name = name or (arch if isinstance(arch, str) else "regnet")
    return keras.Model(images, features, name=re.sub(r"[^A-Za-z0-9_]", "_", model_name))


def build_arch(spec, image_size=224, norm="imagenet", max_pool="torch", **kwargs):
    """`build_resnet` for a `ResNetSpec`, `build_regnet` for a `RegNetSpec` (which has no
    max-pool: `max_pool` is ignored)."""
    if isinstance(spec, RegNetSpec):
        return build_regnet(spec, image_size, norm, **kwargs)
    return build_resnet(spec, image_size, norm, max_pool, **kwargs)
