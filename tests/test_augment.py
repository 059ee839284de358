"""Tests for kd_keras.augment: determinism, eager/graph agreement and NumPy references."""

import colorsys

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from kd_keras.data import augment

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _image(h=20, w=30, seed=0):
    return np.random.default_rng(seed).uniform(size=(h, w, 3)).astype(np.float32)


def _seed(a, b=7):
    return tf.constant([a, b], tf.int32)


# Every public seeded op, with non-trivial probabilities so outputs depend on the seed.
SEEDED_OPS = {
    "random_resized_crop": lambda x, s: augment.random_resized_crop(x, s, 8),
    "random_resized_crop_hw": lambda x, s: augment.random_resized_crop(x, s, (6, 10)),
    "random_flip": lambda x, s: augment.random_flip(x, s),
    "color_jitter": lambda x, s: augment.color_jitter(x, s),
    "random_grayscale": lambda x, s: augment.random_grayscale(x, s, p=0.5),
    "gaussian_blur": lambda x, s: augment.gaussian_blur(x, s),
    "weak_view": lambda x, s: augment.weak_view(x, s, 8),
    "strong_view": lambda x, s: augment.strong_view(x, s, 8),
}

OUTPUT_SHAPES = {
    "random_resized_crop": (8, 8, 3),
    "random_resized_crop_hw": (6, 10, 3),
    "weak_view": (8, 8, 3),
    "strong_view": (8, 8, 3),
}


@pytest.mark.parametrize("name", sorted(SEEDED_OPS))
def test_seeded_op_is_deterministic_and_depends_on_seed(name):
    op = SEEDED_OPS[name]
    image = _image()
    outputs = [op(image, _seed(i)).numpy() for i in range(6)]
    np.testing.assert_array_equal(op(image, _seed(0)).numpy(), outputs[0])
    # A Python tuple and an int64 tensor with the same values are the same seed.
    np.testing.assert_array_equal(op(image, tf.constant([0, 7], tf.int64)).numpy(), outputs[0])
    np.testing.assert_array_equal(op(image, (0, 7)).numpy(), outputs[0])
    assert any(not np.array_equal(outputs[0], out) for out in outputs[1:])


@pytest.mark.parametrize("name", sorted(SEEDED_OPS))
def test_seeded_op_shape_dtype_and_range(name):
    # Saturated input stresses the clipping after brightness/contrast/blend extrapolation.
    image = np.clip(_image() * 1.6 - 0.3, 0.0, 1.0)
    for i in range(3):
        out = SEEDED_OPS[name](image, _seed(i))
        assert out.dtype == tf.float32
        assert tuple(out.shape) == OUTPUT_SHAPES.get(name, image.shape)
        assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 1.0


def _run_in_dataset(fn, image, seeds):
    """Maps fn over (image, seed) pairs in a Dataset whose image height/width are unknown."""
    ds = tf.data.Dataset.from_generator(
        lambda: iter([(image, seed) for seed in seeds]),
        output_signature=(
            tf.TensorSpec([None, None, image.shape[-1]], tf.as_dtype(image.dtype)),
            tf.TensorSpec([2], tf.int32),
        ),
    )
    return list(ds.map(fn))


EAGER_VS_MAP = dict(SEEDED_OPS)
EAGER_VS_MAP["center_crop"] = lambda x, s: augment.center_crop(x, 8)
EAGER_VS_MAP["to_float_image"] = lambda x, s: augment.to_float_image(x)


@pytest.mark.parametrize("name", sorted(EAGER_VS_MAP))
def test_eager_matches_dataset_map(name):
    fn = EAGER_VS_MAP[name]
    image = _image(17, 23, seed=1)
    seeds = [np.array([i, 11], np.int32) for i in (3, 4)]
    mapped = _run_in_dataset(fn, image, seeds)
    assert len(mapped) == len(seeds)
    for seed, out in zip(seeds, mapped, strict=True):
        eager = fn(image, tf.constant(seed)).numpy()
        np.testing.assert_allclose(out.numpy(), eager, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["weak", "strong", "none"])
