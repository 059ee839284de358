"""Dataset sources -> tf.data pipelines of examples, training views and evaluation batches.

Every *example* produced by :func:`load_split` is a dict::

    {"image": float32 [H, W, 3] in [0, 1],   # greyscale tiled to RGB, alpha dropped
     "label": int32 [],                       # -1 when the split has no labels
     "index": int64 []}                       # stable id 0..N-1 in a deterministic order

Sources (the ``--dataset`` flag):

* ``"digits"``: scikit-learn's bundled handwritten digits (1797 8x8 greyscale images, 10
  classes). It has no official split, so a stratified 80/20 split is drawn once with a fixed
  seed (:data:`DIGITS_SPLIT_SEED`): "train" has 1437 images, "test" (alias "val"/"validation")
  has 360. Images are scaled to [0, 1], bilinearly upsampled to 32x32 (or ``image_size_hint``)
  once, up front, and tiled to RGB; the whole split lives in memory.
* ``"folder:/path/to/root"`` or an existing directory: ``root/<split>/<class>/*.{jpg,jpeg,png,
  bmp,gif}``. Class ids are the sorted class-folder names of the *train* split (so every split
  agrees); the index is the position in (class, file name) order. Images may have any size.
* ``"tfds:NAME"``: a prepared TensorFlow Datasets dataset (e.g. ``tfds:cifar10``). Nothing is
  downloaded unless ``download=True``.

Undecodable images (folder source): the first time a split is loaded, every file gets a fast
check (a JPEG is entropy-decoded at 1/8 scale, which finds truncated and corrupt files as a
full decode would; other formats are decoded in full), in parallel. The result is cached per
split, in memory and on disk (``$KD_KERAS_CACHE_DIR``, default ``~/.cache/kd_keras``, keyed by
the file list with sizes and modification times), so reruns and resumed runs skip the check.
Bad files are reported once (count and first names), counted in ``SplitInfo.skipped_files``
and left out of the split, so ``num_examples`` counts only decodable images; a split with none
is an error. A file that breaks after the check is dropped by ``ignore_errors`` in the
pipeline rather than ending the run.

Decompression bombs (folder source): a small file can claim a huge image (a 1 MB PNG of
20000x20000 pixels decodes to 1.2 GB). Every file's header is read before it is decoded, in the
check and in the training pipeline; an image with more than ``max_image_pixels`` pixels
(default 64 Mpx, as PIL's guard) is never decoded and counts as an undecodable file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from kd_keras.data import holdout

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DIGITS_SPLIT_SEED = 0
# Largest image (width x height) a folder file may claim before it is decoded; a decoded
# 64 Mpx image is 192 MB as uint8 and 768 MB as float32.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DIGITS_TEST_FRACTION = 0.2
DIGITS_DEFAULT_SIZE = 32

# Name of the attribute through which load_split hands make_train_dataset the undecoded
# records of a split, so shuffling happens on file names / encoded bytes, not on decoded
# float images (a 10k-element buffer of decoded ImageNet images would need tens of GB).
# Read it through `lazy_source`.
_LAZY_ATTR = "_kd_keras_lazy_source"

# Constant folded into the per-epoch shuffle seed so that shuffle order and view seeds are
# drawn from unrelated streams even though both derive from the same user seed.
_SHUFFLE_SALT = 0x5EED5

_VAL_ALIASES = {"val": ("val", "validation"), "validation": ("validation", "val")}


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """Metadata of one loaded split.

    Attributes:
      num_examples: decodable examples of the split (files that failed the check made by
        ``verify=True``, the default, are not counted).
      num_classes: number of classes (0 when the split has no labels).
      class_names: class name per class id.
      source: the ``--dataset`` string the split came from.
      split: split name as requested.
      has_labels: False when every label is -1.
      skipped_files: image files removed up front because they could not be decoded.
      image_shape: (H, W, 3) when every image has the same size, else None.
      skipped_names: the first few of the skipped files (paths relative to the root).
    """

    num_examples: int
    num_classes: int
    class_names: tuple
    source: str
    split: str
    has_labels: bool
    skipped_files: int = 0
    image_shape: tuple | None = None
    skipped_names: tuple = ()
    listing: str = ""

    @property
    def listing_hash(self):
        """sha1 naming which example has which index: folders hash their (relative path,
        label) list, so files added, removed or renamed change it; other sources their name,
        split and size."""
        return self.listing or hashlib.sha1(
            f"{self.source}\0{self.split}\0{self.num_examples}".encode()
        ).hexdigest()


def _folder_listing(root, paths, labels):
    digest = hashlib.sha1()
    for path, label in zip(paths, labels, strict=True):
        digest.update(f"{os.path.relpath(path, root)}\0{label}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class LazySource:
    """Undecoded records plus the function that turns one into ``(ok, example)``.

    ``encoded`` (when set) maps a record to its file contents, string ``[]``, so that staged
    views (``kd_keras.data.augment.StagedViews``) can crop before decoding.
    """

    records: tf.data.Dataset
    decode: Callable
    encoded: Callable | None = None


def lazy_source(examples):
    """The `LazySource` behind a split from `load_split` (folders, TFDS), or None when its
    examples are decoded already (digits) or it is another dataset."""
    return getattr(examples, _LAZY_ATTR, None)


# ---------------------------------------------------------------------------------------------
# Shared image helpers


def _to_rgb_float(image):
    """Any decoded image [H, W, C] (uint8/uint16/float) -> float32 [H, W, 3] in [0, 1]."""
    image = tf.image.convert_image_dtype(image, tf.float32)
    channels = image.shape[-1]
    if channels == 1:
        image = tf.tile(image, [1, 1, 3])
    elif channels == 2:  # greyscale + alpha
        image = tf.tile(image[..., :1], [1, 1, 3])
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise ValueError(f"Images must have 1-4 channels, got shape {image.shape}.")
    return image


def _header_bytes(raw, count=32):
    """uint8 [count]: the first `count` bytes of an encoded file, zero-padded."""
    head = tf.strings.substr(raw, 0, count)
    padded = tf.strings.join([head, tf.constant(b"\0" * count)])
    return tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, count), tf.uint8), tf.int64)


def _uint(b, start, size, big_endian):
    """The unsigned integer of bytes b[start:start+size] (int64 [])."""
    order = range(size) if big_endian else range(size - 1, -1, -1)
    value = tf.constant(0, tf.int64)
    for i in order:
        value = value * 256 + b[start + i]
    return value


def header_pixels(raw):
    """int64 []: width x height a JPEG, PNG, GIF or BMP file claims in its header (0 for any
    other format), read without decoding the image. A JPEG header that cannot be parsed
    raises, like a corrupt file."""
    b = _header_bytes(raw)

    def starts_with(magic):
        return tf.reduce_all(tf.equal(b[: len(magic)], tf.constant(list(magic), tf.int64)))

    def jpeg():
        hw = tf.cast(tf.io.extract_jpeg_shape(raw), tf.int64)
        return hw[0] * hw[1]

    def bmp():
        # Signed 32-bit sizes (a negative height means top-down rows).
        w, h = _uint(b, 18, 4, False), _uint(b, 22, 4, False)
        w, h = tf.where(w >= 2**31, 2**32 - w, w), tf.where(h >= 2**31, 2**32 - h, h)
        return w * h

    return tf.case(
        [
            (tf.io.is_jpeg(raw), jpeg),
            (starts_with(b"\x89PNG\r\n\x1a\n"), lambda: _uint(b, 16, 4, True) * _uint(b, 20, 4, True)),
            (starts_with(b"GIF8"), lambda: _uint(b, 6, 2, False) * _uint(b, 8, 2, False)),
            (starts_with(b"BM"), bmp),
        ],
        default=lambda: tf.constant(0, tf.int64),
    )


def _checked_size(raw, max_pixels):
    """`raw` once its header claims at most `max_pixels` pixels; raises (InvalidArgument)
    otherwise, which the pipelines' `ignore_errors` turn into a skipped file."""
    check = tf.debugging.assert_less_equal(
        header_pixels(raw),
        tf.constant(max_pixels, tf.int64),
        message=f"image larger than max_image_pixels={max_pixels}",
    )
    with tf.control_dependencies([check]):
        return tf.identity(raw)


