"""Seeded image augmentations in pure TensorFlow (SimReg / MoCo-v2 style views).

Every random op takes a single image (float32 ``[H, W, 3]`` with values in ``[0, 1]``, not
batched) and an explicit ``seed`` (integer tensor of shape ``[2]``), and returns float32 in
``[0, 1]``. All randomness goes through stateless ops, so a given ``(image, seed)`` pair always
produces the same output, eagerly and inside ``tf.data.Dataset.map`` alike. Each random decision
gets its own sub-seed derived with ``tf.random.experimental.stateless_split``; no seed is ever
used for two decisions. Image height and width may be unknown statically.
"""

import dataclasses
import math
import numbers

import tensorflow as tf

from kd_keras import choices

# ITU-R BT.601 luma weights; they sum to one, so a grey image stays in [0, 1].
_LUMA = (0.299, 0.587, 0.114)

# torchvision's RandomResizedCrop tries this many candidate boxes before falling back.
_CROP_ATTEMPTS = 10

VIEW_KINDS = choices.AUGMENTATIONS
VIEW_MODES = choices.AUG_MODES
VIEW_RESIZES = choices.VIEW_RESIZES


# --------------------------------------------------------------------------------------------
# Argument checking and seed plumbing
# --------------------------------------------------------------------------------------------


def _as_seed(seed):
    """Converts a seed to an int64 ``[2]`` tensor.

    Casting to one dtype matters: stateless ops draw different streams for int32 and int64
    seeds of equal value, so without it ``(1, 2)`` and ``tf.constant([1, 2], tf.int64)`` would
    give different augmentations.
    """
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise ValueError(
            f"seed must be an integer tensor of shape [2], got dtype {seed.dtype.name}"
        )
    if seed.shape.rank is not None and seed.shape.as_list() not in ([2], [None]):
        raise ValueError(f"seed must have shape [2], got {seed.shape}")
    return tf.cast(seed, tf.int64)


def _split(seed, num):
    """Returns ``num`` independent int64 ``[2]`` sub-seeds derived from ``seed``."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, num=num), num=num)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform(
        shape, seed=seed, minval=minval, maxval=maxval, dtype=tf.float32
    )


def _check_image(image):
    """Returns ``image`` as a float32 tensor after checking it is a single RGB image."""
    image = tf.convert_to_tensor(image)
    if not image.dtype.is_floating:
        raise ValueError(
            f"image must be a float image in [0, 1], got dtype {image.dtype.name}; "
            "convert it first with to_float_image"
        )
    if image.shape.rank is not None:
        if image.shape.rank != 3:
            raise ValueError(f"image must have shape [H, W, 3], got {image.shape}")
        if image.shape[-1] is not None and image.shape[-1] != 3:
            raise ValueError(f"image must have 3 channels, got shape {image.shape}")
    return tf.cast(image, tf.float32)


def _check_size(size):
    """Turns an int or ``(h, w)`` pair into a pair of positive Python ints."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size):
            raise ValueError(f"size must be an int or a pair of ints (h, w), got {size!r}")
        size = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be an int or a pair of ints (h, w), got {size!r}")
    if min(size) <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return size


