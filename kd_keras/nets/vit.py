"""Vision Transformers (Dosovitskiy et al., 2021) as DINO, DINOv2 and timm build them.

A `build_vit` model maps images float32 [B, S, S, 3] in [0, 1] to features [B, m]:

  InputNormalization -> patch_embed (Conv2D p x p, stride p) -> [B, g*g, D] patch tokens
  -> tokens: [class, registers..., patches] with learned positional embeddings added
  -> depth x pre-norm block: x += ls1(attn(norm1(x))); x += ls2(ffn(norm2(x)))
  -> norm (final LayerNorm) -> features (pooling, see POOLS)

with g = S / p. Attention is multi-head with one fused qkv projection (the q, k, v thirds in
that order, heads contiguous inside each third, as torch's `qkv.reshape(B, N, 3, H, D/H)`), the
FFN is Linear-GELU(erf)-Linear or DINOv2-g's SwiGLU (one fused Linear to 2 x hidden, silu of
the first half times the second half, Linear), LayerScale multiplies by a learned per-channel
vector (identity when the architecture has none), every LayerNorm has the source's epsilon.

Positional embeddings: the model holds them for its own grid g x g (the converter resizes a
checkpoint's, see `kd_keras.nets.pos_embed`). `class_pos` says whether the class token has its
own positional embedding (DINO, DINOv2 and HF: yes; timm's register models fold it into the
class token: no). Registers never have one.

Layer names, for the converter: "patch_embed", "tokens", "block{i}_norm1", "block{i}_attn",
"block{i}_ls1", "block{i}_norm2", "block{i}_ffn", "block{i}_ls2", "norm", "features".
"""

import dataclasses
import math
import re

import keras
from keras import layers, ops

from kd_keras.nets import backbones

# "cls": the class token after the final norm (DINO/DINOv2's k-NN feature); "avg": the mean of
# the patch tokens after the final norm (class token and registers excluded, DINOv2's
# x_norm_patchtokens); "cls_avg": their concatenation [cls, avg] (DINOv2's linear probe input).
POOLS = ("cls", "avg", "cls_avg")
LN_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """The shape of a ViT.

    Attributes:
      width: token width D.
      depth: number of blocks.
      heads: attention heads (D divisible by heads).
      patch: patch side p in pixels.
      hidden: FFN hidden width (GELU MLP: fc1 output; SwiGLU: each of the two halves).
      ffn: "mlp" (Linear-GELU-Linear) or "swiglu".
      registers: number of register tokens (Darcet et al., 2024), 0 for none.
      layer_scale: blocks have LayerScale (ls1, ls2).
      epsilon: LayerNorm epsilon.
    """

    width: int
    depth: int
    heads: int
    patch: int
    hidden: int
    ffn: str = "mlp"
    registers: int = 0
    layer_scale: bool = False
    epsilon: float = LN_EPSILON

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")

    def feature_dim(self, pool="cls"):
        return 2 * self.width if pool == "cls_avg" else self.width


def _swiglu_hidden(width):
    # DINOv2's SwiGLUFFNFused: two thirds of 4 x width, rounded up to a multiple of 8.
    return (int(4 * width * 2 / 3) + 7) // 8 * 8


def _dinov2(width, depth, heads, ffn="mlp"):
    hidden = _swiglu_hidden(width) if ffn == "swiglu" else 4 * width
    return ViTSpec(width, depth, heads, 14, hidden, ffn=ffn, layer_scale=True)


VIT_ARCHS = {
    "vit_tiny_patch16": ViTSpec(192, 12, 3, 16, 768),
    "vit_small_patch16": ViTSpec(384, 12, 6, 16, 1536),
    "vit_base_patch16": ViTSpec(768, 12, 12, 16, 3072),
    "vit_small_patch8": ViTSpec(384, 12, 6, 8, 1536),
    "vit_base_patch8": ViTSpec(768, 12, 12, 8, 3072),
    "dinov2_vits14": _dinov2(384, 12, 6),
    "dinov2_vitb14": _dinov2(768, 12, 12),
    "dinov2_vitl14": _dinov2(1024, 24, 16),
    "dinov2_vitg14": _dinov2(1536, 40, 24, ffn="swiglu"),
}
VIT_ARCHS.update(
    {
        f"{name}_reg": dataclasses.replace(spec, registers=4)
        for name, spec in list(VIT_ARCHS.items())
        if name.startswith("dinov2")
    }
)
_VIT_PATTERN = re.compile(
    r"vit-w(\d+)-d(\d+)-h(\d+)-p(\d+)(?:-mlp(\d+))?(-swiglu)?(-ls)?(?:-reg(\d+))?$"
)
VIT_ARCH_HELP = (
    f"one of {tuple(VIT_ARCHS)} or vit-w<width>-d<depth>-h<heads>-p<patch>[-mlp<hidden>]"
    "[-swiglu][-ls][-reg<n>] (hidden default 4 x width)"
)


