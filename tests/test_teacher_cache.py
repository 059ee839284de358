"""Cached teacher features: replayable views, the cache round trip, manifest checks, training."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras import config
from kd_keras.data import augment, teacher_cache
from kd_keras.data import sources as data
from kd_keras.methods import SimReg
from kd_keras.nets import backbones
from kd_keras.teachers.loading import load_teacher
from kd_keras.training import run as train
from tests.helpers import tiny_student, tiny_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
SEED = 5


def _data_cfg(**overrides):
    cfg = config.DataConfig(image_size=SIZE, augment="strong", shuffle_buffer=64)
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    keras.utils.set_random_seed(3)
    model = backbones.build_backbone("convnet_tiny", SIZE)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.keras")
    model.save(path)
    return path


@pytest.fixture(scope="module")
def digits():
    return data.load_split("digits", "train", image_size_hint=SIZE)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, teacher_file):
    """A 2-epoch cache written by the command line, 3 shards (shard size 500 of 1437)."""
    out = tmp_path_factory.mktemp("cache")
    cmd = [
        sys.executable,
        "-m",
        "kd_keras.cache_teacher",
        f"--teacher={teacher_file},name=tiny",
        f"--cache_dir={out}",
        "--cache_epochs=2",
        "--cache_shard_size=500",
        "--cache_batch_size=256",
        f"--image_size={SIZE}",
        "--augment=strong",
        f"--seed={SEED}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(out / "tiny")


def _student_view_fn(data_cfg):
    view_fn = augment.make_view_fn(
        data_cfg.augment, SIZE, data_cfg.aug_mode, scale=(data_cfg.crop_scale_min, 1.0)
    )
    return lambda image, seed: {"student": view_fn(image, seed)["student"]}


def _views_by_key(ds, batches):
    out = {}
    for batch in ds.take(batches).as_numpy_iterator():
        for i, e, v in zip(batch["index"], batch["view_epoch"], batch["student"], strict=True):
            out[(int(e), int(i))] = v
    return out


_REPLAY_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from kd_keras.data import augment
from kd_keras.data import sources as data
examples, _ = data.load_split("digits", "train", image_size_hint={size})
examples = examples.filter(lambda ex: ex["index"] < 320)
fn = augment.make_view_fn("strong", {size}, "same")
ds = data.make_train_dataset(examples, lambda im, s: {{"student": fn(im, s)["student"]}}, 32,
                             seed={seed}, shuffle_buffer=0, start_epoch=1, num_epochs=2,
                             view_epochs=2, deterministic=False)
views = {{}}
for b in ds.as_numpy_iterator():
    for i, e, v in zip(b["index"], b["view_epoch"], b["student"]):
        views["%d_%d" % (e, i)] = v
np.savez({out!r}, **views)
"""


@pytest.mark.slow
def test_replayed_views_are_bit_identical_across_runs_and_pipelines(tmp_path, digits):
    examples, _ = digits
    examples = examples.filter(lambda ex: ex["index"] < 320)
    view_fn = _student_view_fn(_data_cfg())
    # Run 1: shuffled, ordered maps, epochs 0 and 1.
    ds1 = data.make_train_dataset(
        examples, view_fn, 32, seed=SEED, shuffle_buffer=100, view_epochs=2, num_epochs=2
    )
    first = _views_by_key(ds1, 20)
    # Run 2 in another process: no shuffle, out-of-order maps, epochs 1 and 2 (= cache epoch 0).
    out = str(tmp_path / "views.npz")
    script = _REPLAY_SCRIPT.format(repo=REPO, size=SIZE, seed=SEED, out=out)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    second = np.load(out)
    common = [(e, i) for (e, i) in first if f"{e}_{i}" in second.files]
    assert len(common) == 640
    for e, i in common:
        np.testing.assert_array_equal(first[(e, i)], second[f"{e}_{i}"])
    # Epochs 0 and 1 really are different augmentations, so the test could fail.
    i = common[0][1]
    if (0, i) in first and (1, i) in first:
        assert not np.array_equal(first[(0, i)], first[(1, i)])


