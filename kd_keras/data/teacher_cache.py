"""Cached teacher features (SimReg supplement B.1): run the teacher once, train many epochs.

A cache holds a teacher's features of E augmentation epochs of a dataset's training split. Views
are replayable: the view of example ``i`` in epoch ``e`` is ``view_fn(image_i,
data.view_seed(seed, i, e))`` with stateless random ops, so a training run with the same
dataset, augmentation and seed regenerates, at training epoch ``t``, exactly the view the
teacher saw in cache epoch ``t mod E`` and reads the teacher's features of it instead of running
the teacher (``data.make_train_dataset(..., view_epochs=E)``).

Layout of one cache directory (one teacher)::

    manifest.json                      what was cached (below); written last, so a directory
                                       without it is an interrupted write
    features/e0000_s00000.npy          float16 [rows, d]: epoch 0, examples 0 .. shard_size-1
    features/e0000_s00001.npy          ... row r of shard s is example s * shard_size + r

The ``.npy`` shards are opened memory-mapped, so a cache larger than RAM is read through the
page cache one batch of rows at a time.

The manifest names the dataset (source, split, size and a fingerprint of a sample of its
pixels), the teacher (its spec and its features on two fixed probe images, so a different
weights file under the same name is caught), the augmentation (kind, mode, size, crop scale,
seed, and a small summary of one replayed probe view, so a change of the augmentation code is
caught too) and the number of epochs. `check_manifest` compares a cache with a training run and
raises ValueError listing every difference.
"""

import datetime
import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from kd_keras.artifacts import checkpointing

MANIFEST = "manifest.json"
FEATURES_DIR = "features"
FORMAT = "kd_keras.teacher_cache"
VERSION = 1
STORAGE_DTYPE = np.float16
FLOAT16_MAX = float(np.finfo(np.float16).max)

# Sizes of the fixed probes recorded in the manifest.
_PROBE_IMAGES = 2
_PROBE_SOURCE_SIZE = 48
_PROBE_SUMMARY = 4
_FINGERPRINT_SAMPLES = 64
# Probe comparisons allow for float differences between machines / thread counts.
_PROBE_RTOL = 1e-3


def shard_path(cache_dir, epoch, shard):
    """Path of the features of `epoch`, examples [shard * shard_size, (shard + 1) * shard_size)."""
    return os.path.join(cache_dir, FEATURES_DIR, f"e{epoch:04d}_s{shard:05d}.npy")