def is_vit_arch(arch):
    """Whether `arch` names a ViT (a `VIT_ARCHS` name or the vit-w... pattern)."""
    return arch in VIT_ARCHS or bool(_VIT_PATTERN.match(arch or ""))


def parse_vit_arch(arch):
    """The `ViTSpec` of an architecture string; ValueError naming it and what is accepted."""
    if arch in VIT_ARCHS:
        return VIT_ARCHS[arch]
    match = _VIT_PATTERN.match(arch or "")
    if not match:
        raise ValueError(f"unknown ViT architecture {arch!r}; use {VIT_ARCH_HELP}.")
    width, depth, heads, patch, hidden, swiglu, ls, registers = match.groups()
    width = int(width)
    return ViTSpec(
        width,
        int(depth),
        int(heads),
        int(patch),
        int(hidden) if hidden else 4 * width,
        ffn="swiglu" if swiglu else "mlp",
        registers=int(registers or 0),
        layer_scale=bool(ls),
    )


@keras.saving.register_keras_serializable(package="kd_keras")
class ViTTokens(layers.Layer):
    """Prepends the class token and registers and adds the positional embeddings.

    Input: patch tokens [B, N, D] (N = grid**2). Output: [B, 1 + registers + N, D], in the order
    class, registers, patches. Weights: cls_token [1, 1, D], reg_tokens [1, R, D] (R > 0 only),
    pos_embed [1, N + class_pos, D].
    """

    def __init__(self, num_patches, registers=0, class_pos=True, **kwargs):
        super().__init__(**kwargs)
        self.num_patches = int(num_patches)
        self.registers = int(registers)
        self.class_pos = bool(class_pos)

    def build(self, input_shape):
        width = input_shape[-1]
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.cls_token = self.add_weight((1, 1, width), init, name="cls_token")
        self.reg_tokens = None
        if self.registers:
            self.reg_tokens = self.add_weight((1, self.registers, width), init, name="reg_tokens")
        positions = self.num_patches + int(self.class_pos)
        self.pos_embed = self.add_weight((1, positions, width), init, name="pos_embed")

    def call(self, patches):
        batch = ops.shape(patches)[0]
        width = ops.shape(patches)[-1]

        def tile(token):
            return ops.broadcast_to(ops.cast(token, patches.dtype), (batch, token.shape[1], width))

        pos = ops.cast(self.pos_embed, patches.dtype)
        cls = tile(self.cls_token)
        if self.class_pos:
            cls = cls + pos[:, :1]
            patches = patches + pos[:, 1:]
        else:
            patches = patches + pos
        parts = [cls] + ([tile(self.reg_tokens)] if self.registers else []) + [patches]
        return ops.concatenate(parts, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1 + self.registers + input_shape[1], input_shape[2])

    def get_config(self):
        return {
            **super().get_config(),
            "num_patches": self.num_patches,
            "registers": self.registers,
            "class_pos": self.class_pos,
        }


def _linear_weights(layer, fan_in, fan_out, name):
    kernel = layer.add_weight(
        (fan_in, fan_out), keras.initializers.TruncatedNormal(stddev=0.02), name=f"{name}_kernel"
    )
    bias = layer.add_weight((fan_out,), "zeros", name=f"{name}_bias")
    return kernel, bias


def _dense(x, kernel, bias):
    return ops.matmul(x, ops.cast(kernel, x.dtype)) + ops.cast(bias, x.dtype)