def _check_probability(p, name="p"):
    if not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_range(value, name, lower=0.0, strictly_positive=False):
    """Checks a ``(lo, hi)`` pair with ``lower <= lo <= hi``."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, numbers.Real) for v in value)
    ):
        raise ValueError(f"{name} must be a pair (lo, hi) of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    too_small = lo <= lower if strictly_positive else lo < lower
    if too_small or lo > hi:
        bound = ">" if strictly_positive else ">="
        raise ValueError(f"{name} must satisfy {lower} {bound} lo <= hi, got {value!r}")
    return lo, hi


def _apply_with_probability(image, seed, p, fn):
    """Returns ``fn(image)`` with probability ``p`` (decided by ``seed``), else ``image``.

    ``tf.cond`` rather than ``tf.where`` so the skipped branch (e.g. a blur) is not computed.
    The comparison ``u < p`` with ``u`` in ``[0, 1)`` makes ``p=1`` always and ``p=0`` never.
    """
    if p == 0.0:
        return image
    if p == 1.0:
        return fn(image)
    return tf.cond(_uniform(seed) < p, lambda: fn(image), lambda: image)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def to_float_image(image):
    """Converts a decoded image to float32 RGB in ``[0, 1]``.

    Args:
        image: ``[H, W, C]`` tensor, integer (``uint8`` etc., scaled by the dtype's maximum) or
            floating (assumed already in ``[0, 1]``, only cast). ``C`` may be 1 (grey, tiled to
            RGB), 2 (grey + alpha), 3 (RGB) or 4 (RGBA, alpha dropped).

    Returns:
        float32 ``[H, W, 3]``.
    """
    image = tf.convert_to_tensor(image)
    if image.shape.rank is not None and image.shape.rank != 3:
        raise ValueError(f"image must have shape [H, W, C], got {image.shape}")
    if image.dtype.is_integer:
        image = tf.cast(image, tf.float32) / float(image.dtype.max)
    elif image.dtype.is_floating:
        image = tf.cast(image, tf.float32)
    else:
        raise ValueError(f"image must have an integer or float dtype, got {image.dtype.name}")

    channels = image.shape[-1] if image.shape.rank is not None else None
    if channels is not None:
        if channels in (1, 2):
            return tf.tile(image[:, :, :1], [1, 1, 3])
        if channels in (3, 4):
            return image[:, :, :3]
        raise ValueError(f"image must have 1, 2, 3 or 4 channels, got shape {image.shape}")

    # Channel count only known at run time (e.g. a generic decoder in a dataset).
    channels = tf.shape(image)[-1]
    with tf.control_dependencies(
        [
            tf.debugging.assert_less_equal(
                channels, 4, message="image must have 1, 2, 3 or 4 channels"
            )
        ]
    ):
        out = tf.cond(
            channels < 3,
            lambda: tf.tile(image[:, :, :1], [1, 1, 3]),
            lambda: image[:, :, :3],
        )
    out.set_shape([None, None, 3])
    return out


# --------------------------------------------------------------------------------------------
# Geometric ops
# --------------------------------------------------------------------------------------------


def _resize(image, size_hw):
    return tf.image.resize(image, size_hw, method="bilinear", antialias=True)


def _check_resize(mode):
    if mode not in VIEW_RESIZES:
        raise ValueError(f"resize mode must be one of {VIEW_RESIZES}, got {mode!r}")
    return mode


def resize_crop(image, size_hw, mode="antialias"):
    """Bilinear resize of a crop, antialiased where it shrinks.

    With ``mode="antialias"`` every crop goes through TF's antialiased kernel
    (ScaleAndTranslate, triangle filter). Where a crop is enlarged along both axes that
    filter is not widened, so it computes plain bilinear interpolation with half-pixel
    centres and clamped edges, the same function as ``ResizeBilinear``: ``mode="auto"`` then
    calls that kernel, about 4x faster. The two round the sample positions differently, so
    values differ by up to ~2e-5 (a 1/300 of one 8-bit level), not bit for bit.
    A crop shrunk along either axis takes the antialiased kernel in both modes.

    Args:
        image: float32 ``[h, w, 3]``.
        size_hw: output ``(height, width)``.
        mode: one of ``VIEW_RESIZES``.

    Returns:
        float32 ``[height, width, 3]`` (not clipped).
    """
    if _check_resize(mode) == "antialias":
        return _resize(image, size_hw)
    enlarged = tf.reduce_all(tf.shape(image)[:2] <= tf.constant(size_hw, tf.int32))
    return tf.cond(
        enlarged,
        lambda: tf.image.resize(image, size_hw, method="bilinear", antialias=False),
        lambda: _resize(image, size_hw),
    )


def crop_box(image_hw, seed, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """The box ``random_resized_crop`` cuts from an image of size ``image_hw`` (see there).

    Only the image's size is needed, so the box can be drawn before decoding (from
    ``tf.io.extract_jpeg_shape``) and the JPEG decoder asked for that window alone.

    Args:
        image_hw: int32 ``[2]`` (height, width).
        seed: int64 ``[2]`` tensor (already checked).
        scale, ratio: checked ``(lo, hi)`` ranges.

    Returns:
        ``(top, left, crop_h, crop_w)`` int32 scalars.
    """
    image_hw = tf.cast(image_hw, tf.int32)
    seed_area, seed_ratio, seed_offset = _split(seed, 3)
    height, width = image_hw[0], image_hw[1]
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)

    target_area = height_f * width_f * _uniform(seed_area, [_CROP_ATTEMPTS], scale[0], scale[1])
    aspect = tf.exp(_uniform(seed_ratio, [_CROP_ATTEMPTS], math.log(ratio[0]), math.log(ratio[1])))
    # tf.round rounds half to even, the same as Python's round() used by torchvision.
    cand_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    cand_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (cand_w > 0) & (cand_w <= width) & (cand_h > 0) & (cand_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    any_fits = tf.reduce_any(fits)

    # Fallback: the largest centred box whose aspect ratio is clamped into `ratio`.
    in_ratio = width_f / height_f
    too_tall = in_ratio < ratio[0]
    too_wide = in_ratio > ratio[1]
    fb_w = tf.where(too_wide, tf.cast(tf.round(height_f * ratio[1]), tf.int32), width)
    fb_h = tf.where(too_tall, tf.cast(tf.round(width_f / ratio[0]), tf.int32), height)
    fb_w = tf.clip_by_value(fb_w, 1, width)
    fb_h = tf.clip_by_value(fb_h, 1, height)

    crop_w = tf.where(any_fits, cand_w[first], fb_w)
    crop_h = tf.where(any_fits, cand_h[first], fb_h)

    # Offsets as floor(u * (n + 1)): uniform over the n + 1 valid integer positions.
    u = _uniform(seed_offset, [2])
    rand_top = tf.cast(tf.floor(u[0] * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
    rand_left = tf.cast(tf.floor(u[1] * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
    top = tf.where(any_fits, tf.minimum(rand_top, height - crop_h), (height - crop_h) // 2)
    left = tf.where(any_fits, tf.minimum(rand_left, width - crop_w), (width - crop_w) // 2)

    return top, left, crop_h, crop_w


def random_resized_crop(image, seed, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crops a random box and resizes it, following torchvision's ``RandomResizedCrop``.

    The box area is a fraction of the image area drawn uniformly from ``scale``; its aspect ratio
    (width / height) is ``exp(u)`` with ``u`` uniform in ``[log(ratio[0]), log(ratio[1])]``.
    Ten candidates are drawn at once and the first one that fits inside the image is used,
    placed at a uniformly random position. If none fits, the whole image is centre-cropped to
    the nearest aspect ratio inside ``ratio``. The crop is resized bilinearly with antialiasing.

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``; ``H``/``W`` may be statically unknown.
        seed: integer ``[2]`` tensor.
        size: output size, an int or ``(height, width)``.
        scale: ``(lo, hi)`` range of the crop's area fraction, ``0 <= lo <= hi``.
        ratio: ``(lo, hi)`` range of the crop's aspect ratio, ``0 < lo <= hi``.

    Returns:
        float32 ``[size_h, size_w, 3]`` in ``[0, 1]``.
    """
    image = _check_image(image)
    seed = _as_seed(seed)
    out_h, out_w = _check_size(size)
    scale = _check_range(scale, "scale")
    if scale[1] == 0.0:
        raise ValueError(f"scale must have a positive upper bound, got {scale!r}")
    ratio = _check_range(ratio, "ratio", strictly_positive=True)

    top, left, crop_h, crop_w = crop_box(tf.shape(image)[:2], seed, scale, ratio)
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, 3]))
    out = tf.clip_by_value(_resize(crop, (out_h, out_w)), 0.0, 1.0)
    out.set_shape([out_h, out_w, 3])
    return out


def random_flip(image, seed, p=0.5):
    """Flips the image left-right with probability ``p``.

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        seed: integer ``[2]`` tensor.
        p: flip probability.

    Returns:
        float32 ``[H, W, 3]``, same shape as ``image``.
    """
    image = _check_image(image)
    seed = _as_seed(seed)
    p = _check_probability(p)
    # Flipping is cheap, so computing both sides with tf.where is fine and keeps shapes static.
    return tf.where(_uniform(seed) < p, tf.reverse(image, axis=[1]), image)


