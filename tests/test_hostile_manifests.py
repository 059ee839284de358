"""Hand-edited or damaged JSON files (issue 22): one ValueError naming the file and the field,
never a KeyError, ZeroDivisionError or a silently accepted impossible size."""

import json

import pytest

from kd_keras.data import teacher_cache
from kd_keras.teachers import conversion, converted_dir
from kd_keras.training import run as train


def _cache_manifest(**edits):
    manifest = {
        "format": teacher_cache.FORMAT,
        "version": teacher_cache.VERSION,
        "teacher": {"name": "t", "feature_dim": 4},
        "dataset": {"num_examples": 3},
        "views": {"epochs": 1},
        "storage": {"shard_size": 2},
    }
    for dotted, value in edits.items():
        section, key = dotted.split("__")
        manifest[section][key] = value
    return manifest


def _write(directory, name, content):
    path = directory / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_a_valid_cache_manifest_is_read(tmp_path):
    _write(tmp_path, teacher_cache.MANIFEST, _cache_manifest())
    assert teacher_cache.read_manifest(str(tmp_path))["storage"]["shard_size"] == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"manifest.json is not valid JSON \(Expecting"),
        ([1, 2], "is not a kd_keras_teacher_cache manifest|is not a .* manifest of version"),
        (
            _cache_manifest(storage__shard_size=0),
            "storage.shard_size must be a positive integer, got 0",
        ),
        (
            _cache_manifest(storage__shard_size=-5),
            "storage.shard_size must be a positive integer, got -5",
        ),
        (_cache_manifest(views__epochs=0), "views.epochs must be a positive integer, got 0"),
        (
            _cache_manifest(teacher__feature_dim="4"),
            "teacher.feature_dim must be a positive integer, got '4'",
        ),
        ({**_cache_manifest(), "storage": []}, "section 'storage' missing or not an object"),
        ({**_cache_manifest(), "teacher": {"feature_dim": 4}}, "teacher.name missing"),
    ],
)
def test_a_damaged_cache_manifest_is_one_error_naming_file_and_field(tmp_path, content, message):
    path = _write(tmp_path, teacher_cache.MANIFEST, content)
    with pytest.raises(ValueError, match=message) as err:
        teacher_cache.TeacherCache(str(tmp_path))
    assert str(path) in str(err.value)


def test_a_converted_manifest_that_is_not_json_names_the_file(tmp_path):
    path = _write(tmp_path, conversion.MANIFEST, "{")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        conversion.read_manifest(str(tmp_path))
    assert str(path) in str(err.value)
    # --overwrite treats it as no converted teacher: refused, nothing deleted.
    with pytest.raises(ValueError, match="not a kd_keras converted teacher"):
        converted_dir.check_out(str(tmp_path), overwrite=True)
    assert path.exists()


@pytest.mark.parametrize("content", ["{", "[1]"])
def test_a_damaged_config_json_names_the_file(tmp_path, content):
    path = _write(tmp_path, "config.json", content)
    with pytest.raises(ValueError) as err:
        train._read_config(str(path))
    assert str(path) in str(err.value)
