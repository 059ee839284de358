"""kd_keras.evaluate on careless inputs (issue 22): a converted teacher's any-size backbone at
a given --image_size, half-written exports and an unusable --eval_dir, each one line."""

import os
import shutil

import pytest

from kd_keras import config
from kd_keras.artifacts import export
from kd_keras.eval import evaluation, loading
from kd_keras.teachers import conversion
from tests.helpers import tiny_student

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "data", "convert", "torchvision_basic_zip.pth")


def _cfg(model, tmp_path, **overrides):
    settings = dict(
        model=str(model),
        dataset="digits",
        knn_k=(1,),
        knn_max_train=200,
        eval_max_test=50,
        eval_batch_size=64,
        eval_dir=str(tmp_path / "eval"),
        projector_examples=0,
    )
    return config.EvaluateConfig(**{**settings, **overrides})


def test_a_converted_backbone_keras_is_evaluated_at_the_given_image_size(tmp_path):
    out = tmp_path / "teacher"
    conversion.convert(
        conversion.ConvertConfig(checkpoint=FIXTURE, out=str(out), arch="resnet-basic-2.1.1.1-3")
    )
    loaded = evaluation.load_model(str(out / "backbone.keras"))
    assert loaded.image_size is None  # any side: the size comes from --image_size
    results = evaluation.evaluate(loaded, _cfg(out / "backbone.keras", tmp_path, image_size=16))
    assert results["image_size"] == 16
    knn = [r for r in results["results"] if r["protocol"] == "knn"]
    assert knn and all(0.0 <= r["value"] <= 1.0 for r in knn)


@pytest.fixture
def good_export(tmp_path):
    import keras

    path = export.export_backbone(tiny_student(size=8, feat=6), str(tmp_path / "good"))
    inputs = keras.Input((6,))
    head = keras.Model(inputs, keras.layers.Dense(3)(inputs), name="pred")
    os.makedirs(os.path.join(path, export.HEADS_DIR))
    head.save(os.path.join(path, export.HEADS_DIR, "pred.keras"))
    evaluation.load_model(path)  # intact, it loads
    return path


def _truncate(path, size):
    with open(path, "rb") as f:
        data = f.read(size)
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: _truncate(os.path.join(d, export.MANIFEST), 10),
            "manifest.json is not valid JSON",
        ),
        (lambda d: open(os.path.join(d, export.MANIFEST), "w").write("[]"), "is not a JSON object"),
        (
            lambda d: _truncate(os.path.join(d, export.HEADS_DIR, "pred.keras"), 400),
            "cannot load .*heads/pred.keras",
        ),
        (
            lambda d: _truncate(os.path.join(d, export.KERAS_FILE), 400),
            "cannot load .*backbone.keras",
        ),
    ],
)
def test_a_half_written_export_is_one_line_naming_the_file(good_export, tmp_path, damage, message):
    broken = str(tmp_path / "broken")
    shutil.copytree(good_export, broken)
    damage(broken)
    with pytest.raises(loading.EvaluationError, match=message) as err:
        evaluation.load_model(broken)
    assert "\n" not in str(err.value)


def test_an_unusable_eval_dir_is_one_line_before_any_work(good_export, tmp_path):
    loaded = evaluation.load_model(good_export)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(loading.EvaluationError, match=r"--eval_dir=.*/file is a file"):
        evaluation.evaluate(loaded, _cfg(good_export, tmp_path, eval_dir=str(blocker)))
    with pytest.raises(loading.EvaluationError, match=r"--eval_dir=.*/file/sub cannot be created"):
        evaluation.evaluate(loaded, _cfg(good_export, tmp_path, eval_dir=str(blocker / "sub")))
    assert sorted(os.listdir(tmp_path)) == ["file", "good"]  # nothing written