def center_crop(image, size, crop_fraction=224 / 256):
    """Deterministic evaluation transform: resize the shorter side, then centre-crop.

    The shorter side is resized to ``round(max(size) / crop_fraction)`` keeping the aspect ratio
    (longer side truncated to an int, as torchvision's ``Resize(int)`` does), then the central
    ``size`` box is cut out (offsets ``round((side - size) / 2)``, as ``CenterCrop`` does).

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        size: output size, an int or ``(height, width)``.
        crop_fraction: fraction of the resized shorter side that is kept, in ``(0, 1]``.

    Returns:
        float32 ``[size_h, size_w, 3]`` in ``[0, 1]``.
    """
    image = _check_image(image)
    out_h, out_w = _check_size(size)
    if not isinstance(crop_fraction, numbers.Real) or not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    short_target = max(round(max(out_h, out_w) / crop_fraction), out_h, out_w)

    shape = tf.shape(image)
    # float64 so that e.g. 256 * 1.5 does not land on 383.99997 and truncate one pixel short.
    height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    short = tf.minimum(height, width)
    new_h = tf.cast(tf.floor(short_target * height / short), tf.int32)
    new_w = tf.cast(tf.floor(short_target * width / short), tf.int32)
    resized = _resize(image, tf.stack([new_h, new_w]))

    top = tf.cast(tf.round(tf.cast(new_h - out_h, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - out_w, tf.float32) / 2.0), tf.int32)
    out = tf.slice(resized, tf.stack([top, left, 0]), [out_h, out_w, 3])
    out = tf.clip_by_value(out, 0.0, 1.0)
    out.set_shape([out_h, out_w, 3])
    return out


# --------------------------------------------------------------------------------------------
# Colour ops
# --------------------------------------------------------------------------------------------


def _luma(image):
    """float32 ``[H, W, 3]`` -> ``[H, W, 1]`` ITU-R 601 grey level."""
    return tf.reduce_sum(image * tf.constant(_LUMA, tf.float32), axis=-1, keepdims=True)


def _blend(image, other, factor):
    # torchvision's _blend: extrapolates past `image` when factor > 1, then clips.
    return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def _adjust_brightness(image, factor):
    """``clip(factor * image)``; float32 ``[H, W, 3]`` and scalar factor."""
    return tf.clip_by_value(image * factor, 0.0, 1.0)


def _adjust_contrast(image, factor):
    """Blends with the mean grey level of the whole image; float32 ``[H, W, 3]``."""
    return _blend(image, tf.reduce_mean(_luma(image)), factor)


def _adjust_saturation(image, factor):
    """Blends with the per-pixel grey image; float32 ``[H, W, 3]``."""
    return _blend(image, _luma(image), factor)


def _adjust_hue(image, delta):
    """Rotates hue by ``delta`` of a full turn (``delta`` in ``[-0.5, 0.5]``)."""
    return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def color_jitter(image, seed, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8):
    """With probability ``p``, jitters brightness, contrast, saturation and hue in random order.

    torchvision ``ColorJitter`` semantics: brightness factor uniform in
    ``[max(0, 1 - brightness), 1 + brightness]`` (multiplicative); contrast factor likewise,
    blending with the mean grey level; saturation factor likewise, blending with the grey image;
    hue shift uniform in ``[-hue, hue]`` of a full turn. The enabled ops (strength > 0) run in an
    order given by a seeded random permutation; the result is clipped to ``[0, 1]`` after each.

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        seed: integer ``[2]`` tensor.
        brightness, contrast, saturation: non-negative strengths.
        hue: strength in ``[0, 0.5]``.
        p: probability of applying the jitter at all.

    Returns:
        float32 ``[H, W, 3]`` in ``[0, 1]``.
    """
    image = _check_image(image)
    seed = _as_seed(seed)
    p = _check_probability(p)
    for name, value in (
        ("brightness", brightness),
        ("contrast", contrast),
        ("saturation", saturation),
    ):
        if not isinstance(value, numbers.Real) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if not isinstance(hue, numbers.Real) or not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {hue!r}")

    seed_apply, seed_order, seed_b, seed_c, seed_s, seed_h = _split(seed, 6)

    def factor(s, strength):
        return _uniform(s, (), max(0.0, 1.0 - strength), 1.0 + strength)

    # Ops with zero strength are left out entirely (as torchvision does), which makes an
    # all-zero jitter an exact identity; a hue round trip through HSV is not bit-exact.
    ops = []
    if brightness > 0:
        ops.append(lambda x: _adjust_brightness(x, factor(seed_b, brightness)))
    if contrast > 0:
        ops.append(lambda x: _adjust_contrast(x, factor(seed_c, contrast)))
    if saturation > 0:
        ops.append(lambda x: _adjust_saturation(x, factor(seed_s, saturation)))
    if hue > 0:
        ops.append(lambda x: _adjust_hue(x, _uniform(seed_h, (), -hue, hue)))
    if not ops:
        return image

    def jitter(x):
        # argsort of i.i.d. uniforms is a uniformly random permutation.
        order = tf.argsort(_uniform(seed_order, [len(ops)]))
        for position in range(len(ops)):
            # Bind x through a default argument: each branch must see this step's input.
            branches = [lambda op=op, x=x: op(x) for op in ops]
            x = tf.switch_case(order[position], branches)
            x = tf.ensure_shape(x, image.shape)
        return x

    return _apply_with_probability(image, seed_apply, p, jitter)


def random_grayscale(image, seed, p=0.2):
    """With probability ``p``, replaces the image by its ITU-R 601 luma on all 3 channels.

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        seed: integer ``[2]`` tensor.
        p: probability of converting.

    Returns:
        float32 ``[H, W, 3]`` in ``[0, 1]``.
    """
    image = _check_image(image)
    seed = _as_seed(seed)
    p = _check_probability(p)

    def to_grey(x):
        return tf.tile(tf.clip_by_value(_luma(x), 0.0, 1.0), [1, 1, 3])

    return _apply_with_probability(image, seed, p, to_grey)


# --------------------------------------------------------------------------------------------
# Blur
# --------------------------------------------------------------------------------------------