def _check_max_pixels(max_image_pixels):
    if not isinstance(max_image_pixels, int) or isinstance(max_image_pixels, bool) or (
        max_image_pixels < 1
    ):
        raise ValueError(f"--max_image_pixels must be a positive int, got {max_image_pixels!r}.")
    return max_image_pixels


def _decode_file(path, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Reads and decodes one image file -> float32 [H, W, 3]; raises on a bad file or one
    larger than `max_pixels`, before decoding it."""
    raw = _checked_size(tf.io.read_file(path), max_pixels)
    # expand_animations=False keeps GIFs 3-D (first frame), like every other format.
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.image.convert_image_dtype(image, tf.float32)


def _to_float(image):
    """uint8 decoded image (or crop) -> float32 in [0, 1], exactly as _decode_file converts."""
    return tf.image.convert_image_dtype(image, tf.float32)


def _check_decodes(path, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """int32 [3] shape of a file's image, raising when it is missing, claims more than
    `max_pixels` pixels (checked on the header, before decoding) or does not decode.

    JPEGs are decoded at 1/8 scale with the fast integer DCT: every entropy-coded segment is
    still read, so truncation and corrupt data fail just as a full decode would, for a fraction
    of the work. Other formats are decoded in full.
    """
    raw = _checked_size(tf.io.read_file(path), max_pixels)
    return tf.cond(
        tf.io.is_jpeg(raw),
        lambda: tf.shape(tf.io.decode_jpeg(raw, channels=3, ratio=8, dct_method="INTEGER_FAST")),
        lambda: tf.shape(tf.io.decode_image(raw, channels=3, expand_animations=False)),
    )


def verify_images(
    paths: Sequence[str],
    num_parallel_calls=tf.data.AUTOTUNE,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[str]:
    """Checks in parallel that every file decodes (see ``_check_decodes``).

    Args:
      paths: image file paths.
      num_parallel_calls: check parallelism.
      max_image_pixels: files whose header claims more pixels are bad (never decoded).

    Returns:
      The paths (as given, in input order) that are missing, too large or cannot be decoded.
    """
    max_pixels = _check_max_pixels(max_image_pixels)
    paths = [os.fspath(p) for p in paths]
    if not paths:
        return []
    good = (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(
            lambda p: (p, _check_decodes(p, max_pixels)),
            num_parallel_calls=num_parallel_calls,
            deterministic=False,
        )
        .ignore_errors()
        .map(lambda p, _: p)
    )
    decoded = {p.decode("utf-8") for p in good.as_numpy_iterator()}
    return [p for p in paths if p not in decoded]


# Files checked in this process: listing key -> bad paths.
_CHECKED = {}

# How many bad file names a report and SplitInfo.skipped_names carry.
_REPORTED_NAMES = 5


def _listing_key(paths, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """sha1 over (path, size, mtime) of every file and the pixel limit: changes whenever a
    file or the limit does."""
    digest = hashlib.sha1(f"max_pixels={max_pixels}\n".encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{p}\0{stamp}\n".encode())
    return digest.hexdigest()


def cache_root():
    """kd_keras' per-user cache folder: ``$KD_KERAS_CACHE_DIR``, default ``~/.cache/kd_keras``."""
    return os.environ.get("KD_KERAS_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kd_keras"
    )


def _check_cache_path(key):
    return os.path.join(cache_root(), "image_checks", f"{key}.json")


def _read_check_cache(key):
    try:
        with open(_check_cache_path(key)) as f:
            return list(json.load(f)["bad"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_check_cache(key, bad):
    """Best effort: a read-only home only means the check runs again next time."""
    path = _check_cache_path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        from kd_keras.artifacts import checkpointing

        checkpointing.write_json(path, {"bad": bad}, indent=None)
    except OSError as err:  # CheckpointWriteError included
        logging.info("kd_keras.data: image check not cached (%s)", err)


def undecodable_files(
    paths: Sequence[str], max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> list[str]:
    """``verify_images(paths)``, remembered per file list in memory and on disk."""
    key = _listing_key(paths, max_image_pixels)
    if key not in _CHECKED:
        bad = _read_check_cache(key)
        if bad is None:
            bad = verify_images(paths, max_image_pixels=max_image_pixels)
            _write_check_cache(key, bad)
        _CHECKED[key] = bad
    return list(_CHECKED[key])


# ---------------------------------------------------------------------------------------------
# digits


def _image_size(image_size_hint, default):
    if image_size_hint is None:
        return (default, default)
    if isinstance(image_size_hint, int):
        size = (image_size_hint, image_size_hint)
    else:
        size = tuple(int(s) for s in image_size_hint)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size_hint must be a positive int or (height, width), got {size}.")
    return size


def _digits_split_name(split):
    if split == "train":
        return "train"
    if split in ("test", "val", "validation"):
        return "test"
    raise ValueError(
        f"Unknown split {split!r} for --dataset digits; use 'train' or 'test' (alias 'val')."
    )


def digits_rows(split: str, seed: int = DIGITS_SPLIT_SEED) -> np.ndarray:
    """Rows of ``sklearn.datasets.load_digits()`` that form a digits split.

    Args:
      split: "train", or "test" / "val" / "validation".
      seed: split seed; the default is what :func:`load_split` uses.

    Returns:
      int64 [N] sorted row numbers; the example with index i is row ``digits_rows(split)[i]``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    which = _digits_split_name(split)
    target = load_digits().target
    train_rows, test_rows = train_test_split(
        np.arange(len(target)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=target,
        random_state=seed,
    )
    rows = train_rows if which == "train" else test_rows
    return np.sort(rows).astype(np.int64)


def _load_digits(source, split, image_size_hint):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    base, part, percent = holdout.parse_split(split)
    rows = digits_rows(base)
    rows = rows[holdout.select(part, bunch.target[rows], rows, percent)]
    size = _image_size(image_size_hint, DIGITS_DEFAULT_SIZE)
    # Pixel values are counts of set bits in 4x4 blocks, so 16 is the true maximum.
    small = (bunch.images[rows] / 16.0).astype(np.float32)[..., None]
    images = tf.image.resize(small, size, method="bilinear")
    images = tf.clip_by_value(tf.tile(images, [1, 1, 1, 3]), 0.0, 1.0)
    labels = bunch.target[rows].astype(np.int32)
    examples = tf.data.Dataset.from_tensor_slices(
        {
            "image": images,
            "label": labels,
            "index": np.arange(len(rows), dtype=np.int64),
        }
    )
    info = SplitInfo(
        num_examples=len(rows),
        num_classes=10,
        class_names=tuple(str(d) for d in range(10)),
        source=source,
        split=split,
        has_labels=True,
        skipped_files=0,
        image_shape=(*size, 3),
    )
    return examples, info


# ---------------------------------------------------------------------------------------------
# image folders


def _is(entry, kind):
    """entry.is_dir() / is_file(), False for an entry that cannot be followed (a symlink loop,
    a dangling link, no permission): such an entry is skipped, not a crash."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as err:
        logging.warning("kd_keras.data: skipping %s (%s)", entry.path, err.strerror or err)
        return False


def _usable_name(name):
    """Whether a file name can become a tf.string path (valid UTF-8)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as surrogates
        return False


def _subdirs(path):
    with os.scandir(path) as entries:
        return sorted(
            e.name
            for e in entries
            if not e.name.startswith(".") and _usable_name(e.name) and _is(e, "dir")
        )


def _printable_name(path):
    """A file name with its non-UTF-8 bytes shown as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _image_files(class_dir):
    """(sorted image file names directly inside class_dir, the count of non-image files, the
    printable paths of image files whose names are not UTF-8: skipped, logged and counted with
    the undecodable files)."""
    images, others, unusable = [], 0, []
    with os.scandir(class_dir) as entries:
        for e in entries:
            if e.name.startswith(".") or not _is(e, "file"):
                continue
            if not _usable_name(e.name):
                logging.warning(
                    "kd_keras.data: skipping %s: its name is not UTF-8", _printable_name(e.path)
                )
                unusable.append(_printable_name(e.path))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(e.name)
            else:
                others += 1
    return sorted(images), others, unusable


def _split_dir(root, split):
    """Folder holding the class folders of `split`, or None when it does not exist."""
    for name in _VAL_ALIASES.get(split, (split,)):
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    return None


def _folder_class_names(root, split, split_dir):
    """The class list every split uses: the train split's class folders."""
    if split == "train":
        train_dir = split_dir
    else:
        train_dir = _split_dir(root, "train") or split_dir
    names = _subdirs(train_dir)
    if not names:
        raise ValueError(
            f"Image-folder dataset: no class subfolders in {train_dir} "
            "(expected root/<split>/<class_name>/*.jpg)."
        )
    return names


def _list_folder(root, split):
    """(paths, labels, class_names, other_files, skipped names) of an image-folder split; the
    skipped names are files with image extensions whose names are not UTF-8."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--dataset image-folder root does not exist: {root}")
    split_dir = _split_dir(root, split)
    if split_dir is None:
        # A bare root/<class>/ layout is accepted as the train split only: a val split needs
        # its own folder, otherwise train images would silently be evaluated on.
        if split == "train" and _subdirs(root) and not _split_dir(root, "val"):
            split_dir = root
        else:
            raise FileNotFoundError(
                f"Image-folder dataset has no split folder {os.path.join(root, split)} "
                f"(expected {root}/<split>/<class_name>/*.jpg)."
            )
    class_names = _folder_class_names(root, split, split_dir)
    present = _subdirs(split_dir)
    if not present:
        raise ValueError(
            f"Image-folder dataset: no class subfolders in {split_dir} "
            "(expected root/<split>/<class_name>/*.jpg)."
        )
    known = set(class_names)
    unknown = [c for c in present if c not in known]
    if unknown:
        raise ValueError(
            f"Image-folder dataset: class folder {os.path.join(split_dir, unknown[0])} is not "
            f"a class of the train split ({len(class_names)} classes)."
        )
    label_of = {c: i for i, c in enumerate(class_names)}
    paths, labels, others, unusable = [], [], 0, []
    for name in present:
        class_dir = os.path.join(split_dir, name)
        files, n_other, bad_names = _image_files(class_dir)
        unusable += [os.path.relpath(p, root) for p in bad_names]
        if not files:
            raise ValueError(
                f"Image-folder dataset: class folder {class_dir} contains no images "
                f"({', '.join(IMAGE_EXTENSIONS)})."
            )
        others += n_other
        paths.extend(os.path.join(class_dir, f) for f in files)
        labels.extend([label_of[name]] * len(files))
    return paths, labels, class_names, others, unusable


def _folder_decoders(max_pixels):
    """(decode, encoded) record functions of a folder split: decode gives (ok, example),
    encoded the file's bytes (for crops cut before decoding); both refuse a file claiming
    more than `max_pixels` pixels before anything is decoded."""

    def decode(record):
        image = _decode_file(record["path"], max_pixels)
        return tf.constant(True), {
            "image": image,
            "label": record["label"],
            "index": record["index"],
        }

    def encoded(record):
        return _checked_size(tf.io.read_file(record["path"]), max_pixels)

    return decode, encoded


def _load_folder(source, root, split, verify, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    root = os.path.abspath(os.path.expanduser(root))
    base, part, percent = holdout.parse_split(split)
    paths, labels, class_names, others, unusable = _list_folder(root, base)
    if part is not None:
        names = [os.path.relpath(p, root) for p in paths]
        keep = holdout.select(part, labels, names, percent)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    if others:
        logging.info("kd_keras.data: ignored %d non-image files under %s", others, root)
    skipped = ()
    if verify:
        paths, labels, skipped = _drop_undecodable(root, split, paths, labels, max_image_pixels)
    skipped = (*unusable, *skipped)
    records = tf.data.Dataset.from_tensor_slices(
        {
            "path": tf.constant(paths, tf.string),
            "label": tf.constant(labels, tf.int32),
            "index": tf.range(len(paths), dtype=tf.int64),
        }
    )
    info = SplitInfo(
        num_examples=len(paths),
        num_classes=len(class_names),
        class_names=tuple(class_names),
        source=source,
        split=split,
        has_labels=True,
        skipped_files=len(skipped),
        image_shape=None,
        skipped_names=tuple(skipped[:_REPORTED_NAMES]),
        listing=_folder_listing(root, paths, labels),
    )
    return _lazy_examples(records, *_folder_decoders(max_image_pixels)), info


def _drop_undecodable(root, split, paths, labels, max_image_pixels):
    """(paths, labels, skipped relative names) without the files that do not decode."""
    bad = set(undecodable_files(paths, max_image_pixels))
    if not bad:
        return paths, labels, ()
    keep = [i for i, p in enumerate(paths) if p not in bad]
    skipped = [os.path.relpath(p, root) for p in paths if p in bad]
    if not keep:
        raise ValueError(
            f"Image-folder dataset {root}: none of the {len(paths)} images of split {split!r} "
            f"can be decoded (e.g. {skipped[0]})."
        )
    shown = ", ".join(skipped[:_REPORTED_NAMES]) + (
        ", ..." if len(skipped) > _REPORTED_NAMES else ""
    )
    logging.warning(
        "kd_keras.data: %d of %d images of split %r under %s cannot be decoded (or claim more "
        "than max_image_pixels) and are left out: %s",
        len(bad),
        len(paths),
        split,
        root,
        shown,
    )
    return [paths[i] for i in keep], [labels[i] for i in keep], tuple(skipped)


def _lazy_examples(records, decode, encoded=None):
    """Decoded examples dataset that also carries its undecoded records (see `lazy_source`).

    ``ignore_errors`` only matters for a file that broke after the split's check.
    """
    examples = (
        records.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .ignore_errors(log_warning=True)
        .filter(lambda ok, ex: ok)
        .map(lambda ok, ex: ex)
    )
    setattr(examples, _LAZY_ATTR, LazySource(records, decode, encoded))
    return examples


# ---------------------------------------------------------------------------------------------
# TFDS


def _load_tfds(source, name, split, data_dir, download):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(f"--dataset {source!r}: TFDS has no dataset named {name!r}.") from err
    if not builder.is_prepared():
        if not download:
            raise ValueError(
                f"--dataset {source!r}: TFDS data is not prepared in {builder.data_dir_root}; "
                "pass --download to download and prepare it, or prepare it there beforehand "
                f"(e.g. `tfds build {name} --data_dir {builder.data_dir_root}`)."
            )
        builder.download_and_prepare()
    splits = builder.info.splits
    tfds_split = split
    if split not in splits and split in _VAL_ALIASES:
        tfds_split = next((s for s in _VAL_ALIASES[split] if s in splits), split)
    try:
        num_examples = splits[tfds_split].num_examples
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"--dataset {source!r} has no split {split!r}; available: {sorted(splits.keys())}."
        ) from err

    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"--dataset {source!r} has no 'image' feature: {list(features)}.")
    image_feature = features["image"]
    label_feature = features["label"] if "label" in features else None
    has_labels = label_feature is not None
    class_names = tuple(getattr(label_feature, "names", ()) or ()) if has_labels else ()
    num_classes = int(getattr(label_feature, "num_classes", 0) or 0) if has_labels else 0

    # Keep images encoded until after the training shuffle (see `lazy_source`).
    lazy = isinstance(image_feature, tfds.features.Image)
    decoders = {"image": tfds.decode.SkipDecoding()} if lazy else None
    raw = builder.as_dataset(split=tfds_split, shuffle_files=False, decoders=decoders)

    def _record(index, ex):
        label = tf.cast(ex["label"], tf.int32) if has_labels else tf.constant(-1, tf.int32)
        return {"image": ex["image"], "label": label, "index": index}

    records = raw.enumerate().map(_record)

    def _decode(record):
        image = image_feature.decode_example(record["image"]) if lazy else record["image"]
        example = {
            "image": _to_rgb_float(image),
            "label": record["label"],
            "index": record["index"],
        }
        return tf.constant(True), example

    shape = getattr(image_feature, "shape", None)
    image_shape = None
    if shape is not None and len(shape) == 3 and None not in shape[:2]:
        image_shape = (int(shape[0]), int(shape[1]), 3)
    info = SplitInfo(
        num_examples=int(num_examples),
        num_classes=num_classes,
        class_names=class_names,
        source=source,
        split=split,
        has_labels=has_labels,
        skipped_files=0,
        image_shape=image_shape,
    )
    return _lazy_examples(records, _decode), info


# ---------------------------------------------------------------------------------------------
# Public entry points


def load_split(
    source: str,
    split: str,
    data_dir: str | None = None,
    image_size_hint=None,
    download: bool = False,
    verify: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
):
    """Loads one split of a dataset as a tf.data pipeline of examples.

    Args:
      source: the ``--dataset`` value: "digits", "folder:/path", an existing directory, or
        "tfds:NAME" (NAME may carry a config/version, e.g. "tfds:cifar10:3.0.2").
      split: split name, e.g. "train", "val", "test". "val" and "validation" are aliases.
        Digits and image folders also take `<split>@holdout<P>` / `<split>@rest<P>`: a
        per-class P % of the split and the rest (kd_keras.data.holdout).
      data_dir: TFDS data directory (TFDS's default when None); unused by other sources.
      image_size_hint: int or (height, width) for sources stored at a tiny size and
        upsampled up front (digits: default 32); ignored by the others.
      download: TFDS only: download and prepare missing data (otherwise a ValueError).
      verify: image folders only: check once that every file decodes (fast; the result is
        cached per split, see the module docstring), leave the bad ones out and report them
        in ``SplitInfo.skipped_files`` / ``skipped_names``. False skips the check; a bad file
        is then dropped by ``ignore_errors`` when read.
      max_image_pixels: image folders only: a file whose header claims more pixels is never
        decoded; it counts as undecodable (the ``--max_image_pixels`` flag).
    Returns:
      ``(examples, info)``: a ``tf.data.Dataset`` of example dicts (see module docstring) in
      index order, and a :class:`SplitInfo`.

    Raises:
      ValueError: unknown source form, bad split, empty class folder, unprepared TFDS data.
      FileNotFoundError: missing folder root or split folder.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"--dataset must be a non-empty string, got {source!r}.")
    if source == "digits":
        return _load_digits(source, split, image_size_hint)
    if source.startswith("tfds:"):
        name = source[len("tfds:") :]
        if not name:
            raise ValueError("--dataset 'tfds:' needs a dataset name, e.g. 'tfds:cifar10'.")
        if holdout.parse_split(split)[1] is not None:
            raise ValueError(
                f"split {split!r}: held-out parts are for digits and image folders; with TFDS "
                "use its own slicing, e.g. train[:90%] and train[90%:]."
            )
        return _load_tfds(source, name, split, data_dir, download)
    if source.startswith("folder:"):
        root = source[len("folder:") :]
        if not root:
            raise ValueError("--dataset 'folder:' needs a path, e.g. 'folder:/data/imagenette'.")
        return _load_folder(source, root, split, verify, _check_max_pixels(max_image_pixels))
    if os.path.isdir(os.path.expanduser(source)):
        return _load_folder(source, source, split, verify, _check_max_pixels(max_image_pixels))
    if os.sep in source or source.startswith("~"):
        raise FileNotFoundError(f"--dataset image-folder root does not exist: {source}")
    raise ValueError(
        f"Unknown --dataset {source!r}: use 'digits', 'folder:/path/to/root' (or an existing "
        "directory), or 'tfds:NAME'."
    )


def view_seed(seed, index, epoch, epoch_seed: bool = True):
    """The seed pair a training view of example `index` gets in `epoch`.

    Args:
      seed: int / int64 [] base seed of the run.
      index: int / int64 [] example index.
      epoch: int / int64 [] epoch number (ignored when ``epoch_seed`` is False).
      epoch_seed: whether views change from epoch to epoch.

    Returns:
      int64 [2] seed for ``tf.random.stateless_*`` ops: ``[seed, index]``, or with
      ``epoch_seed`` ``[hash(seed, index), epoch]`` (that is what ``stateless_fold_in``
      returns). The Philox algorithm is named so the value does not depend on the device.
    """
    base = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])
    if not epoch_seed:
        return base
    return tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64), alg="philox")