def _sha256(parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def dataset_fingerprint(examples, info):
    """A hash naming a dataset split's identity and content.

    It covers the source string, split, number of examples, class names and the pixels of up to
    64 examples at evenly spaced indices (quantised to 8 bits, so JPEG decoders that agree to
    the byte give the same hash). Image folders and TFDS splits are decoded only for the
    sampled examples.

    Args:
      examples: the dataset returned by `data.load_split`.
      info: its `data.SplitInfo`.
    Returns:
      str, hex sha256.
    """
    from kd_keras.data import sources as data

    n = info.num_examples
    stride = max(1, n // _FINGERPRINT_SAMPLES)
    lazy = data.lazy_source(examples)
    if lazy is not None:
        sample = (
            lazy.records.filter(lambda r: r["index"] % stride == 0)
            .take(_FINGERPRINT_SAMPLES)
            .map(lazy.decode)
            .filter(lambda ok, ex: ok)
            .map(lambda ok, ex: ex)
        )
    else:
        sample = examples.filter(lambda ex: ex["index"] % stride == 0).take(_FINGERPRINT_SAMPLES)
    parts = [info.source, info.split, n, json.dumps(list(info.class_names))]
    for ex in sample.as_numpy_iterator():
        pixels = np.round(np.clip(ex["image"], 0.0, 1.0) * 255.0).astype(np.uint8)
        parts += [int(ex["index"]), int(ex["label"]), pixels.shape, pixels.tobytes()]
    return _sha256(parts)


def _probe_images(size):
    """float32 [2, size, size, 3] in [0, 1], the same on every machine."""
    rng = np.random.default_rng(20240611)
    return rng.uniform(size=(_PROBE_IMAGES, size, size, 3)).astype(np.float32)


def teacher_identity(teacher, image_size):
    """The manifest's description of a `teachers.Teacher`.

    Returns:
      dict: the spec fields, feature_dim and `probe_features` (float list of shape [2, d]: the teacher's
      features of two fixed random images of side `image_size`).
    """
    spec = teacher.spec
    probe = np.asarray(teacher(tf.constant(_probe_images(image_size))), np.float32)
    return {
        "name": teacher.name,
        "kind": spec.kind,
        "path": spec.path,
        "norm": spec.norm,
        "size": spec.size,
        "pool": spec.pool,
        "output": spec.output,
        "app": spec.app,
        "feature_dim": int(teacher.feature_dim),
        "probe_features": probe.tolist(),
    }


def view_identity(data_cfg, seed, view_fn_key="teacher"):
    """The manifest's description of the replayed views.

    Args:
      data_cfg: `config.DataConfig` (augment, aug_mode, image_size, crop_scale_min are used).
      seed: the run's seed.
      view_fn_key: which view the teacher sees ("teacher"; equal to "student" in mode "same").
    Returns:
      dict of the augmentation parameters, the seed scheme and `probe`: a 4x4 area-resized
      summary (float list of shape [4, 4, 3]) of the view of a fixed image under seed
      `data.view_seed(seed, 0, 0)`, so a change of the augmentation ops is noticed.
    """
    from kd_keras.data import augment
    from kd_keras.data import sources as data

    view_fn = augment.view_fn_for(data_cfg)
    image = tf.constant(_probe_images(_PROBE_SOURCE_SIZE)[0])
    view = view_fn(image, data.view_seed(seed, 0, 0))[view_fn_key]
    summary = tf.image.resize(view[None], [_PROBE_SUMMARY, _PROBE_SUMMARY], method="area")[0]
    return {
        "augment": data_cfg.augment,
        "aug_mode": data_cfg.aug_mode,
        "image_size": int(data_cfg.image_size),
        "crop_scale_min": float(data_cfg.crop_scale_min),
        "view_resize": data_cfg.view_resize,
        "strong_blur": data_cfg.strong_blur,
        "seed": int(seed),
        "seed_scheme": "stateless_fold_in([seed, index], epoch), philox",
        "probe": np.asarray(summary, np.float32).round(6).tolist(),
    }


def dataset_identity(examples, info):
    """The manifest's description of the training split."""
    return {
        "source": info.source,
        "split": info.split,
        "num_examples": int(info.num_examples),
        "fingerprint": dataset_fingerprint(examples, info),
    }


def read_manifest(cache_dir):
    """The parsed manifest of a complete cache.

    Raises:
      FileNotFoundError: no manifest (not a cache, or an interrupted write).
      ValueError: not a kd_keras teacher cache or an unknown version.
    """
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--teacher_cache: {path} does not exist (not a teacher cache, or its writing was "
            "interrupted; run `python -m kd_keras.cache_teacher` again)."
        )
    with open(path) as f:
        try:
            manifest = json.load(f)
        except ValueError as err:
            raise ValueError(f"--teacher_cache: {path} is not valid JSON ({err}).") from err
    if not isinstance(manifest, dict) or (
        manifest.get("format") != FORMAT or manifest.get("version") != VERSION
    ):
        raise ValueError(
            f"--teacher_cache: {path} is not a {FORMAT} manifest of version {VERSION}."
        )
    _check_manifest_fields(manifest, path)
    return manifest


# (section, key) of the sizes every reader relies on: each must be a positive int.
_SIZES = (
    ("teacher", "feature_dim"),
    ("views", "epochs"),
    ("dataset", "num_examples"),
    ("storage", "shard_size"),
)


def _check_manifest_fields(manifest, path):
    """ValueError naming the file and the field, for a hand-edited or damaged manifest."""
    for section in ("teacher", "dataset", "views", "storage"):
        if not isinstance(manifest.get(section), dict):
            raise ValueError(f"--teacher_cache: {path}: section {section!r} missing or not an object.")
    if not isinstance(manifest["teacher"].get("name"), str):
        raise ValueError(f"--teacher_cache: {path}: teacher.name missing or not a string.")
    for section, key in _SIZES:
        value = manifest[section].get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"--teacher_cache: {path}: {section}.{key} must be a positive integer, got "
                f"{value!r}."
            )


def expand_cache_dirs(paths):
    """Cache directories from --teacher_cache values.

    A value that holds a manifest is a cache; one that does not but whose sub-directories do
    (what `cache_teacher` writes for several teachers) stands for all of them.

    Returns:
      list of str.
    Raises:
      FileNotFoundError: a value is neither.
    """
    out = []
    for path in paths:
        if os.path.isfile(os.path.join(path, MANIFEST)):
            out.append(path)
            continue
        subdirs = []
        if os.path.isdir(path):
            subdirs = sorted(
                os.path.join(path, d)
                for d in os.listdir(path)
                if os.path.isfile(os.path.join(path, d, MANIFEST))
            )
        if not subdirs:
            read_manifest(path)  # raises the explanatory FileNotFoundError
        out.extend(subdirs)
    return out


def _close(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return False
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)), 1e-6)
    return bool(np.all(np.abs(a - b) <= _PROBE_RTOL * scale))