def _check_kernel_size(kernel_size):
    if kernel_size is None:
        return None
    if (
        not isinstance(kernel_size, numbers.Integral)
        or isinstance(kernel_size, bool)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(f"kernel_size must be a positive odd int or None, got {kernel_size!r}")
    return int(kernel_size)


def _blur_radius(side, kernel_size=None):
    """Kernel radius for an image whose shorter side is ``side`` (int or int32 tensor)."""
    if kernel_size is None:
        radius = tf.maximum(1, (side // 10) // 2)
    else:
        radius = tf.constant(kernel_size // 2, tf.int32)
    # Reflect padding cannot be wider than the image.
    return tf.minimum(radius, side - 1)


def _gaussian_kernel(radius, sigma):
    """Normalised float32 ``[2 * radius + 1]`` Gaussian taps."""
    # A tiny floor keeps sigma = 0 finite: every off-centre tap underflows to exactly 0, so the
    # normalised kernel is a unit impulse and the convolution returns the input bit for bit.
    sigma = tf.maximum(tf.cast(sigma, tf.float32), 1e-6)
    taps = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma)))
    return kernel / tf.reduce_sum(kernel)


def _blur_with_sigma(image, sigma, kernel_size=None):
    """Separable Gaussian blur with a given ``sigma`` and reflect padding.

    Args:
        image: float32 ``[H, W, 3]``.
        sigma: scalar float, ``>= 0``; 0 gives the identity.
        kernel_size: odd int, or None for about 10% of the shorter side (odd, at least 3),
            i.e. ``2 * max(1, (min(H, W) // 10) // 2) + 1``. The radius is clamped to
            ``min(H, W) - 1`` because reflect padding cannot be wider than the image.

    Returns:
        float32 ``[H, W, 3]`` in ``[0, 1]``.
    """
    image = _check_image(image)
    kernel_size = _check_kernel_size(kernel_size)
    shape = tf.shape(image)
    radius = _blur_radius(tf.minimum(shape[0], shape[1]), kernel_size)
    kernel = _gaussian_kernel(radius, sigma)

    out = _separable_blur(image, kernel, radius)
    out.set_shape(image.shape)
    return out


def _separable_blur(image, kernel, radius):
    """Reflect-padded separable Gaussian blur of one image, clipped to [0, 1].

    Args:
        image: float32 ``[H, W, 3]``; kernel: float32 ``[2 radius + 1]`` normalised taps.
    """
    x = image[tf.newaxis]
    # Depthwise: one kernel per channel, [k, 1, 3, 1] for rows and [1, k, 3, 1] for columns.
    k_rows = tf.tile(kernel[:, tf.newaxis, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
    k_cols = tf.tile(kernel[tf.newaxis, :, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
    x = tf.pad(x, [[0, 0], [radius, radius], [0, 0], [0, 0]], mode="REFLECT")
    x = tf.nn.depthwise_conv2d(x, k_rows, strides=[1, 1, 1, 1], padding="VALID")
    x = tf.pad(x, [[0, 0], [0, 0], [radius, radius], [0, 0]], mode="REFLECT")
    x = tf.nn.depthwise_conv2d(x, k_cols, strides=[1, 1, 1, 1], padding="VALID")
    return tf.clip_by_value(x[0], 0.0, 1.0)


def gaussian_blur(image, seed, sigma_range=(0.1, 2.0), p=0.5, kernel_size=None):
    """With probability ``p``, blurs with a Gaussian whose sigma is uniform in ``sigma_range``.

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        seed: integer ``[2]`` tensor.
        sigma_range: ``(lo, hi)`` with ``0 <= lo <= hi``; sigma 0 is the identity.
        p: probability of blurring.
        kernel_size: odd int, or None for about 10% of the shorter image side (see
            ``_blur_with_sigma``).

    Returns:
        float32 ``[H, W, 3]`` in ``[0, 1]``.
    """
    image = _check_image(image)
    seed = _as_seed(seed)
    sigma_range = _check_range(sigma_range, "sigma_range")
    p = _check_probability(p)
    kernel_size = _check_kernel_size(kernel_size)
    seed_apply, seed_sigma = _split(seed, 2)
    sigma = _uniform(seed_sigma, (), sigma_range[0], sigma_range[1])
    return _apply_with_probability(
        image, seed_apply, p, lambda x: _blur_with_sigma(x, sigma, kernel_size)
    )


# --------------------------------------------------------------------------------------------
# Views (SimReg supplement B.2)
# --------------------------------------------------------------------------------------------


def weak_view(image, seed, size, scale=(0.2, 1.0)):
    """SimReg's 'weak' augmentation: random resized crop, then random horizontal flip.

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        seed: integer ``[2]`` tensor.
        size: output size, an int or ``(height, width)``.
        scale: area-fraction range of the crop.

    Returns:
        float32 ``[size_h, size_w, 3]`` in ``[0, 1]``.
    """
    seed_crop, seed_flip = _split(_as_seed(seed), 2)
    image = random_resized_crop(image, seed_crop, size, scale=scale)
    return random_flip(image, seed_flip)


def strong_view(
    image,
    seed,
    size,
    scale=(0.2, 1.0),
    jitter_strength=(0.4, 0.4, 0.4, 0.1),
    jitter_p=0.8,
    grayscale_p=0.2,
    blur_sigma=(0.0, 1.0),
    blur_p=1.0,
):
    """SimReg's 'strong' augmentation: weak view + colour jitter + greyscale + Gaussian blur.

    Defaults follow the SimReg paper's supplement B.2, which says the blur's "standard
    deviation [is] chosen uniformly from [0, 1]" and gives no blur probability, so blur is
    always applied (``blur_p=1.0``) with sigma uniform in ``[0, 1]``. MoCo-v2 instead blurs with
    probability 0.5 and sigma in ``[0.1, 2.0]``: pass ``blur_sigma=(0.1, 2.0), blur_p=0.5`` for
    that. The blur kernel is about 10% of the output side.

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        seed: integer ``[2]`` tensor.
        size: output size, an int or ``(height, width)``.
        scale: area-fraction range of the crop.
        jitter_strength: ``(brightness, contrast, saturation, hue)`` for ``color_jitter``.
        jitter_p: probability of colour jitter.
        grayscale_p: probability of greyscale conversion.
        blur_sigma: ``(lo, hi)`` range of the blur sigma.
        blur_p: probability of blurring.

    Returns:
        float32 ``[size_h, size_w, 3]`` in ``[0, 1]``.
    """
    if not isinstance(jitter_strength, (tuple, list)) or len(jitter_strength) != 4:
        raise ValueError(
            "jitter_strength must be (brightness, contrast, saturation, hue), "
            f"got {jitter_strength!r}"
        )
    seed_weak, seed_jitter, seed_grey, seed_blur = _split(_as_seed(seed), 4)
    image = weak_view(image, seed_weak, size, scale=scale)
    b, c, s, h = jitter_strength
    image = color_jitter(image, seed_jitter, b, c, s, h, p=jitter_p)
    image = random_grayscale(image, seed_grey, p=grayscale_p)
    return gaussian_blur(image, seed_blur, sigma_range=blur_sigma, p=blur_p)


def swav_view(image, seed, size, scale, color_strength=1.0, blur_p=0.5):
    """One SwAV multi-crop view: crop, flip, colour distortion, Gaussian blur.

    SwAV's recipe (and OSS A.1, which uses it): RandomResizedCrop(size, scale), horizontal flip
    (p 0.5), colour jitter with brightness/contrast/saturation 0.8 s and hue 0.2 s applied with
    p 0.8, greyscale with p 0.2, then Gaussian blur with sigma in [0.1, 2] applied with p 0.5.

    Args:
        image: float32 ``[H, W, 3]`` in ``[0, 1]``.
        seed: integer ``[2]`` tensor.
        size: output side (int).
        scale: ``(lo, hi)`` area-fraction range of the crop.
        color_strength: s above (1.0 in SwAV).
        blur_p: probability of blurring.

    Returns:
        float32 ``[size, size, 3]`` in ``[0, 1]``.
    """
    seed_crop, seed_flip, seed_jitter, seed_grey, seed_blur = _split(_as_seed(seed), 5)
    image = random_resized_crop(image, seed_crop, size, scale=scale)
    image = random_flip(image, seed_flip)
    s = float(color_strength)
    image = color_jitter(image, seed_jitter, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8)
    image = random_grayscale(image, seed_grey, p=0.2)
    return gaussian_blur(image, seed_blur, sigma_range=(0.1, 2.0), p=blur_p)


# --------------------------------------------------------------------------------------------
# Batched photometric ops: one call per batch of equally sized crops
# --------------------------------------------------------------------------------------------

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _per_image(values):
    """float32 ``[N]`` -> ``[N, 1, 1, 1]``, to scale a batch of images image by image."""
    return values[:, tf.newaxis, tf.newaxis, tf.newaxis]


def _hue_subset(images, out, deltas, mask):
    """``out`` with the images where ``mask`` holds replaced by their hue-rotated ``images``.

    Hue goes through TF's fused per-image kernel (a scalar delta per call), run only on the
    images that need it, so the batched result equals ``color_jitter`` bit for bit.
    """
    rows = tf.where(mask)[:, 0]
    shifted = tf.map_fn(
        lambda args: _adjust_hue(args[0], args[1]),
        (tf.gather(images, rows), tf.gather(deltas, rows)),
        fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32),
    )
    return tf.tensor_scatter_nd_update(out, rows[:, tf.newaxis], shifted)


def _pick(mask, a, b):
    """``where(mask, a, b)`` per image, as ``a * m + b * (1 - m)`` with ``m`` in {0, 1}.

    Exact for finite values (``v * 1 = v``, ``v * 0 = 0``, ``v + 0 = v``) and several times
    faster than a broadcasting ``tf.where`` on CPU.
    """
    m = _per_image(tf.cast(mask, a.dtype))
    return a * m + b * (1.0 - m)


def batch_color_jitter(images, apply, order, factors, ops=JITTER_OPS):
    """``color_jitter`` on a batch, with every image's random draws given explicitly.

    Brightness, contrast and saturation are all ``clip(f * x + (1 - f) * other)`` with
    ``other`` 0, the mean grey level or the grey image (brightness' ``clip(x * f)`` is the
    same bits: ``(1 - f) * 0`` adds an exact zero), so each position of the permutation costs
    one blend for the whole batch, with a per-image ``other``; hue goes through TF's fused
    per-image kernel on the images that need it.

    Args:
        images: float32 ``[N, H, W, 3]`` in ``[0, 1]``, statically sized.
        apply: bool ``[N]``, whether an image is jittered at all.
        order: int32 ``[N, len(ops)]``, per image a permutation of ``range(len(ops))``: the
            op at each position.
        factors: float32 ``[N, 4]``: brightness, contrast, saturation factors and hue delta.
        ops: the enabled ops, a sub-sequence of ``JITTER_OPS`` (zero strengths left out).

    Returns:
        float32 ``[N, H, W, 3]`` in ``[0, 1]``.
    """
    x = images
    index = {name: k for k, name in enumerate(ops)}
    for position in range(len(ops)):
        chosen = order[:, position]

        def is_op(name, chosen=chosen):
            return chosen == index[name] if name in index else tf.zeros_like(chosen, tf.bool)

        blend_ops = [n for n in ops if n != "hue"]
        out = x
        if blend_ops:
            # Per-image factor of the op at this position (1 for hue: overwritten below).
            f = tf.ones_like(factors[:, 0])
            for name in blend_ops:
                f = tf.where(is_op(name), factors[:, JITTER_OPS.index(name)], f)
            other = tf.zeros_like(x[..., :1])
            if "contrast" in index or "saturation" in index:
                luma = _luma(x)
                m_sat = _per_image(tf.cast(is_op("saturation"), tf.float32))
                m_con = _per_image(tf.cast(is_op("contrast"), tf.float32))
                mean = tf.reduce_mean(luma, axis=[1, 2, 3], keepdims=True)
                other = luma * m_sat + mean * m_con
            out = _blend(x, other, _per_image(f))
        if "hue" in index:
            hue = is_op("hue")
            if blend_ops:
                out = _pick(hue, x, out)
            out = _hue_subset(x, out, factors[:, 3], hue & apply)
        x = out
    return _pick(apply, x, images)


def batch_grayscale(images, apply):
    """``random_grayscale`` on a batch: float32 ``[N, H, W, 3]``, bool ``[N]`` -> same shape."""
    grey = tf.tile(tf.clip_by_value(_luma(images), 0.0, 1.0), [1, 1, 1, 3])
    return _pick(apply, grey, images)


def batch_blur(images, kernels):
    """Separable Gaussian blur of each image with its own taps, reflect-padded.

    One depthwise convolution per image and direction (``tf.map_fn``): on CPU that is faster
    than folding the batch into the channels, and it is the per-image op bit for bit. An
    image whose taps are a unit impulse comes back unchanged.

    Args:
        images: float32 ``[N, H, W, 3]``, statically sized.
        kernels: float32 ``[N, 2 r + 1]`` normalised taps (``r < min(H, W)``).

    Returns:
        float32 ``[N, H, W, 3]`` in ``[0, 1]``.
    """
    radius = (kernels.shape[-1] - 1) // 2

    def blur_one(args):
        image, kernel = args
        return _separable_blur(image, kernel, radius)

    return tf.map_fn(
        blur_one,
        (images, kernels),
        fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32),
        parallel_iterations=16,
    )


# --------------------------------------------------------------------------------------------
# Staged views: geometry per example (uint8, before decoding where possible), colour per batch
# --------------------------------------------------------------------------------------------

# Where colour jitter, greyscale and blur run: "example" (per crop, inside the example map: on
# CPU the cheapest, as tf.cond skips the ops an image does not get) or "batch" (after `batch`,
# vectorised over the crops: for accelerators, or a first step on device).
COLOUR_STAGES = ("example", "batch")

# Prefix of the per-image random draws that travel from the example stage to the batch stage.
_PARAM = "_aug/"

# Extra pixels decoded around a JPEG crop window: libjpeg's chroma upsampling at the window's
# edge sees no neighbour outside it, so without a margin edge pixels differ from a full decode.
# One pixel suffices for 4:2:0 (checked on 1,000 Imagenette crops); 4 leaves room.
_JPEG_MARGIN = 4


def _draw(seed, p):
    """bool []: an event of probability ``p`` decided by ``seed`` (as _apply_with_probability)."""
    if p == 0.0:
        return tf.constant(False)
    if p == 1.0:
        return tf.constant(True)
    return _uniform(seed) < p


@dataclasses.dataclass(frozen=True)
class CropRecipe:
    """How one crop of a view is drawn and coloured.

    ``seeds`` reproduces the sub-seed layout of ``weak_view`` ("weak"), ``strong_view``
    ("strong") or ``swav_view`` ("swav"), so a crop equals the per-image function's output.
    """

    size: tuple
    scale: tuple = (0.2, 1.0)
    layout: str = "weak"
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    grey_p: float = 0.0
    blur_sigma: tuple = (0.0, 0.0)
    blur_p: float = 0.0
    center: bool = False  # the deterministic evaluation transform (center_crop)
    ratio: tuple = (3 / 4, 4 / 3)
    resize: str = "antialias"  # resize_crop's mode for the random crops

    @property
    def jitter_ops(self):
        return tuple(n for n, v in zip(JITTER_OPS, self.jitter, strict=True) if v > 0)

    @property
    def blur_radius(self):
        side = min(self.size)
        return min(max(1, (side // 10) // 2), side - 1)

    def seeds(self, seed):
        """(crop, flip, jitter, grey, blur) sub-seeds; None where the layout has none."""
        if self.layout == "weak":
            return (*_split(seed, 2), None, None, None)
        if self.layout == "strong":
            seed_weak, seed_jitter, seed_grey, seed_blur = _split(seed, 4)
            return (*_split(seed_weak, 2), seed_jitter, seed_grey, seed_blur)
        return tuple(_split(seed, 5))

    def colour_params(self, seed_jitter, seed_grey, seed_blur):
        """{name: tensor} of the random draws ``colour`` needs (as color_jitter etc. draw)."""
        params = {}
        ops = self.jitter_ops
        if ops and self.jitter_p > 0:
            seed_apply, seed_order, *seed_ops = _split(seed_jitter, 6)
            draws = []
            for k, (name, strength) in enumerate(zip(JITTER_OPS, self.jitter, strict=True)):
                if strength <= 0:
                    draws.append(tf.constant(0.0))
                elif name == "hue":
                    draws.append(_uniform(seed_ops[k], (), -strength, strength))
                else:
                    draws.append(
                        _uniform(seed_ops[k], (), max(0.0, 1.0 - strength), 1.0 + strength)
                    )
            params["jitter_apply"] = _draw(seed_apply, self.jitter_p)
            params["jitter_order"] = tf.argsort(_uniform(seed_order, [len(ops)]))
            params["jitter_factors"] = tf.stack(draws)
        if self.grey_p > 0:
            params["grey"] = _draw(seed_grey, self.grey_p)
        if self.blur_p > 0:
            seed_apply, seed_sigma = _split(seed_blur, 2)
            sigma = _uniform(seed_sigma, (), self.blur_sigma[0], self.blur_sigma[1])
            radius = self.blur_radius
            impulse = tf.one_hot(radius, 2 * radius + 1, dtype=tf.float32)
            kernel = _gaussian_kernel(tf.constant(radius), sigma)
            params["blur_kernel"] = tf.where(_draw(seed_apply, self.blur_p), kernel, impulse)
        return params

    def colour_one(self, image, seed_jitter, seed_grey, seed_blur):
        """The per-image colour ops on one crop, with the same draws as ``colour_params``."""
        if self.jitter_ops and self.jitter_p > 0:
            image = color_jitter(image, seed_jitter, *self.jitter, p=self.jitter_p)
        if self.grey_p > 0:
            image = random_grayscale(image, seed_grey, p=self.grey_p)
        if self.blur_p > 0:
            image = gaussian_blur(image, seed_blur, sigma_range=self.blur_sigma, p=self.blur_p)
        return image

    def colour(self, images, params):
        """Applies the drawn jitter, greyscale and blur to float32 ``[N, H, W, 3]``."""
        if "jitter_apply" in params:
            images = batch_color_jitter(
                images,
                params["jitter_apply"],
                params["jitter_order"],
                params["jitter_factors"],
                self.jitter_ops,
            )
        if "grey" in params:
            images = batch_grayscale(images, params["grey"])
        if "blur_kernel" in params:
            images = batch_blur(images, params["blur_kernel"])
        return images


def _slice_hw(image, top, left, height, width):
    return tf.slice(image, tf.stack([top, left, 0]), tf.stack([height, width, -1]))


def _decode_jpeg_crop(encoded, box):
    """uint8 ``[h, w, 3]``: the box of a JPEG, decoded (with a margin) without the rest."""
    hw = tf.io.extract_jpeg_shape(encoded)[:2]
    top, left, height, width = box(hw)
    top0, left0 = tf.maximum(top - _JPEG_MARGIN, 0), tf.maximum(left - _JPEG_MARGIN, 0)
    bottom = tf.minimum(top + height + _JPEG_MARGIN, hw[0])
    right = tf.minimum(left + width + _JPEG_MARGIN, hw[1])
    window = tf.stack([top0, left0, bottom - top0, right - left0])
    wide = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    return _slice_hw(wide, top - top0, left - left0, height, width)


def _decode_full(encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


class StagedViews:
    """The views of one training example, computed in two stages.

    ``per_example`` (inside ``Dataset.map``) draws every random number from the example's seed,
    cuts the crops from the undecoded or uint8 image, converts only the crop to float, resizes
    and flips it; colour jitter, greyscale and blur then run on the small crop, either right
    there (``colour_stage="example"``, the default: cheapest on CPU, where ``tf.cond`` skips
    the ops a crop does not get) or in ``per_batch`` (after ``batch``, vectorised over all
    crops of the batch: ``colour_stage="batch"``, for accelerators). Calling the object on one image runs both stages
    and is the per-image view function of old: ``fn(image, seed) -> {key: view}``.

    Both stages perform the very float operations of ``weak_view``, ``strong_view``,
    ``swav_view`` and ``center_crop`` (crop and float conversion commute bit for bit; batched
    blends, blur and hue are checked equal to the per-image ops), so the views are the same
    bits as the per-image functions give, and replay for a seed in any process.

    Args:
        groups: ``((key, recipe, seed_positions, stacked), ...)``: the output ``key`` holds
            one crop per seed position (``[S, S, 3]``, or ``[n, S, S, 3]`` when ``stacked``).
        num_seeds: how many sub-seeds the example seed is split into.
        aliases: ``{key: other_key}`` outputs that are the same tensor as another.
    """

    def __init__(self, groups, num_seeds, aliases=None, colour_stage="example"):
        if colour_stage not in COLOUR_STAGES:
            raise ValueError(f"colour_stage must be one of {COLOUR_STAGES}, got {colour_stage!r}")
        self.groups = tuple(groups)
        self.num_seeds = num_seeds
        self.aliases = dict(aliases or {})
        self.colour_stage = colour_stage

    def select(self, keys):
        """The same views restricted to ``keys`` (seeds unchanged, unused crops not drawn)."""
        keys = tuple(keys)
        groups = [g for g in self.groups if g[0] in keys]
        aliases = {k: v for k, v in self.aliases.items() if k in keys}
        for alias, target in aliases.items():
            if target not in keys:
                groups += [(alias, *g[1:]) for g in self.groups if g[0] == target]
        aliases = {k: v for k, v in aliases.items() if v in keys}
        return StagedViews(groups, self.num_seeds, aliases, self.colour_stage)

    @property
    def single_crop(self):
        return len(self.groups) == 1 and len(self.groups[0][2]) == 1

    def per_example(self, seed, image=None, encoded=None, to_float=None):
        """Crops, float conversion, resize and flip of one example, plus the colour draws.

        Args:
            seed: integer ``[2]`` seed of the example.
            image: decoded ``[H, W, C]`` image (any dtype ``to_float_image`` accepts), or
            encoded: string ``[]`` file contents (JPEG single-crop views decode only the crop
                window; other formats are decoded in full, once).
            to_float: uint8 crop -> float32 ``[h, w, 3]``; default ``to_float_image``.

        Returns:
            ``{key: float32 view(s)}`` plus private ``"_aug/..."`` entries for ``per_batch``.
        """
        to_float = to_float or to_float_image
        seeds = _split(_as_seed(seed), self.num_seeds)
        if encoded is not None and not self.single_crop:
            image = _decode_full(encoded)
        out = {}
        for key, recipe, positions, stacked in self.groups:
            crops = [self._crop(recipe, seeds[p], image, encoded, to_float) for p in positions]
            for name in crops[0]:
                values = [c[name] for c in crops]
                value = tf.stack(values) if stacked else values[0]
                out[key if name == "view" else f"{_PARAM}{key}/{name}"] = value
        return out

    def _crop(self, recipe, seed, image, encoded, to_float):
        if recipe.center:
            decoded = _decode_full(encoded) if image is None else image
            return {"view": center_crop(to_float(decoded), recipe.size)}
        seed_crop, seed_flip, *colour_seeds = recipe.seeds(seed)

        def box(hw):
            return crop_box(hw, seed_crop, recipe.scale, recipe.ratio)

        def cut(decoded):
            return _slice_hw(decoded, *box(tf.shape(decoded)[:2]))

        if image is not None:
            crop = cut(image)
        else:
            crop = tf.cond(
                tf.io.is_jpeg(encoded),
                lambda: _decode_jpeg_crop(encoded, box),
                lambda: cut(_decode_full(encoded)),
            )
        view = tf.clip_by_value(resize_crop(to_float(crop), recipe.size, recipe.resize), 0.0, 1.0)
        # tf.cond, not tf.where: only the flipped half of the crops pays for the reversal.
        view = tf.cond(_uniform(seed_flip) < 0.5, lambda: tf.reverse(view, axis=[1]), lambda: view)
        view.set_shape([*recipe.size, 3])
        if self.colour_stage == "example":
            return {"view": recipe.colour_one(view, *colour_seeds)}
        return {"view": view, **recipe.colour_params(*colour_seeds)}

    def per_batch(self, batch):
        """Colour stage on a batch of ``per_example`` outputs; drops the private entries."""
        out = {k: v for k, v in batch.items() if not k.startswith(_PARAM)}
        for key, recipe, positions, stacked in self.groups:
            prefix = f"{_PARAM}{key}/"
            params = {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}
            if not params:
                continue
            views = batch[key]
            if stacked:  # [B, n, S, S, 3] -> [B * n, S, S, 3], params likewise
                views = tf.reshape(views, [-1, *views.shape[2:]])
                params = {k: tf.reshape(v, [-1, *v.shape[2:]]) for k, v in params.items()}
            views = recipe.colour(views, params)
            if stacked:
                views = tf.reshape(views, [-1, len(positions), *views.shape[1:]])
            out[key] = views
        for alias, target in self.aliases.items():
            out[alias] = out[target]
        return out

    def __call__(self, image, seed):
        """Per-image use: ``{key: view}`` for one decoded image ``[H, W, C]``."""
        example = self.per_example(seed, image=tf.convert_to_tensor(image))
        batch = self.per_batch({k: v[tf.newaxis] for k, v in example.items()})
        out = {k: v[0] for k, v in batch.items() if k not in self.aliases}
        return {**out, **{alias: out[target] for alias, target in self.aliases.items()}}


# --strong_blur: (sigma range, probability) of --augment=strong's Gaussian blur. "paper" is
# SimReg's supplement B.2 (sigma uniform in [0, 1], no probability given: always); "official"
# is UCDvision/simreg's dataloader (MoCo-v2's GaussianBlur([.1, 2.]) under p = 0.5).
STRONG_BLURS = {"paper": ((0.0, 1.0), 1.0), "official": ((0.1, 2.0), 0.5)}


def _view_recipe(kind, size, scale, resize, strong_blur="paper"):
    if kind == "none":
        return CropRecipe(size=size, center=True)
    if kind == "weak":
        return CropRecipe(size=size, scale=scale, layout="weak", resize=resize)
    if strong_blur not in STRONG_BLURS:
        raise ValueError(f"strong_blur must be one of {tuple(STRONG_BLURS)}, got {strong_blur!r}")
    blur_sigma, blur_p = STRONG_BLURS[strong_blur]
    # strong_view's colour defaults (SimReg B.2).
    return CropRecipe(
        size=size,
        scale=scale,
        resize=resize,
        layout="strong",
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        grey_p=0.2,
        blur_sigma=blur_sigma,
        blur_p=blur_p,
    )


def make_view_fn(
    kind,
    size,
    mode,
    scale=(0.2, 1.0),
    keys=None,
    colour_stage="example",
    resize="auto",
    strong_blur="paper",
):
    """Builds ``fn(image, seed) -> {"student": view, "teacher": view}`` for a dataset map.

    Args:
        kind: "weak" (``weak_view``), "strong" (``strong_view``) or "none" (``center_crop``).
        size: output size, an int or ``(height, width)``.
        mode: "same" (one augmentation; both entries are the same tensor, SimReg's best setting)
            or "different" (independent augmentations from two sub-seeds of ``seed``).
        scale: area-fraction range of the random crop (unused for "none").
        keys: output keys to keep (e.g. ``("student",)``); default both.
        colour_stage: "example" or "batch" (see ``COLOUR_STAGES``); the same bits either way.
        resize: ``resize_crop``'s mode for the random crops (the centre crop of "none" is
            always antialiased); "auto" by default, as ``--view_resize``. "antialias" gives the
            bits of ``weak_view``/``strong_view``.
        strong_blur: the Gaussian blur of "strong" (``STRONG_BLURS``, as ``--strong_blur``):
            "paper" (sigma in [0, 1], always; ``strong_view``'s default) or "official".

    The returned :class:`StagedViews` takes an image ``[H, W, C]`` of any dtype accepted by
    ``to_float_image`` and an integer ``[2]`` seed, and returns float32
    ``[size_h, size_w, 3]`` views; ``kd_keras.data.sources.make_train_dataset`` runs its two stages
    around ``batch``. The student view under "different" equals the (shared) view under "same"
    for the same seed, so switching modes only changes the teacher's input. For "none" the view
    is deterministic, so it is computed once and shared in both modes.
    """
    if kind not in VIEW_KINDS:
        raise ValueError(f"kind must be one of {VIEW_KINDS}, got {kind!r}")
    if mode not in VIEW_MODES:
        raise ValueError(f"mode must be one of {VIEW_MODES}, got {mode!r}")
    size = _check_size(size)
    scale = _check_range(scale, "scale")
    recipe = _view_recipe(kind, size, scale, _check_resize(resize), strong_blur)
    if kind == "none" or mode == "same":
        groups = [("student", recipe, (0,), False)]
        views = StagedViews(groups, 2, {"teacher": "student"}, colour_stage)
    else:
        groups = [("student", recipe, (0,), False), ("teacher", recipe, (1,), False)]
        views = StagedViews(groups, 2, colour_stage=colour_stage)
    return views if keys is None else views.select(keys)


def view_fn_for(data, keys=None):
    """``make_view_fn`` with a run's view settings, so training and the teacher cache build the
    very same views.

    Args:
        data: an object with the data flags' fields (``kd_keras.config.DataConfig``): augment,
            image_size, aug_mode, crop_scale_min, view_resize, strong_blur.
        keys: as ``make_view_fn``.
    """
    return make_view_fn(
        data.augment,
        data.image_size,
        data.aug_mode,
        scale=(data.crop_scale_min, 1.0),
        keys=keys,
        resize=data.view_resize,
        strong_blur=data.strong_blur,
    )


def make_multicrop_fn(
    sizes=(224, 96),
    counts=(2, 6),
    scales=((0.14, 1.0), (0.05, 0.14)),
    color_strength=1.0,
    blur_p=0.5,
    colour_stage="example",
    resize="auto",
):
    """Builds ``fn(image, seed) -> {"large": [n0, S0, S0, 3], "small": [n1, S1, S1, 3]}``.

    All V + 2 views of an image come from one call (the image is decoded once); view j of
    resolution group g gets its own sub-seed, so every crop is replayable from (seed, image
    index, epoch). Each crop is ``swav_view``. Defaults are SwAV's and OSS's 2 x 224 + 6 x 96
    with scales [0.14, 1] and [0.05, 0.14]. The "small" entry is omitted when its count is 0.

    Args:
        sizes: (large side, small side) in pixels.
        counts: (number of large crops (>= 1; 2 for SwAV/OSS), number of small crops (>= 0)).
        scales: ((lo, hi) large, (lo, hi) small) area-fraction ranges.
        color_strength: SwAV's colour-distortion strength s.
        blur_p: probability of the Gaussian blur (SwAV: 0.5).
        colour_stage: "example" or "batch" (see ``COLOUR_STAGES``); the same bits either way.
        resize: ``resize_crop``'s mode, "auto" by default (as ``--view_resize``); "antialias"
            gives the bits of ``swav_view``.

    Returns:
        a :class:`StagedViews`.
    """
    if len(sizes) != 2 or len(counts) != 2 or len(scales) != 2:
        raise ValueError(
            "multi-crop needs one size, count and scale range for each of the two resolution "
            f"groups (large, small); got sizes={sizes}, counts={counts}, scales={scales} "
            "(--image_size/--small_crop_size, --num_large_crops/--num_small_crops, "
            "--large_crop_scale/--small_crop_scale)."
        )
    sizes = tuple(int(_check_size(s)[0]) for s in sizes)
    counts = tuple(int(c) for c in counts)
    if counts[0] < 1 or counts[1] < 0:
        raise ValueError(f"crop counts must be >= 1 large and >= 0 small, got {counts}.")
    scales = tuple(_check_range(s, "scale") for s in scales)
    blur_p = _check_probability(blur_p, "blur_p")
    resize = _check_resize(resize)
    s = float(color_strength)
    groups, start = [], 0
    for key, size, count, scale in zip(("large", "small"), sizes, counts, scales, strict=True):
        if count == 0:
            continue
        recipe = CropRecipe(
            size=(size, size),
            scale=scale,
            layout="swav",
            jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
            jitter_p=0.8,
            grey_p=0.2,
            blur_sigma=(0.1, 2.0),
            blur_p=blur_p,
            resize=resize,
        )
        groups.append((key, recipe, tuple(range(start, start + count)), True))
        start += count
    return StagedViews(groups, sum(counts), colour_stage=colour_stage)