def _check_positive(name, value):
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def make_train_dataset(
    examples: tf.data.Dataset,
    view_fn: Callable,
    batch_size: int,
    seed: int,
    shuffle_buffer: int = 10000,
    drop_remainder: bool = True,
    deterministic: bool | None = None,
    cache_decoded: bool = False,
    epoch_seed: bool = True,
    num_epochs: int | None = None,
    start_epoch: int = 0,
    skip_batches: int = 0,
    view_epochs: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    shard_batch_size: int | None = None,
):
    """Shuffled, augmented, batched training pipeline.

    Epochs are explicit: ``Dataset.range(start_epoch, ...)`` is flat-mapped to one pass over
    the examples per epoch number ``e``, shuffled with a seed derived from ``(seed, e)``, and
    each example's views get ``view_seed(seed, index, e)``. A view therefore depends only on
    (seed, index, epoch), not on shuffle order, parallelism or where iteration started, so it
    can be replayed. Batches never straddle two epochs.

    Args:
      examples: dataset of example dicts from :func:`load_split`. If it is exactly what
        load_split returned, shuffling happens before decoding (on file names / bytes).
      view_fn: ``view_fn(image, seed_pair) -> dict`` of tensors; ``image`` is float32
        [H, W, 3] and ``seed_pair`` int64 [2]. All views of an image come from this one call.
        Keys "label" and "index" are reserved. A ``kd_keras.data.augment.StagedViews`` (what
        ``make_view_fn`` / ``make_multicrop_fn`` build) runs faster, bit for bit the same:
        its crops are cut from the undecoded file (JPEG: only the crop window is decoded)
        and its colour ops run on whole batches.
      batch_size: examples per batch (global batch size).
      seed: base seed of shuffling and views.
      shuffle_buffer: shuffle buffer size; 0 disables shuffling.
      drop_remainder: drop each epoch's last partial batch (keeps replica batches equal).
      deterministic: passed to the parallel maps; None keeps tf.data's default (ordered).
      cache_decoded: keep decoded images in memory after the first epoch (small datasets).
      epoch_seed: when False, an example gets the same views every epoch.
      num_epochs: epochs to produce; None repeats forever (pass ``steps_per_epoch`` to fit,
        e.g. from :func:`steps_per_epoch`).
      start_epoch: number of the first epoch, so a resumed run replays the right seeds.
      skip_batches: batches of the first epoch already consumed by an interrupted run; they
        are skipped on the shuffled records, before decoding, so resuming mid-epoch is cheap
        and continues with exactly the batches an uninterrupted run would have seen.
      view_epochs: when set (E), epoch ``e`` draws its views with the seeds of epoch
        ``e mod E`` (the shuffle order still changes every epoch) and every element carries
        ``"view_epoch"`` int64 = ``e mod E``: the key of a teacher-feature cache holding E
        epochs of views (see ``kd_keras.teacher_cache``).
      num_shards, shard_index: multi-worker input: this pipeline keeps only its share of every
        global batch of ``batch_size`` records (records ``shard_index``, ``shard_index +
        num_shards``, ... of it), so in each step the shards are disjoint and together are
        exactly the global batch one pipeline would produce; every shard yields the same
        number of batches per epoch. Sharding happens on the shuffled records, before
        decoding and augmentation.
      shard_batch_size: batch size of the output when sharded (default ``batch_size //
        num_shards``); a worker with R local replicas passes the per-replica size
        ``batch_size // (num_shards * R)`` and the strategy hands R consecutive batches to
        its replicas.

    Returns:
      Dataset of dicts: view_fn's keys with a leading batch dimension, plus "label" int32
      [B] and "index" int64 [B]; prefetched.
    """
    _check_train_arguments(
        batch_size, shuffle_buffer, num_epochs, view_epochs, num_shards, shard_index
    )
    lazy = lazy_source(examples)
    if cache_decoded:
        source = examples.cache()
        lazy = None
    else:
        source = lazy.records if lazy is not None else examples
    one_epoch = _EpochPipeline(
        source=source,
        lazy=lazy,
        view_fn=view_fn,
        seed=seed,
        batch_size=batch_size,
        out_batch_size=(shard_batch_size or batch_size // num_shards)
        if num_shards > 1
        else (batch_size),
        shuffle_buffer=shuffle_buffer,
        drop_remainder=drop_remainder,
        deterministic=deterministic,
        epoch_seed=epoch_seed,
        start_epoch=start_epoch,
        skip_batches=skip_batches,
        view_epochs=view_epochs,
        num_shards=num_shards,
        shard_index=shard_index,
    )
    if num_epochs is None:
        epochs = tf.data.Dataset.counter(start_epoch, dtype=tf.int64)
    else:
        epochs = tf.data.Dataset.range(start_epoch, start_epoch + num_epochs, dtype=tf.int64)
    return epochs.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def _check_train_arguments(batch_size, shuffle_buffer, num_epochs, view_epochs, num_shards, index):
    _check_positive("--batch_size", batch_size)
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}.")
    if num_epochs is not None:
        _check_positive("num_epochs", num_epochs)
    if view_epochs is not None:
        _check_positive("view_epochs", view_epochs)
    _check_positive("num_shards", num_shards)
    if not 0 <= index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {index}.")
    if batch_size % num_shards:
        raise ValueError(f"--batch_size {batch_size} is not divisible by {num_shards} workers.")


