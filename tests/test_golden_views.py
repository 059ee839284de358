"""Training views are bit-identical to golden views saved from the pre-refactor pipeline.

tests/data/golden_views/ was written by scripts/make_golden_views.py with the per-image code of
commit e707edf. The fast pipeline (decode-and-crop, uint8 crops, photometric ops after `batch`)
must reproduce every crop, flip, jitter, greyscale and blur decision and every pixel exactly, so
a teacher cache or a resumed run written by either version replays the same views.
"""

import functools
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "data", "golden_views")


@pytest.fixture(scope="module")
def maker():
    spec = importlib.util.spec_from_file_location(
        "make_golden_views", os.path.join(REPO, "scripts", "make_golden_views.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_same(golden, fresh):
    assert sorted(golden) == sorted(fresh)
    for key in golden:
        assert fresh[key].dtype == golden[key].dtype, key
        np.testing.assert_array_equal(fresh[key], golden[key], err_msg=key)


def test_per_image_views_match_golden(maker):
    golden = dict(np.load(os.path.join(GOLDEN, "views.npz")))
    _assert_same(golden, maker.per_image_views())


@pytest.fixture(scope="module")
def batches(maker):
    return maker.pipeline_batches()


@pytest.mark.slow
def test_pipeline_batches_match_golden(batches):
    golden = dict(np.load(os.path.join(GOLDEN, "pipeline.npz")))
    _assert_same(golden, batches)


@pytest.mark.slow
def test_pipeline_replays_bit_identically_in_another_process(maker, batches, tmp_path):
    """A second process (fresh graph, thread pools, tf.data autotuning) yields the same bits."""
    _assert_same(_batches_in_another_process(maker, tmp_path), batches)


def _batches_in_another_process(maker, tmp_path, prelude=""):
    """`maker.pipeline_batches()` computed by a fresh Python process (after `prelude`)."""
    out = tmp_path / "replay.npz"
    code = (
        prelude + "import importlib.util, sys, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('m', {maker.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"np.savez({str(out)!r}, **m.pipeline_batches())\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)
    return dict(np.load(out))


@pytest.mark.slow
def test_batch_colour_stage_matches_golden(maker, monkeypatch):
    """Colour ops run after `batch` (colour_stage="batch") give the same bits as per example."""
    from kd_keras.data import augment

    for name in ("make_view_fn", "make_multicrop_fn"):
        monkeypatch.setattr(
            augment, name, functools.partial(getattr(augment, name), colour_stage="batch")
        )
    golden = dict(np.load(os.path.join(GOLDEN, "pipeline.npz")))
    _assert_same(golden, maker.pipeline_batches())




@pytest.mark.slow
def test_auto_resize_pipeline_is_close_to_golden_and_replays_in_another_process(
    maker, tmp_path, monkeypatch
):
    """--view_resize=auto (the training default) changes only the rounding of enlarged crops:
    every view within 1e-4 of the golden one, and a second process replays it bit for bit."""
    # The maker builds its views in the mode this variable names (default: antialias, the
    # fixtures' bits); the replaying process inherits it.
    monkeypatch.setenv(maker.RESIZE_ENV, "auto")
    fresh = maker.pipeline_batches()
    golden = dict(np.load(os.path.join(GOLDEN, "pipeline.npz")))
    assert sorted(golden) == sorted(fresh)
    differ = 0
    for key in golden:
        if golden[key].dtype.kind == "f":
            np.testing.assert_allclose(fresh[key], golden[key], atol=1e-4, err_msg=key)
            differ += int(not np.array_equal(fresh[key], golden[key]))
        else:
            np.testing.assert_array_equal(fresh[key], golden[key], err_msg=key)
    assert differ, "auto resize gave the golden bits: the test no longer tells the modes apart"
    _assert_same(_batches_in_another_process(maker, tmp_path, ""), fresh)