def manifest_differences(manifest, expected):
    """Human-readable differences between a cache's manifest and what a run expects.

    Args:
      manifest: a parsed manifest.
      expected: dict with "teacher", "dataset", "views" sections as built by
        `teacher_identity`, `dataset_identity` and `view_identity`.
    Returns:
      list of str, empty when the cache fits the run. The teacher's path is not compared (a
      moved file is fine); its probe features are.
    """
    diffs = []
    checks = {
        "teacher": ("name", "kind", "norm", "size", "pool", "output", "app", "feature_dim"),
        "dataset": ("source", "split", "num_examples", "fingerprint"),
        "views": (
            "augment",
            "aug_mode",
            "image_size",
            "crop_scale_min",
            "view_resize",
            "strong_blur",
            "seed",
            "seed_scheme",
        ),
    }
    for section, keys in checks.items():
        have = manifest.get(section, {})
        if section == "views":  # caches written before --view_resize / --strong_blur
            have = {"view_resize": "antialias", "strong_blur": "paper", **have}
        want = expected[section]
        for key in keys:
            if have.get(key) != want.get(key):
                diffs.append(f"{section}.{key}: cache {have.get(key)!r}, run {want.get(key)!r}")
    if not _close(manifest["teacher"].get("probe_features"), expected["teacher"]["probe_features"]):
        diffs.append("teacher.probe_features: the teacher computes different features (weights?)")
    if not _close(manifest["views"].get("probe"), expected["views"]["probe"]):
        diffs.append("views.probe: the replayed augmentation differs (augmentation code changed?)")
    return diffs


def check_manifest(cache_dir, manifest, expected):
    """Raises ValueError naming --teacher_cache and every mismatch, if there is one."""
    diffs = manifest_differences(manifest, expected)
    if diffs:
        raise ValueError(
            f"--teacher_cache {cache_dir} does not match this run: " + "; ".join(diffs) + "."
        )