@pytest.mark.parametrize("mode", ["same", "different"])
def test_make_view_fn_eager_matches_dataset_map(kind, mode):
    fn = augment.make_view_fn(kind, 8, mode)
    image = (_image(15, 19, seed=2) * 255).astype(np.uint8)
    seed = np.array([5, 9], np.int32)
    eager = fn(image, tf.constant(seed))
    (mapped,) = _run_in_dataset(fn, image, [seed])
    assert set(eager) == {"student", "teacher"}
    for key in ("student", "teacher"):
        assert tuple(eager[key].shape) == (8, 8, 3) and eager[key].dtype == tf.float32
        np.testing.assert_allclose(mapped[key].numpy(), eager[key].numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# random_resized_crop
# ---------------------------------------------------------------------------------------------


def test_random_resized_crop_full_scale_square_equals_resize():
    image = _image(16, 16)
    out = augment.random_resized_crop(image, _seed(3), 9, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    expected = tf.image.resize(image, (9, 9), method="bilinear", antialias=True)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-6)


def _find_block(image, block):
    """Offsets (top, left) where `block` appears exactly inside `image`, or None."""
    bh, bw = block.shape[:2]
    for top in range(image.shape[0] - bh + 1):
        for left in range(image.shape[1] - bw + 1):
            if np.allclose(image[top : top + bh, left : left + bw], block, atol=1e-6):
                return top, left
    return None


def test_random_resized_crop_is_a_subwindow_at_random_positions():
    # Area fraction 1/4 and ratio 1 make every crop 8x8, and an 8x8 output means no rescaling,
    # so the output must be a verbatim window of the input.
    image = _image(16, 16, seed=4)
    positions = set()
    for i in range(8):
        out = augment.random_resized_crop(image, _seed(i), 8, scale=(0.25, 0.25), ratio=(1, 1))
        position = _find_block(image, out.numpy())
        assert position is not None
        positions.add(position)
    assert len(positions) > 1


def test_random_resized_crop_falls_back_to_ratio_clamped_centre_crop():
    # A 10x20 image cannot hold a square of its full area, so all candidates fail and the
    # fallback keeps the full height and a centred 10-wide square.
    image = _image(10, 20, seed=5)
    out = augment.random_resized_crop(image, _seed(1), 10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(out.numpy(), image[:, 5:15], atol=1e-6)


def test_random_resized_crop_rejects_bad_arguments():
    image = _image()
    with pytest.raises(ValueError, match="size"):
        augment.random_resized_crop(image, _seed(0), 0)
    with pytest.raises(ValueError, match="size"):
        augment.random_resized_crop(image, _seed(0), (8, 8, 3))
    with pytest.raises(ValueError, match="scale"):
        augment.random_resized_crop(image, _seed(0), 8, scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="ratio"):
        augment.random_resized_crop(image, _seed(0), 8, ratio=(0.0, 1.0))
    with pytest.raises(ValueError, match="seed"):
        augment.random_resized_crop(image, tf.constant([1, 2, 3]), 8)
    with pytest.raises(ValueError, match="seed"):
        augment.random_resized_crop(image, tf.constant([1.0, 2.0]), 8)
    with pytest.raises(ValueError, match="image"):
        augment.random_resized_crop((image * 255).astype(np.uint8), _seed(0), 8)
    with pytest.raises(ValueError, match="image"):
        augment.random_resized_crop(image[None], _seed(0), 8)


# ---------------------------------------------------------------------------------------------
# random_flip
# ---------------------------------------------------------------------------------------------


def test_random_flip_probability_and_output():
    image = _image(4, 5)
    flipped = 0
    n = 200
    for i in range(n):
        out = augment.random_flip(image, _seed(i, 1)).numpy()
        if np.array_equal(out, image[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, image)
    # Binomial(200, 0.5): [70, 130] is more than 4 standard deviations wide.
    assert 70 <= flipped <= 130
    np.testing.assert_array_equal(augment.random_flip(image, _seed(0), p=0.0).numpy(), image)
    np.testing.assert_array_equal(
        augment.random_flip(image, _seed(0), p=1.0).numpy(), image[:, ::-1]
    )
    with pytest.raises(ValueError, match="p"):
        augment.random_flip(image, _seed(0), p=1.5)


# ---------------------------------------------------------------------------------------------
# Colour ops
# ---------------------------------------------------------------------------------------------


def test_random_grayscale_matches_numpy_luma():
    image = _image(6, 7)
    out = augment.random_grayscale(image, _seed(0), p=1.0).numpy()
    expected = (image * LUMA).sum(axis=-1)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], expected, atol=1e-6)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_array_equal(augment.random_grayscale(image, _seed(0), p=0.0), image)


def test_color_jitter_zero_strength_is_identity():
    image = _image(6, 7)
    out = augment.color_jitter(image, _seed(1), 0.0, 0.0, 0.0, 0.0, p=1.0)
    np.testing.assert_array_equal(out.numpy(), image)
    out = augment.color_jitter(image, _seed(1), p=0.0)
    np.testing.assert_array_equal(out.numpy(), image)


def test_adjust_brightness_contrast_saturation_match_numpy():
    image = _image(5, 6, seed=3)
    grey = (image * LUMA).sum(axis=-1, keepdims=True)
    for factor in (0.5, 1.3):
        np.testing.assert_allclose(
            augment._adjust_brightness(image, factor).numpy(),
            np.clip(factor * image, 0, 1),
            atol=1e-6,
        )
        np.testing.assert_allclose(
            augment._adjust_contrast(image, factor).numpy(),
            np.clip(factor * image + (1 - factor) * grey.mean(), 0, 1),
            atol=1e-6,
        )
        np.testing.assert_allclose(
            augment._adjust_saturation(image, factor).numpy(),
            np.clip(factor * image + (1 - factor) * grey, 0, 1),
            atol=1e-6,
        )


def test_adjust_hue_matches_colorsys():
    image = _image(3, 4, seed=6)
    delta = 0.23
    expected = np.empty_like(image)
    for idx in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*image[idx])
        expected[idx] = colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
    np.testing.assert_allclose(augment._adjust_hue(image, delta).numpy(), expected, atol=1e-5)