@keras.saving.register_keras_serializable(package="kd_keras")
class FusedQKVAttention(layers.Layer):
    """Multi-head self-attention with one qkv projection: [B, N, D] -> [B, N, D].

    Weights: qkv_kernel [D, 3D] (columns: q, k, v; heads contiguous in each), qkv_bias [3D],
    proj_kernel [D, D], proj_bias [D]. Scores are scaled by (D / heads) ** -0.5.
    """

    def __init__(self, heads, **kwargs):
        super().__init__(**kwargs)
        self.heads = int(heads)

    def build(self, input_shape):
        width = input_shape[-1]
        self.qkv_kernel, self.qkv_bias = _linear_weights(self, width, 3 * width, "qkv")
        self.proj_kernel, self.proj_bias = _linear_weights(self, width, width, "proj")

    def call(self, x):
        batch, tokens, width = ops.shape(x)[0], ops.shape(x)[1], x.shape[-1]
        head_dim = width // self.heads
        qkv = ops.reshape(
            _dense(x, self.qkv_kernel, self.qkv_bias), (batch, tokens, 3, self.heads, head_dim)
        )
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # [3, B, heads, N, head_dim]
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = ops.matmul(q * (head_dim**-0.5), ops.transpose(k, (0, 1, 3, 2)))
        out = ops.matmul(ops.softmax(scores, axis=-1), v)  # [B, heads, N, head_dim]
        out = ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (batch, tokens, width))
        return _dense(out, self.proj_kernel, self.proj_bias)

    def get_config(self):
        return {**super().get_config(), "heads": self.heads}


@keras.saving.register_keras_serializable(package="kd_keras")
class TransformerFFN(layers.Layer):
    """The block's feed-forward network: [B, N, D] -> [B, N, D].

    kind "mlp": fc2(gelu(fc1(x))) with the exact (erf) GELU, fc1_kernel [D, hidden].
    kind "swiglu": fc2(silu(a) * b) with [a, b] = fc1(x) split in halves, fc1_kernel
    [D, 2 * hidden] (DINOv2's w12, timm's SwiGLUPacked fc1), fc2_kernel [hidden, D] (w3).
    """

    def __init__(self, hidden, kind="mlp", **kwargs):
        super().__init__(**kwargs)
        self.hidden = int(hidden)
        self.kind = kind

    def build(self, input_shape):
        width = input_shape[-1]
        inner = 2 * self.hidden if self.kind == "swiglu" else self.hidden
        self.fc1_kernel, self.fc1_bias = _linear_weights(self, width, inner, "fc1")
        self.fc2_kernel, self.fc2_bias = _linear_weights(self, self.hidden, width, "fc2")

    def call(self, x):
        h = _dense(x, self.fc1_kernel, self.fc1_bias)
        if self.kind == "swiglu":
            h = ops.silu(h[..., : self.hidden]) * h[..., self.hidden :]
        else:
            h = ops.gelu(h, approximate=False)
        return _dense(h, self.fc2_kernel, self.fc2_bias)

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "kind": self.kind}


@keras.saving.register_keras_serializable(package="kd_keras")
class LayerScale(layers.Layer):
    """x * gamma, gamma [D] learned per channel (Touvron et al., 2021; DINOv2's ls1/ls2)."""

    def __init__(self, init_value=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        init = keras.initializers.Constant(self.init_value)
        self.gamma = self.add_weight((input_shape[-1],), init, name="gamma")

    def call(self, x):
        return x * ops.cast(self.gamma, x.dtype)

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


@keras.saving.register_keras_serializable(package="kd_keras")
class TokenPool(layers.Layer):
    """Features from the normed tokens [B, 1 + prefix_extra + N, D] -> [B, D] or [B, 2D].

    mode: one of POOLS; `skip` is the number of leading tokens that are not patches (class
    token + registers).
    """

    def __init__(self, mode="cls", skip=1, **kwargs):
        super().__init__(**kwargs)
        if mode not in POOLS:
            raise ValueError(f"TokenPool: mode must be one of {POOLS}, got {mode!r}.")
        self.mode = mode
        self.skip = int(skip)

    def call(self, tokens):
        cls = tokens[:, 0]
        if self.mode == "cls":
            return cls
        avg = ops.mean(tokens[:, self.skip :], axis=1)
        return avg if self.mode == "avg" else ops.concatenate([cls, avg], axis=-1)

    def compute_output_shape(self, input_shape):
        width = input_shape[-1] * (2 if self.mode == "cls_avg" else 1)
        return (input_shape[0], width)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "skip": self.skip}