@pytest.mark.slow
def test_cache_round_trip_equals_the_teacher_on_replayed_views(cache_dir, teacher_file, digits):
    examples, info = digits
    cache = teacher_cache.TeacherCache(cache_dir)
    assert (cache.epochs, cache.num_examples, cache.name) == (2, 1437, "tiny")
    assert sorted(os.listdir(os.path.join(cache_dir, "features"))) == [
        f"e{e:04d}_s{s:05d}.npy" for e in range(2) for s in range(3)
    ]
    shard = np.load(teacher_cache.shard_path(cache_dir, 1, 2), mmap_mode="r")
    assert shard.dtype == np.float16 and shard.shape == (437, cache.feature_dim)
    teacher = load_teacher(f"{teacher_file},name=tiny", SIZE)
    ds = data.make_train_dataset(
        examples,
        _student_view_fn(_data_cfg()),
        128,
        seed=SEED,
        shuffle_buffer=300,
        view_epochs=cache.epochs,
        start_epoch=3,  # training epoch 3 replays cache epoch 1
    )
    ds = teacher_cache.attach_features(ds, [cache])
    seen_epochs = set()
    for batch in ds.take(13):  # epoch 3 (11 batches) and the start of epoch 4
        seen_epochs |= set(batch["view_epoch"].numpy().tolist())
        cached = batch["teacher_features"]["tiny"].numpy().astype(np.float32)
        live = teacher(batch["student"]).numpy()
        scale = np.abs(live).max()
        np.testing.assert_allclose(cached, live, atol=2e-3 * scale, rtol=2e-3)
    assert seen_epochs == {0, 1}
    # A different epoch's features are different numbers, so the comparison is meaningful.
    other = cache.lookup(np.zeros(5, np.int64), np.arange(5))
    assert not np.allclose(other, cache.lookup(np.ones(5, np.int64), np.arange(5)))


def _expected(teacher, examples, info, data_cfg, seed):
    return {
        "teacher": teacher_cache.teacher_identity(teacher, SIZE),
        "dataset": teacher_cache.dataset_identity(examples, info),
        "views": teacher_cache.view_identity(data_cfg, seed),
    }


def test_manifest_check_names_each_mismatch(cache_dir, teacher_file, digits):
    examples, info = digits
    manifest = teacher_cache.read_manifest(cache_dir)
    teacher = load_teacher(f"{teacher_file},name=tiny", SIZE)
    good = _expected(teacher, examples, info, _data_cfg(), SEED)
    teacher_cache.check_manifest(cache_dir, manifest, good)  # matches: no error

    with pytest.raises(ValueError, match=r"views\.seed"):
        teacher_cache.check_manifest(
            cache_dir, manifest, _expected(teacher, examples, info, _data_cfg(), SEED + 1)
        )
    with pytest.raises(ValueError, match=r"views\.augment"):
        bad = _expected(teacher, examples, info, _data_cfg(augment="weak"), SEED)
        teacher_cache.check_manifest(cache_dir, manifest, bad)
    # The resize mode changes the views' rounding, which the 6-decimal probe may not see.
    assert _data_cfg().view_resize == "auto"
    with pytest.raises(ValueError, match=r"views\.view_resize"):
        bad = _expected(teacher, examples, info, _data_cfg(view_resize="antialias"), SEED)
        teacher_cache.check_manifest(cache_dir, manifest, bad)
    # A cache written before --view_resize antialiased every crop and still fits such a run.
    legacy = {
        **manifest,
        "views": {k: v for k, v in manifest["views"].items() if k != "view_resize"},
    }
    antialiased = _expected(teacher, examples, info, _data_cfg(view_resize="antialias"), SEED)
    antialiased["views"]["probe"] = legacy["views"]["probe"]
    teacher_cache.check_manifest(cache_dir, legacy, antialiased)
    with pytest.raises(ValueError, match=r"views\.view_resize"):
        teacher_cache.check_manifest(cache_dir, legacy, good)
    test_examples, test_info = data.load_split("digits", "test", image_size_hint=SIZE)
    with pytest.raises(ValueError, match=r"dataset\.split.*dataset\.fingerprint"):
        bad = _expected(teacher, test_examples, test_info, _data_cfg(), SEED)
        teacher_cache.check_manifest(cache_dir, manifest, bad)
    # Same architecture and name, other weights: only the probe features can tell.
    keras.utils.set_random_seed(99)
    other = backbones.build_backbone("convnet_tiny", SIZE)
    other.trainable = False
    swapped = load_teacher(f"{teacher_file},name=tiny", SIZE)
    swapped.model = other
    with pytest.raises(ValueError, match=r"teacher\.probe_features"):
        teacher_cache.check_manifest(
            cache_dir, manifest, _expected(swapped, examples, info, _data_cfg(), SEED)
        )