def test_color_jitter_brightness_only_uses_one_factor_in_range():
    image = _image(5, 6, seed=7) * 0.5 + 0.1  # values in [0.1, 0.6]: no clipping at 1.4x
    factors = []
    for i in range(10):
        out = augment.color_jitter(image, _seed(i), 0.4, 0.0, 0.0, 0.0, p=1.0).numpy()
        ratio = out / image
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
        factors.append(ratio.flat[0])
    assert min(factors) >= 0.6 - 1e-5 and max(factors) <= 1.4 + 1e-5
    assert np.ptp(factors) > 0.1


def test_color_jitter_applies_with_probability_p():
    image = _image(4, 4)
    changed = sum(
        not np.array_equal(augment.color_jitter(image, _seed(i, 2), p=0.8).numpy(), image)
        for i in range(60)
    )
    # Binomial(60, 0.8) has mean 48 and std 3.1.
    assert 36 <= changed <= 59


def test_color_jitter_rejects_bad_strengths():
    with pytest.raises(ValueError, match="hue"):
        augment.color_jitter(_image(), _seed(0), hue=0.7)
    with pytest.raises(ValueError, match="brightness"):
        augment.color_jitter(_image(), _seed(0), brightness=-0.1)


# ---------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------


def _numpy_blur(image, sigma, kernel_size):
    radius = kernel_size // 2
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    # scipy's "mirror" mode reflects without repeating the edge pixel, like TF's REFLECT.
    out = ndimage.convolve1d(image.astype(np.float64), kernel, axis=0, mode="mirror")
    return ndimage.convolve1d(out, kernel, axis=1, mode="mirror")


@pytest.mark.parametrize(("sigma", "kernel_size"), [(0.8, 5), (1.7, 7), (1.0, None)])
def test_blur_with_sigma_matches_scipy(sigma, kernel_size):
    image = _image(30, 24, seed=8)
    out = augment._blur_with_sigma(image, sigma, kernel_size).numpy()
    # Default kernel: 10% of the shorter side (24 -> 2), made odd and at least 3.
    expected = _numpy_blur(image, sigma, kernel_size or 3)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_blur_default_kernel_grows_with_image():
    image = _image(64, 70, seed=9)
    out = augment._blur_with_sigma(image, 2.0).numpy()
    np.testing.assert_allclose(out, _numpy_blur(image, 2.0, 7), atol=1e-5)  # 64 // 10 = 6 -> 7


