"""Converted checkpoints as teachers: the torch: spec (convert once, cache by sha256, reuse)
and a converted SwAV checkpoint as the frozen teacher of --method=oss_offline."""

import dataclasses
import json
import os

import numpy as np
import pytest

from kd_keras import config as config_lib
from kd_keras.teachers import conversion as convert
from kd_keras.teachers import loading as teachers
from kd_keras.training import run as train

config_lib.define_flags()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "convert")
INDEX = json.load(open(os.path.join(DATA, "index.json")))
FEATURES = dict(np.load(os.path.join(DATA, "features.npz")))


def _spec(name, options=""):
    fixture = INDEX["fixtures"][name]
    return f"torch:{fixture['arch']}={os.path.join(DATA, fixture['file'])}{options}"


def test_torch_spec_converts_once_into_the_workdir_and_reuses_it(tmp_path, monkeypatch):
    side = INDEX["sides"][1]
    teacher = teachers.load_teacher(_spec("moco_v3", ",name=mocov3"), side, workdir=str(tmp_path))
    assert teacher.name == "mocov3" and teacher.spec.kind == "torch"
    got = teacher(FEATURES[f"images_{side}"]).numpy()
    want = FEATURES[f"moco_v3_{side}"]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
    (cached,) = os.listdir(tmp_path / teachers.CONVERTED_CACHE)
    manifest = json.loads(
        (tmp_path / teachers.CONVERTED_CACHE / cached / "manifest.json").read_text()
    )
    assert cached.startswith(manifest["source"]["sha256"]) and manifest["layout"] == "moco_v3"

    def no_second_conversion(cfg):
        raise AssertionError("converted twice")

    monkeypatch.setattr(convert, "convert", no_second_conversion)
    again = teachers.load_teacher(_spec("moco_v3"), side, workdir=str(tmp_path))
    np.testing.assert_allclose(again(FEATURES[f"images_{side}"]).numpy(), got, rtol=1e-6)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("torch:resnet50", "use torch:ARCH=/path/to/checkpoint"),
        ("torch:resnet51=/x.pth", "unknown architecture 'resnet51'"),
        ("torch:resnet50=/nonexistent.pth", "checkpoint /nonexistent.pth does not exist"),
        ("/x.keras,layout=moco", "layout= applies to torch: teachers only"),
    ],
)
def test_bad_torch_specs_name_the_problem(spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        teachers.parse_teacher_spec(spec)


def test_torch_spec_rejects_an_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        teachers.parse_teacher_spec(_spec("swav", ",layout=mocov9"))


def _tiny_cfg(workdir, method, teacher, **fields):
    cfg = config_lib.Config(
        workdir=str(workdir),
        method=method,
        log_images=0,
        verbose=0,
        evaluate=False,
        data=config_lib.DataConfig(image_size=8, shuffle_buffer=64),
        model=config_lib.ModelConfig(student="convnet_tiny", teachers=(teacher,), head="mlp2"),
        optim=config_lib.OptimConfig(
            batch_size=16, epochs=1, steps_per_epoch=2, lr=0.1, warmup_epochs=0
        ),
        eval=config_lib.EvalConfig(knn_k=(1,), eval_batch_size=64, knn_max_train=64),
    )
    return dataclasses.replace(cfg, **fields)


@pytest.mark.slow
def test_oss_offline_distils_a_swav_checkpoint_named_by_a_torch_spec(tmp_path):
    cluster = config_lib.ClusterConfig(
        num_prototypes=10,
        proj_dim=8,
        proj_hidden_dim=16,
        small_crop_size=4,
        num_small_crops=2,
        queue_length=0,
    )
    cfg = _tiny_cfg(tmp_path / "run", "oss_offline", _spec("swav"), cluster=cluster)
    results, method = train.run_and_return_model(cfg)
    assert results["steps"] == 2 and np.isfinite(results["final_logs"]["loss_student"])
    (converted,) = os.listdir(tmp_path / "run" / teachers.CONVERTED_CACHE)
    kernel = np.load(tmp_path / "run" / teachers.CONVERTED_CACHE / converted / "prototypes.npy")
    np.testing.assert_array_equal(method.prototypes.kernel.numpy(), kernel)


def test_simreg_trains_from_a_torch_spec_converted_in_its_workdir(tmp_path):
    cfg = _tiny_cfg(tmp_path / "run", "simreg", _spec("torchvision_basic_legacy"))
    results, _ = train.run_and_return_model(cfg)
    assert results["steps"] == 2 and np.isfinite(results["final_logs"]["loss"])
    assert len(os.listdir(tmp_path / "run" / teachers.CONVERTED_CACHE)) == 1