@dataclasses.dataclass(frozen=True)
class _EpochPipeline:
    """One epoch of `make_train_dataset` (its arguments, checked): called with the epoch
    number (int64 scalar tensor), returns that epoch's batches."""

    source: tf.data.Dataset  # records (lazy) or decoded examples
    lazy: LazySource | None
    view_fn: Callable
    seed: int
    batch_size: int
    out_batch_size: int
    shuffle_buffer: int
    drop_remainder: bool
    deterministic: bool | None
    epoch_seed: bool
    start_epoch: int
    skip_batches: int
    view_epochs: int | None
    num_shards: int
    shard_index: int

    @property
    def staged(self):
        return hasattr(self.view_fn, "per_example") and hasattr(self.view_fn, "per_batch")

    @property
    def from_bytes(self):
        return self.staged and self.lazy is not None and self.lazy.encoded is not None

    def views(self, example, epoch):
        """One example's views; staged views take the file bytes (crop before decoding)."""
        extra = {}
        if self.view_epochs is not None:
            epoch = epoch % self.view_epochs
            extra["view_epoch"] = epoch
        pair = view_seed(self.seed, example["index"], epoch, self.epoch_seed)
        if self.from_bytes:
            views = self.view_fn.per_example(
                pair, encoded=self.lazy.encoded(example), to_float=_to_float
            )
        elif self.staged:
            views = self.view_fn.per_example(pair, image=example["image"])
        else:
            views = self.view_fn(example["image"], pair)
        if not isinstance(views, Mapping):
            raise ValueError(f"view_fn must return a dict of tensors, got {type(views).__name__}.")
        clash = {"label", "index", "view_epoch"} & set(views)
        if clash:
            raise ValueError(f"view_fn output uses reserved keys {sorted(clash)}.")
        return {**views, "label": example["label"], "index": example["index"], **extra}

    def shuffled(self, ds, epoch):
        """`ds` in the order of `epoch` (seeded by (seed, epoch) alone)."""
        # fold_in returns [hash(seed pair), epoch]: its first entry ignores the epoch,
        # so hash the whole pair down to one int64 for shuffle's scalar seed.
        shuffle_seed = tf.random.stateless_uniform(
            [],
            seed=view_seed(self.seed, _SHUFFLE_SALT, epoch),
            minval=None,
            maxval=None,
            dtype=tf.int64,
            alg="philox",
        )
        # TF's get_seed compares (global seed, op seed) with (0, 0); when the user's global
        # seed is 0 (tf.random.set_seed(0), keras.utils.set_random_seed(0)) that compares
        # our tensor seed as a Python bool and fails. Our seed fully determines the order,
        # so drop the global seed from this function's graph.
        if not tf.executing_eagerly():
            tf.compat.v1.get_default_graph().seed = None
        return ds.shuffle(self.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

    def records(self, epoch):
        """This epoch's (undecoded) records: shuffled, resumed, this shard's share."""
        ds = self.source
        if self.shuffle_buffer > 0:
            ds = self.shuffled(ds, epoch)
        if self.skip_batches:
            skip = tf.where(
                epoch == self.start_epoch,
                tf.constant(self.skip_batches * self.batch_size, tf.int64),
                tf.constant(0, tf.int64),
            )
            ds = ds.skip(skip)
        if self.num_shards > 1:
            # Cut the epoch into whole global batches first, then keep this shard's records of
            # each: shards never overlap and all see the same number of batches.
            k, n = self.shard_index, self.num_shards
            ds = (
                ds.batch(self.batch_size, drop_remainder=True)
                .map(lambda recs: {key: v[k::n] for key, v in recs.items()})
                .unbatch()
            )
        return ds

    def __call__(self, epoch):
        ds = self.records(epoch)
        parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=self.deterministic)
        if self.lazy is not None and not self.from_bytes:
            ds = (
                ds.map(self.lazy.decode, **parallel)
                .filter(lambda ok, ex: ok)
                .map(lambda ok, ex: ex)
            )
        ds = ds.map(lambda ex: self.views(ex, epoch), **parallel)
        # Only a file that broke after the split's check fails here; drop it, don't crash.
        ds = ds.ignore_errors(log_warning=True).batch(
            self.out_batch_size, drop_remainder=self.drop_remainder
        )
        if self.staged:
            # Colour ops on whole batches of small crops (StagedViews).
            ds = ds.map(self.view_fn.per_batch, **parallel)
        return ds