def test_blur_sigma_zero_is_identity_and_tiny_images_work():
    image = _image(9, 9)
    np.testing.assert_array_equal(augment._blur_with_sigma(image, 0.0, 5).numpy(), image)
    out = augment.gaussian_blur(image, _seed(0), sigma_range=(0.0, 0.0), p=1.0)
    np.testing.assert_array_equal(out.numpy(), image)
    # A kernel wider than the image is clamped rather than breaking reflect padding.
    tiny = _image(2, 3)
    assert augment._blur_with_sigma(tiny, 1.0, 9).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        augment._blur_with_sigma(image, 1.0, 4)


def test_gaussian_blur_fixed_sigma_matches_helper():
    image = _image(12, 12)
    out = augment.gaussian_blur(image, _seed(2), sigma_range=(1.2, 1.2), p=1.0, kernel_size=5)
    np.testing.assert_allclose(out.numpy(), _numpy_blur(image, 1.2, 5), atol=1e-5)
    out = augment.gaussian_blur(image, _seed(2), p=0.0)
    np.testing.assert_array_equal(out.numpy(), image)


# ---------------------------------------------------------------------------------------------
# center_crop, views, conversion
# ---------------------------------------------------------------------------------------------


def test_center_crop_takes_the_centre():
    # crop_fraction 8/12 makes the resize target equal the shorter side (12): no rescaling,
    # so the output must be exactly the central window.
    square = _image(12, 12)
    np.testing.assert_allclose(
        augment.center_crop(square, 8, crop_fraction=8 / 12).numpy(), square[2:10, 2:10], atol=1e-6
    )
    wide = _image(12, 20)
    np.testing.assert_allclose(
        augment.center_crop(wide, 8, crop_fraction=8 / 12).numpy(), wide[2:10, 6:14], atol=1e-6
    )


def test_center_crop_resizes_shorter_side():
    image = _image(40, 60)
    out = augment.center_crop(image, 8)  # shorter side -> round(8 * 256 / 224) = 9, 9x13
    assert tuple(out.shape) == (8, 8, 3)
    resized = tf.image.resize(image, (9, 13), method="bilinear", antialias=True).numpy()
    np.testing.assert_allclose(out.numpy(), resized[0:8, 2:10], atol=1e-6)
    with pytest.raises(ValueError, match="crop_fraction"):
        augment.center_crop(image, 8, crop_fraction=1.5)


def test_make_view_fn_modes():
    image = _image(20, 24)
    seed = _seed(4)
    same = augment.make_view_fn("strong", 8, "same")(image, seed)
    assert same["student"] is same["teacher"]
    different = augment.make_view_fn("strong", 8, "different")(image, seed)
    assert not np.array_equal(different["student"].numpy(), different["teacher"].numpy())
    # Switching mode only changes the teacher's view.
    np.testing.assert_array_equal(different["student"].numpy(), same["student"].numpy())

    views = augment.make_view_fn("none", 8, "different")(image, seed)
    np.testing.assert_array_equal(views["student"], augment.center_crop(image, 8))
    np.testing.assert_array_equal(views["teacher"], views["student"])


def test_make_view_fn_rejects_unknown_kind_and_mode():
    with pytest.raises(ValueError, match="kind"):
        augment.make_view_fn("medium", 8, "same")
    with pytest.raises(ValueError, match="mode"):
        augment.make_view_fn("weak", 8, "both")


def test_to_float_image_conversions():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20
    out = augment.to_float_image(grey)
    assert out.dtype == tf.float32 and tuple(out.shape) == (3, 4, 3)
    for c in range(3):
        np.testing.assert_allclose(out[..., c].numpy(), grey[..., 0] / 255.0, atol=1e-7)

    rgba = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    np.testing.assert_allclose(augment.to_float_image(rgba).numpy(), rgba[..., :3] / 255.0)

    floats = _image(3, 4).astype(np.float64)
    np.testing.assert_allclose(augment.to_float_image(floats).numpy(), floats, atol=1e-7)

    # Channel count unknown until run time.
    convert = tf.function(
        augment.to_float_image, input_signature=[tf.TensorSpec([None, None, None], tf.uint8)]
    )
    np.testing.assert_allclose(convert(grey).numpy(), out.numpy())
    np.testing.assert_allclose(convert(rgba).numpy(), rgba[..., :3] / 255.0)

    with pytest.raises(ValueError, match="channels"):
        augment.to_float_image(np.zeros((3, 4, 5), np.uint8))


