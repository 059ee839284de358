import os

import keras
import numpy as np
import pytest

from kd_keras.artifacts import export
from kd_keras.nets import backbones


@pytest.fixture(scope="module")
def backbone():
    keras.utils.set_random_seed(0)
    return backbones.build_backbone("convnet_tiny", 8)


def test_export_round_trip_and_manifest(tmp_path, backbone):
    out = export.export_backbone(backbone, str(tmp_path / "export"), metadata={"method": "x"})
    embed = export.load_exported(out)
    images = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(embed(images), backbone(images, training=False), atol=1e-5)
    manifest = (tmp_path / "export" / "manifest.json").read_text()
    assert '"feature_dim": 64' in manifest and '"method": "x"' in manifest


def test_failed_export_leaves_nothing_half_written(tmp_path, backbone, monkeypatch):
    target = tmp_path / "export"
    export.export_backbone(backbone, str(target))
    before = sorted(os.listdir(target))

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(backbone), "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export.export_backbone(backbone, str(target))
    # The previous complete export is untouched and no temporary directory is left behind.
    assert sorted(os.listdir(target)) == before
    assert os.listdir(tmp_path) == ["export"]


def test_loading_a_directory_without_export_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No exported SavedModel"):
        export.load_exported(str(tmp_path))


def test_mixed_precision_backbone_exports_float32_features(tmp_path):
    from kd_keras.training.precision import policy_scope

    keras.utils.set_random_seed(0)
    with policy_scope("mixed_bfloat16"):
        model = backbones.build_backbone("convnet_tiny", 8)
    assert keras.backend.standardize_dtype(model.output.dtype) == "bfloat16"
    out = export.export_backbone(model, str(tmp_path / "export"))
    images = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
    got = export.load_exported(out)(images)
    assert got.dtype == "float32"
    expected = np.asarray(model(images, training=False), np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)