def test_incomplete_cache_and_missing_shard_are_refused(tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        teacher_cache.TeacherCache(str(tmp_path))
    broken = tmp_path / "broken"
    os.makedirs(broken / "features")
    manifest = json.loads(open(os.path.join(cache_dir, "manifest.json")).read())
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="e0000_s00000.npy"):
        teacher_cache.TeacherCache(str(broken))


class _ExplodingTeacher:
    name = "tiny"
    feature_dim = 5

    def __call__(self, images):
        raise AssertionError("the teacher must not run when features are cached")


def test_simreg_step_uses_cached_features_without_running_the_teacher():
    keras.utils.set_random_seed(0)
    student = tiny_student(size=8, sync_bn=False)
    head = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5)])
    method = SimReg(student, [_ExplodingTeacher()], [head])
    method.compile(optimizer=keras.optimizers.SGD(0.1))
    rng = np.random.default_rng(0)
    batch = {
        "student": rng.uniform(size=(4, 8, 8, 3)).astype(np.float32),
        "teacher_features": {"tiny": rng.normal(size=(4, 5)).astype(np.float16)},
    }
    before = [w.numpy().copy() for w in head.weights]
    history = method.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss) and 0.0 < loss <= 4.0
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, head.weights, strict=True))


def _train_cfg(workdir, teacher_file, **overrides):
    cfg = config.Config(
        workdir=str(workdir),
        seed=SEED,
        log_images=0,
        verbose=0,
        export=False,
        evaluate=False,
        data=_data_cfg(),
        model=config.ModelConfig(
            student="convnet_tiny", teachers=(f"{teacher_file},name=tiny",), head="mlp2"
        ),
        optim=config.OptimConfig(batch_size=64, epochs=2, steps_per_epoch=4, lr=0.2),
    )
    return dataclasses.replace(cfg, **overrides)


@pytest.mark.slow
def test_training_with_a_cache_matches_training_with_the_live_teacher(
    tmp_path, teacher_file, cache_dir
):
    live = train.run(_train_cfg(tmp_path / "live", teacher_file))
    cfg = _train_cfg(tmp_path / "cached", teacher_file)
    cached_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, teacher_caches=(os.path.dirname(cache_dir),))
    )
    cached = train.run(cached_cfg)
    # 2 epochs <= the cache's 2 epochs: same views, same targets up to float16 rounding.
    assert cached["steps"] == live["steps"] == 8
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(cached["final_logs"][key], live["final_logs"][key], rtol=2e-2)


def test_training_refuses_a_cache_of_another_run(tmp_path, teacher_file, cache_dir):
    cfg = _train_cfg(tmp_path / "run", teacher_file, seed=SEED + 1)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, teacher_caches=(cache_dir,))
    )
    with pytest.raises(ValueError, match=r"does not match this run: views\.seed"):
        train.run(cfg)
    # A cache for a teacher the run does not have.
    cfg = _train_cfg(tmp_path / "run2", teacher_file)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, teachers=(f"{teacher_file},name=other",), teacher_caches=(cache_dir,)
        ),
    )
    with pytest.raises(train.UsageError, match="one cache per --teacher"):
        train.run(cfg)