def test_multicrop_shapes_determinism_and_dataset_replay():
    fn = augment.make_multicrop_fn(sizes=(16, 8), counts=(2, 3), scales=((0.3, 1.0), (0.1, 0.3)))
    image = _image()
    out = fn(image, _seed(1))
    assert out["large"].shape == (2, 16, 16, 3) and out["small"].shape == (3, 8, 8, 3)
    for key in out:
        again = fn(image, _seed(1))[key].numpy()
        np.testing.assert_array_equal(out[key].numpy(), again)
        assert out[key].dtype == tf.float32
        assert 0.0 <= out[key].numpy().min() and out[key].numpy().max() <= 1.0
    # Every crop differs from the others (own sub-seed) and from another seed's crops.
    large = out["large"].numpy()
    assert np.abs(large[0] - large[1]).max() > 1e-3
    assert np.abs(fn(image, _seed(2))["large"].numpy() - large).max() > 1e-3
    # Inside Dataset.map the same seed gives the same crops.
    ds = tf.data.Dataset.from_tensors((image, _seed(1))).map(lambda im, s: fn(im, s))
    mapped = next(iter(ds))
    for key in out:
        np.testing.assert_allclose(mapped[key].numpy(), out[key].numpy(), atol=1e-6)


def test_multicrop_without_small_crops_and_bad_arguments():
    fn = augment.make_multicrop_fn(sizes=(16, 8), counts=(2, 0))
    assert set(fn(_image(), _seed(0))) == {"large"}
    with pytest.raises(ValueError, match="crop counts"):
        augment.make_multicrop_fn(counts=(0, 2))
    with pytest.raises(ValueError, match="two resolution"):
        augment.make_multicrop_fn(sizes=(16,), counts=(2,), scales=((0.1, 1.0),))


# ------------------------------------------------------------------------------------------
# Batched colour ops and staged views


@pytest.mark.parametrize(
    "strengths,p",
    [((0.4, 0.3, 0.5, 0.1), 0.8), ((0.0, 0.4, 0.0, 0.2), 0.5), ((0.8, 0.8, 0.8, 0.2), 1.0)],
)
def test_batched_colour_ops_equal_per_image_ops(strengths, p):
    """Every image of a batch gets exactly the bits the per-image op gives for its seed."""
    images = np.stack([_image(12, 12, seed=i) for i in range(10)])
    seeds = [augment._as_seed(_seed(i, 3)) for i in range(10)]
    recipe = augment.CropRecipe(
        size=(12, 12),
        jitter=strengths,
        jitter_p=p,
        grey_p=0.5,
        blur_sigma=(0.1, 2.0),
        blur_p=0.5,
    )
    params = [recipe.colour_params(s, s + 1, s + 2) for s in seeds]
    batch = {k: tf.stack([q[k] for q in params]) for k in params[0]}

    jittered = augment.batch_color_jitter(
        images,
        batch["jitter_apply"],
        batch["jitter_order"],
        batch["jitter_factors"],
        recipe.jitter_ops,
    )
    greyed = augment.batch_grayscale(images, batch["grey"])
    blurred = augment.batch_blur(images, batch["blur_kernel"])
    for i, s in enumerate(seeds):
        want = augment.color_jitter(images[i], s, *strengths, p=p)
        np.testing.assert_array_equal(jittered[i].numpy(), want.numpy())
        want = augment.random_grayscale(images[i], s + 1, p=0.5)
        np.testing.assert_array_equal(greyed[i].numpy(), want.numpy())
        want = augment.gaussian_blur(images[i], s + 2, sigma_range=(0.1, 2.0), p=0.5)
        np.testing.assert_array_equal(blurred[i].numpy(), want.numpy())
    # The draws were not all alike: some images were jittered / greyed / blurred, some not.
    for key in ("jitter_apply", "grey"):
        assert 0 < int(tf.reduce_sum(tf.cast(batch[key], tf.int32))) < 10 or p == 1.0