def _block(x, spec, i):
    """One pre-norm transformer block on tokens [B, T, D]."""
    name = f"block{i}"
    y = layers.LayerNormalization(epsilon=spec.epsilon, name=f"{name}_norm1")(x)
    y = FusedQKVAttention(spec.heads, name=f"{name}_attn")(y)
    if spec.layer_scale:
        y = LayerScale(name=f"{name}_ls1")(y)
    x = layers.Add(name=f"{name}_add1")([x, y])
    y = layers.LayerNormalization(epsilon=spec.epsilon, name=f"{name}_norm2")(x)
    y = TransformerFFN(spec.hidden, spec.ffn, name=f"{name}_ffn")(y)
    if spec.layer_scale:
        y = LayerScale(name=f"{name}_ls2")(y)
    return layers.Add(name=f"{name}_out")([x, y])


def check_image_size(image_size, patch):
    """Raises ValueError (one line) unless image_size is a positive multiple of patch."""
    if image_size <= 0 or image_size % patch:
        raise ValueError(
            f"image size {image_size} is not a multiple of the ViT patch {patch} (DINOv2's and "
            "timm's patch embedding refuse it too); use a size k x {patch}."
        )


def build_vit(arch, image_size=224, norm="imagenet", pool="cls", class_pos=True, name=None):
    """A ViT: images [B, S, S, 3] in [0, 1] -> features [B, spec.feature_dim(pool)].

    Args:
      arch: `ViTSpec` or architecture string (see `parse_vit_arch`).
      image_size: S, a multiple of the patch; fixes the token count (positional embeddings
        for a (S/p) x (S/p) grid).
      norm: one of backbones.NORM_MODES, applied by the first layer.
      pool: one of POOLS.
      class_pos: whether the positional embeddings have a row for the class token.
      name: model name (default: the arch string).
    """
    spec = parse_vit_arch(arch) if isinstance(arch, str) else arch
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}.")
    check_image_size(int(image_size), spec.patch)
    grid = int(image_size) // spec.patch
    images = keras.Input(shape=(image_size, image_size, 3), dtype="float32", name="images")
    x = backbones.InputNormalization(norm, name="input_normalization")(images)
    x = layers.Conv2D(spec.width, spec.patch, strides=spec.patch, name="patch_embed")(x)
    x = layers.Reshape((grid * grid, spec.width), name="patch_tokens")(x)
    x = ViTTokens(grid * grid, spec.registers, class_pos, name="tokens")(x)
    for i in range(spec.depth):
        x = _block(x, spec, i)
    x = layers.LayerNormalization(epsilon=spec.epsilon, name="norm")(x)
    features = TokenPool(pool, 1 + spec.registers, name="features")(x)
    model_name = name or (arch if isinstance(arch, str) else "vit")
    return keras.Model(images, features, name=re.sub(r"[^A-Za-z0-9_]", "_", model_name))


def grid_side(num_positions):
    """g for a square grid of g * g positions; ValueError if not square."""
    side = int(math.isqrt(num_positions))
    if side * side != num_positions:
        raise ValueError(f"{num_positions} positional embeddings are not a square grid")
    return side


# DeiT-style students (Touvron et al., 2021): the same blocks, trained from scratch.
STUDENTS = ("vit_tiny_patch16", "vit_small_patch16")


def build_student(name, image_size, norm="imagenet", name_prefix=None):
    """A trainable ViT student: images [B, S, S, 3] in [0, 1] -> class token [B, width].

    Args:
      name: one of STUDENTS.
      image_size: S, a multiple of 16 (one fixed size: no multi-crop).
      norm: one of backbones.NORM_MODES or "native" (= "imagenet", as DeiT).
      name_prefix: optional model-name prefix, as `backbones.build_backbone`.
    """
    if name not in STUDENTS:
        raise ValueError(f"unknown ViT student {name!r}; choose one of {STUDENTS}.")
    norm = "imagenet" if norm == "native" else norm
    model_name = name if not name_prefix else f"{name_prefix.rstrip('_')}_{name}"
    return build_vit(name, image_size, norm, pool="cls", name=model_name)