@pytest.mark.slow
def test_train_cli_reports_a_mismatching_cache_in_one_line(tmp_path, teacher_file, cache_dir):
    cmd = [
        sys.executable,
        "-m",
        "kd_keras.train",
        f"--workdir={tmp_path / 'run'}",
        f"--teacher={teacher_file},name=tiny",
        f"--teacher_cache={cache_dir}",
        f"--image_size={SIZE}",
        "--augment=weak",
        f"--seed={SEED}",
        "--student=convnet_tiny",
        "--epochs=1",
        "--batch_size=64",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_keras.train: error: --teacher_cache") and "views.augment" in last


def test_cache_writer_refuses_to_overwrite_a_different_cache(tmp_path, teacher_file, digits):
    examples, info = digits
    teacher = load_teacher(f"{teacher_file},name=tiny", SIZE)
    small = examples.take(40)
    small_info = dataclasses.replace(info, num_examples=40)
    out = str(tmp_path / "tiny")
    kwargs = dict(epochs=1, batch_size=16, shard_size=32, log=lambda _: None)
    teacher_cache.write_caches([out], [teacher], small, small_info, _data_cfg(), SEED, **kwargs)
    assert teacher_cache.TeacherCache(out).lookup(0, [39]).shape == (1, teacher.feature_dim)
    with pytest.raises(ValueError, match="already holds a different cache"):
        teacher_cache.write_caches(
            [out], [teacher], small, small_info, _data_cfg(), SEED + 1, **kwargs
        )
    assert tf.io.gfile.exists(os.path.join(out, "manifest.json"))


def test_two_teachers_get_one_cache_each_and_both_features_reach_the_batch(tmp_path, digits):
    examples, info = digits
    small = examples.take(48)
    small_info = dataclasses.replace(info, num_examples=48)
    teachers = [tiny_teacher("a", size=SIZE, dim=5, seed=1), tiny_teacher("b", size=SIZE, dim=7)]
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    teacher_cache.write_caches(
        dirs, teachers, small, small_info, _data_cfg(), SEED, epochs=1, batch_size=16,
        log=lambda _: None,
    )  # fmt: skip
    # The parent directory stands for both caches.
    assert teacher_cache.expand_cache_dirs([str(tmp_path)]) == dirs
    caches = [teacher_cache.TeacherCache(d) for d in dirs]
    ds = data.make_train_dataset(
        small, _student_view_fn(_data_cfg()), 16, seed=SEED, shuffle_buffer=48, view_epochs=1
    )
    batch = next(iter(teacher_cache.attach_features(ds, caches)))
    for teacher in teachers:
        got = batch["teacher_features"][teacher.name].numpy().astype(np.float32)
        want = teacher(batch["student"]).numpy()
        assert got.shape == (16, teacher.feature_dim)
        np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max(), rtol=2e-3)


def test_truncated_or_foreign_shard_is_refused_when_the_cache_is_opened(tmp_path, cache_dir):
    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    shard = copy / "features" / "e0001_s00002.npy"
    teacher_cache.TeacherCache(str(copy))  # intact: opens
    full = shard.read_bytes()
    shard.write_bytes(full[: len(full) - 10])
    with pytest.raises(ValueError, match=r"e0001_s00002.npy has \d+ bytes, \d+ expected"):
        teacher_cache.TeacherCache(str(copy))
    shard.write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="e0001_s00002.npy is not a .npy file"):
        teacher_cache.TeacherCache(str(copy))
    np.save(shard, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="e0001_s00002.npy holds float32 \\[3, 2\\]"):
        teacher_cache.TeacherCache(str(copy))