def test_staged_views_from_bytes_equal_decoded_views(tmp_path):
    """Cropping the undecoded file (JPEG crop window, PNG full decode) equals the decoded path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    array = (rng.uniform(size=(37, 53, 3)) * 255).astype(np.uint8)
    for fmt in ("JPEG", "PNG"):
        path = tmp_path / f"x.{fmt.lower()}"
        Image.fromarray(array).save(path, format=fmt)
        encoded = tf.io.read_file(str(path))
        decoded = tf.io.decode_image(encoded, channels=3)
        for views in (
            augment.make_view_fn("strong", 16, "same"),
            augment.make_view_fn("weak", 16, "different"),
            augment.make_multicrop_fn(sizes=(16, 8), counts=(2, 2)),
        ):
            for i in range(4):
                seed = _seed(i)
                a = views.per_example(seed, encoded=encoded)
                b = views.per_example(seed, image=decoded)
                assert sorted(a) == sorted(b)
                for key in a:
                    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)


def test_select_keeps_seeds():
    image, seed = _image(20, 24), _seed(5)
    both = augment.make_view_fn("strong", 8, "different")(image, seed)
    teacher = augment.make_view_fn("strong", 8, "different", keys=("teacher",))(image, seed)
    assert list(teacher) == ["teacher"]
    np.testing.assert_array_equal(teacher["teacher"].numpy(), both["teacher"].numpy())
    same = augment.make_view_fn("weak", 8, "same")
    only_teacher = same.select(("teacher",))(image, seed)
    np.testing.assert_array_equal(only_teacher["teacher"].numpy(), same(image, seed)["student"])


def _np_bilinear(image, out_h, out_w):
    """Bilinear interpolation with half-pixel centres and clamped edges, float64."""

    def axis(n_in, n_out):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    y0, y1, fy = axis(image.shape[0], out_h)
    x0, x1, fx = axis(image.shape[1], out_w)
    img = image.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize("in_hw", [(37, 50), (64, 64), (13, 61)])
def test_resize_crop_modes_interpolate_alike_when_enlarging(in_hw):
    """Enlarging, the antialiased kernel is plain bilinear; "auto" computes it with
    ResizeBilinear, so both equal a NumPy bilinear up to float rounding of the positions."""
    image = np.random.default_rng(1).random((*in_hw, 3)).astype(np.float32)
    want = _np_bilinear(image, 64, 72)
    got = {
        m: augment.resize_crop(tf.constant(image), (64, 72), m).numpy()
        for m in ("auto", "antialias")
    }
    for value in got.values():
        np.testing.assert_allclose(value, want, atol=3e-5)
    plain = tf.image.resize(image, (64, 72), method="bilinear", antialias=False).numpy()
    np.testing.assert_array_equal(got["auto"], plain)


def test_resize_crop_auto_antialiases_shrunk_crops_bit_for_bit():
    image = tf.constant(np.random.default_rng(2).random((90, 50, 3)).astype(np.float32))
    for size in [(32, 32), (64, 40), (100, 48)]:  # shrunk along at least one axis
        np.testing.assert_array_equal(
            augment.resize_crop(image, size, "auto").numpy(),
            augment.resize_crop(image, size, "antialias").numpy(),
        )
    with pytest.raises(ValueError, match="resize"):
        augment.resize_crop(image, (8, 8), "nearest")
    with pytest.raises(ValueError, match="resize"):
        augment.make_view_fn("weak", 16, "same", resize="fast")


def test_views_with_auto_resize_keep_the_boxes_flips_and_colours():
    """Only the interpolation's rounding changes: the same crops, flips and colour draws."""
    image = tf.constant(np.random.default_rng(3).integers(0, 256, (40, 56, 3)).astype(np.uint8))
    for maker in (
        lambda r: augment.make_view_fn("strong", 48, "different", resize=r),
        lambda r: augment.make_multicrop_fn((48, 24), (2, 3), resize=r),
    ):
        for s in range(4):
            seed = tf.constant([s, 7], tf.int64)
            auto, exact = maker("auto")(image, seed), maker("antialias")(image, seed)
            for key in exact:
                np.testing.assert_allclose(auto[key].numpy(), exact[key].numpy(), atol=1e-4)