def _check_shard(path, shape, cache_dir):
    """Checks a shard's .npy header and file size against the manifest's `shape` [rows, d].

    Done when the cache is opened, so a truncated or foreign shard is one line naming it
    rather than a failure inside tf.data's py_function mid-training.

    Raises:
      FileNotFoundError: the shard is missing.
      ValueError: its header or size does not match the manifest.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--teacher_cache {cache_dir}: shard {path} is missing.")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0
            )
            header = read(f)
            data_start = f.tell()
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--teacher_cache {cache_dir}: shard {path} is not a .npy file ({err})."
        ) from err
    have_shape, fortran, dtype = header
    if tuple(have_shape) != tuple(shape) or dtype != np.dtype(STORAGE_DTYPE) or fortran:
        raise ValueError(
            f"--teacher_cache {cache_dir}: shard {path} holds {dtype} {list(have_shape)}, the "
            f"manifest says {np.dtype(STORAGE_DTYPE)} {list(shape)}."
        )
    expected = data_start + int(np.prod(shape)) * dtype.itemsize
    size = os.path.getsize(path)
    if size != expected:
        raise ValueError(
            f"--teacher_cache {cache_dir}: shard {path} has {size} bytes, {expected} expected "
            "(truncated or still being written?); write the cache again."
        )


class TeacherCache:
    """Read access to one cache directory.

    Attributes:
      path: the cache directory.
      manifest: its parsed manifest.json.
      name: the teacher's name.
      feature_dim: d.
      epochs: E, the augmentation epochs cached.
      num_examples: N.
      shard_size: rows per shard file.
    """

    def __init__(self, path):
        self.path = path
        self.manifest = read_manifest(path)
        self.name = self.manifest["teacher"]["name"]
        self.feature_dim = int(self.manifest["teacher"]["feature_dim"])
        self.epochs = int(self.manifest["views"]["epochs"])
        self.num_examples = int(self.manifest["dataset"]["num_examples"])
        self.shard_size = int(self.manifest["storage"]["shard_size"])
        self._shards = {}
        num_shards = -(-self.num_examples // self.shard_size)
        for e in range(self.epochs):
            for s in range(num_shards):
                rows = min(self.shard_size, self.num_examples - s * self.shard_size)
                _check_shard(shard_path(path, e, s), (rows, self.feature_dim), path)

    def _shard(self, epoch, shard):
        key = (epoch, shard)
        if key not in self._shards:
            self._shards[key] = np.load(shard_path(self.path, epoch, shard), mmap_mode="r")
        return self._shards[key]

    def lookup(self, view_epochs, indices):
        """Cached features of examples `indices` in cache epochs `view_epochs`.

        Args:
          view_epochs: int [B] in [0, E) (or a scalar for all).
          indices: int [B] example indices in [0, N).
        Returns:
          float16 [B, d].
        """
        indices = np.asarray(indices, np.int64).reshape(-1)
        view_epochs = np.broadcast_to(np.asarray(view_epochs, np.int64), indices.shape)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            raise ValueError(f"teacher cache {self.path}: example index out of range.")
        if view_epochs.size and (view_epochs.min() < 0 or view_epochs.max() >= self.epochs):
            raise ValueError(f"teacher cache {self.path}: epoch out of range [0, {self.epochs}).")
        out = np.empty((indices.size, self.feature_dim), STORAGE_DTYPE)
        shards = indices // self.shard_size
        rows = indices % self.shard_size
        for e, s in set(zip(view_epochs.tolist(), shards.tolist(), strict=True)):
            sel = (view_epochs == e) & (shards == s)
            out[sel] = self._shard(e, s)[rows[sel]]
        return out


def attach_features(dataset, caches):
    """Adds the cached features of each batch to a batched training dataset.

    Args:
      dataset: batches from `data.make_train_dataset(..., view_epochs=E)` (with "index" int64
        [B] and "view_epoch" int64 [B]); E must equal every cache's epochs.
      caches: sequence of `TeacherCache`.
    Returns:
      The dataset with "teacher_features": {teacher name: float16 [B, d]} added to each batch.
    """

    def _add(batch):
        features = {}
        for cache in caches:
            values = tf.numpy_function(
                cache.lookup, [batch["view_epoch"], batch["index"]], tf.float16, stateful=False
            )
            values.set_shape([batch["index"].shape[0], cache.feature_dim])
            features[cache.name] = values
        return {**batch, "teacher_features": features}

    return dataset.map(_add, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def write_caches(
    cache_dirs,
    teachers,
    examples,
    info,
    data_cfg,
    seed,
    epochs,
    batch_size,
    shard_size=65536,
    log=print,
):
    """Runs `teachers` over `epochs` epochs of replayable views and writes one cache each.

    Args:
      cache_dirs: one output directory per teacher.
      teachers: sequence of `teachers.Teacher` (all see the same views).
      examples, info: the training split from `data.load_split`.
      data_cfg: `config.DataConfig` (augment, aug_mode, image_size, crop_scale_min,
        cache_decoded, deterministic).
      seed: the training run's seed (views are keyed by it).
      epochs: E.
      batch_size: teacher batch size.
      shard_size: examples per shard file.
      log: callable for progress lines.
    Returns:
      list of the manifests written.
    Raises:
      ValueError: a feature does not fit float16 or is not finite; a directory already holds a
        different complete cache.
    """
    from kd_keras.data import augment
    from kd_keras.data import sources as data

    view_key = "teacher"
    teacher_view = augment.view_fn_for(data_cfg, keys=(view_key,))
    views_id = {**view_identity(data_cfg, seed, view_key), "epochs": int(epochs)}
    manifests = _new_manifests(
        cache_dirs, teachers, dataset_identity(examples, info), views_id, data_cfg, shard_size
    )
    n = info.num_examples
    arrays = [
        _open_shards(d, t.feature_dim, n, epochs, shard_size)
        for d, t in zip(cache_dirs, teachers, strict=True)
    ]
    written = [np.zeros((epochs, n), bool) for _ in teachers]
    ds = data.make_train_dataset(
        examples,
        teacher_view,
        batch_size,
        seed=seed,
        shuffle_buffer=0,
        drop_remainder=False,
        deterministic=data_cfg.deterministic,
        cache_decoded=data_cfg.cache_decoded,
        num_epochs=epochs,
        view_epochs=epochs,
    )
    forward = [tf.function(t.__call__, reduce_retracing=True) for t in teachers]
    batches_per_epoch = -(-n // batch_size)
    for step, batch in enumerate(ds):
        index = batch["index"].numpy()
        epoch = batch["view_epoch"].numpy()
        for k, fn in enumerate(forward):
            feats = _checked_features(fn(batch[view_key]), teachers[k].name)
            _store(arrays[k], feats, epoch, index, shard_size)
            written[k][epoch, index] = True
        if (step + 1) % batches_per_epoch == 0:
            log(f"cached epoch {(step + 1) // batches_per_epoch}/{epochs}")
    for k, cache_dir in enumerate(cache_dirs):
        _finish_cache(cache_dir, arrays[k], written[k], manifests[k])
    return manifests


def _new_manifests(cache_dirs, teachers, dataset_id, views_id, data_cfg, shard_size):
    """The manifest of each cache to write; an existing different complete cache is an error."""
    manifests = []
    for cache_dir, teacher in zip(cache_dirs, teachers, strict=True):
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "teacher": teacher_identity(teacher, data_cfg.image_size),
            "dataset": dataset_id,
            "views": views_id,
            "storage": {
                "dtype": np.dtype(STORAGE_DTYPE).name,
                "shard_size": int(shard_size),
                "layout": "features/e{epoch:04d}_s{shard:05d}.npy, row r = example "
                "shard * shard_size + r",
            },
        }
        if os.path.isfile(os.path.join(cache_dir, MANIFEST)):
            diffs = manifest_differences(read_manifest(cache_dir), manifest)
            if diffs:
                raise ValueError(
                    f"--cache_dir: {cache_dir} already holds a different cache ({'; '.join(diffs)}"
                    "); remove it or choose another --cache_dir."
                )
        manifests.append(manifest)
    return manifests


def _open_shards(cache_dir, feature_dim, n, epochs, shard_size):
    """{(epoch, shard): float16 memmap [rows, feature_dim]}; the old manifest is removed
    first, so the cache reads as incomplete until `_finish_cache`."""
    if os.path.isfile(os.path.join(cache_dir, MANIFEST)):
        os.remove(os.path.join(cache_dir, MANIFEST))
    os.makedirs(os.path.join(cache_dir, FEATURES_DIR), exist_ok=True)
    num_shards = -(-n // shard_size)
    return {
        (e, s): np.lib.format.open_memmap(
            shard_path(cache_dir, e, s),
            mode="w+",
            dtype=STORAGE_DTYPE,
            shape=(min(shard_size, n - s * shard_size), feature_dim),
        )
        for e in range(epochs)
        for s in range(num_shards)
    }


def _checked_features(features, name):
    """float32 [B, d] numpy; ValueError when not finite or outside the float16 range."""
    feats = np.asarray(features, np.float32)
    if not np.all(np.isfinite(feats)):
        raise ValueError(f"teacher {name}: non-finite features.")
    if np.abs(feats).max(initial=0.0) > FLOAT16_MAX:
        raise ValueError(
            f"teacher {name}: features exceed the float16 range "
            f"(max |x| = {np.abs(feats).max():.3g})."
        )
    return feats


def _store(arrays, feats, epoch, index, shard_size):
    """Writes each row of `feats` [B, d] to its (epoch, example) place in the shards."""
    for e, s in set(zip(epoch.tolist(), (index // shard_size).tolist(), strict=True)):
        sel = (epoch == e) & (index // shard_size == s)
        arrays[(e, s)][index[sel] % shard_size] = feats[sel].astype(STORAGE_DTYPE)


def _finish_cache(cache_dir, arrays, written, manifest):
    """Flushes the shards and writes the manifest last (atomically): the cache is complete."""
    if not written.all():
        missing = int((~written).sum())
        raise ValueError(
            f"teacher cache {cache_dir}: {missing} (epoch, example) pairs were not produced "
            "(undecodable images?); run `kd_keras.data.sources.verify_images` and remove them."
        )
    for array in arrays.values():
        array.flush()
    manifest["created"] = datetime.datetime.now(datetime.UTC).isoformat()
    checkpointing.write_json(os.path.join(cache_dir, MANIFEST), manifest, indent=1)