def make_eval_dataset(examples: tf.data.Dataset, transform_fn: Callable | None, batch_size: int):
    """Ordered evaluation pipeline that keeps the last partial batch.

    Args:
      examples: dataset of example dicts from :func:`load_split`.
      transform_fn: ``transform_fn(image float32 [H, W, 3]) -> image`` (e.g. resize + centre
        crop); None keeps images as they are (they must then share one size).
      batch_size: examples per batch.

    Returns:
      Dataset of {"image": [B, ...] float32, "label": int32 [B], "index": int64 [B]} in index
      order; the last batch may be smaller.
    """
    _check_positive("--batch_size", batch_size)

    def _transform(ex):
        image = ex["image"] if transform_fn is None else transform_fn(ex["image"])
        return {"image": image, "label": ex["label"], "index": ex["index"]}

    ds = examples.map(_transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches one epoch of :func:`make_train_dataset` yields (if no file is dropped)."""
    _check_positive("--batch_size", batch_size)
    full, rest = divmod(int(num_examples), batch_size)
    return full + (1 if rest and not drop_remainder else 0)


def check_batch_size(global_batch_size: int, num_replicas: int, num_examples: int) -> int:
    """Validates the global batch size against replicas and split size.

    Returns:
      The per-replica batch size.

    Raises:
      ValueError: non-positive sizes, a batch size not divisible by the replica count, or a
        train split smaller than one batch.
    """
    _check_positive("--batch_size", global_batch_size)
    _check_positive("num_replicas", num_replicas)
    if global_batch_size % num_replicas:
        raise ValueError(
            f"--batch_size {global_batch_size} is not divisible by the {num_replicas} replicas; "
            f"use a multiple of {num_replicas}."
        )
    if num_examples < global_batch_size:
        raise ValueError(
            f"The train split has {num_examples} examples, fewer than one batch of "
            f"--batch_size {global_batch_size}."
        )
    return global_batch_size // num_replicas


def default_eval_split(dataset):
    """The evaluation split of `dataset` when none is named: "test" for the embedded digits and
    TFDS datasets (which name it so), "val" for image folders (ImageNet's layout)."""
    if dataset.startswith("tfds:") or dataset == "digits":
        return "test"
    return "val"
