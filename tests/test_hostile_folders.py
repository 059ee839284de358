"""Hostile image folders (issue 22): decompression bombs (the header is read first, an image
claiming more than --max_image_pixels is never decoded and is skipped like a corrupt file),
symlink loops and file names that are not UTF-8 (skipped, logged, counted)."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kd_keras import config
from kd_keras.data import sources
from tests import hostile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOMB_SIDE = 10_000  # 100 Mpx: 300 MB as decoded RGB uint8, 1.2 GB as float32


def _encoded(fmt, width=7, height=5):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP"])
def test_header_pixels_reads_the_size_of_each_format(fmt):
    assert int(sources.header_pixels(tf.constant(_encoded(fmt)))) == 35


def test_header_pixels_of_a_bomb_and_of_unknown_bytes(tmp_path):
    bomb = hostile.write_png(tmp_path / "bomb.png", BOMB_SIDE, BOMB_SIDE, rows=1)
    assert int(sources.header_pixels(tf.io.read_file(bomb))) == BOMB_SIDE**2
    assert int(sources.header_pixels(tf.constant(b"short"))) == 0


def _folder(root, bomb_rows=None):
    """train/{a,b}/ with 4 small PNGs each, plus a 100 Mpx PNG bomb in a/."""
    for name in ("a", "b"):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((6, 6, 3), 30 * i, np.uint8)).save(folder / f"{i}.png")
    hostile.write_png(root / "train" / "a" / "bomb.png", BOMB_SIDE, BOMB_SIDE, rows=bomb_rows)
    return root


def test_the_check_skips_an_image_over_the_limit_and_counts_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_KERAS_CACHE_DIR", str(tmp_path / "cache"))
    root = _folder(tmp_path / "data", bomb_rows=1)
    examples, info = sources.load_split(f"folder:{root}", "train")
    assert info.skipped_files == 1 and info.skipped_names == ("train/a/bomb.png",)
    assert info.num_examples == 8 and len(list(examples)) == 8
    # The limit is part of the cached check's key: a larger limit checks again (the bomb
    # then fails to decode, being truncated, and is skipped as corrupt).
    small = sources.undecodable_files([str(root / "train" / "b" / "0.png")], max_image_pixels=35)
    assert small == [str(root / "train" / "b" / "0.png")]


def test_the_training_decode_path_drops_an_image_over_the_limit(tmp_path):
    root = _folder(tmp_path / "data", bomb_rows=1)
    examples, info = sources.load_split(f"folder:{root}", "train", verify=False)
    assert info.num_examples == 9  # not checked up front ...
    assert len(list(examples)) == 8  # ... but never decoded
    lazy = sources.lazy_source(examples)
    record = {"path": tf.constant(str(root / "train" / "a" / "bomb.png"))}
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_image_pixels=64000000"):
        lazy.encoded(record)


def test_max_image_pixels_is_validated_and_matches_the_flag_default(tmp_path):
    with pytest.raises(ValueError, match="--max_image_pixels must be a positive int"):
        sources.load_split(f"folder:{tmp_path}", "train", max_image_pixels=0)
    assert config.DataConfig().max_image_pixels == sources.DEFAULT_MAX_IMAGE_PIXELS


_CHECK_IN_CHILD = """
import json, resource
from kd_keras.data import sources
import tensorflow as tf
tf.constant(0)  # TensorFlow's own memory, before the folder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
examples, info = sources.load_split({source!r}, "train", verify={verify})
count = sum(1 for _ in examples)
print(json.dumps({{"before_mb": before, "skipped": info.skipped_files, "count": count}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("verify", [True, False])
def test_a_real_bomb_costs_no_memory(tmp_path, verify):
    root = _folder(tmp_path / "data")  # a complete, valid 100 Mpx PNG (~100 KB)
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3",
           "KD_KERAS_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    code = _CHECK_IN_CHILD.format(source=f"folder:{root}", verify=verify)
    out = hostile.peak_rss(code, env)
    assert out["returncode"] == 0, out["stderr"][-2000:]
    result = json.loads(out["stdout"].strip().splitlines()[-1])
    assert result["count"] == 8 and result["skipped"] == (1 if verify else 0)
    # A decode would add >= 300 MB (uint8 RGB); the small images add next to nothing.
    assert out["peak_mb"] - result["before_mb"] < 150, (out["peak_mb"], result)


def test_symlink_loops_and_non_utf8_names_are_skipped_and_logged(tmp_path, caplog):
    root = _folder(tmp_path / "data", bomb_rows=1)
    train = root / "train"
    os.symlink(train / "loop2", train / "loop1")
    os.symlink(train / "loop1", train / "loop2")
    os.symlink(train / "a" / "self.png", train / "a" / "self.png")
    name = os.fsdecode(b"\xff\xfe.png")  # not UTF-8: Python keeps it as surrogates
    (train / "b" / name).hardlink_to(train / "b" / "0.png")
    with caplog.at_level("WARNING"):
        examples, info = sources.load_split(str(root), "train", verify=False)
    assert info.num_examples == 9 and info.num_classes == 2 and len(list(examples)) == 8
    text = caplog.text
    assert "loop1 (Too many levels of symbolic links)" in text
    assert "self.png (Too many levels of symbolic links)" in text
    assert "\\xff\\xfe.png: its name is not UTF-8" in text
    # Counted and named with the files that cannot be read, as results.json reports them.
    assert info.skipped_files == 1 and info.skipped_names == ("train/b/\\xff\\xfe.png",)
