"""kd_keras.convert against torch's own features (fixtures of scripts/make_torch_fixtures.py).

No torch here: the fixtures hold torch-written checkpoints (zip and legacy pickles, one
.safetensors) of small torchvision ResNets in the published layouts, and torch's features of
fixed images at an even and an odd side.
"""

import argparse
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import keras
import numpy as np
import pytest

from kd_keras.methods import factory
from kd_keras.teachers import checkpoint_io, torch_pickle
from kd_keras.teachers import conversion as convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "convert")
INDEX = json.load(open(os.path.join(DATA, "index.json")))
FIXTURES = INDEX["fixtures"]
SIDES = INDEX["sides"]
FEATURES = dict(np.load(os.path.join(DATA, "features.npz")))
BOTTLENECK = FIXTURES["torchvision_bottleneck_zip"]


def _max_rel(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _convert(tmp_path, name, **kwargs):
    fixture = FIXTURES[name]
    kwargs.setdefault("arch", fixture["arch"])
    if name == "dino_student":
        kwargs.setdefault("layout", "dino_student")
    out = tmp_path / name
    cfg = convert.ConvertConfig(
        checkpoint=kwargs.pop("checkpoint", os.path.join(DATA, fixture["file"])),
        out=str(out),
        **kwargs,
    )
    return out, convert.convert(cfg)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_converted_network_computes_torchs_features(tmp_path, name):
    out, manifest = _convert(tmp_path, name)
    assert manifest["layout"] == FIXTURES[name]["layout"]
    model = keras.models.load_model(out / "backbone.keras", compile=False)
    for side in SIDES:
        got = model(FEATURES[f"images_{side}"], training=False)
        assert _max_rel(got, FEATURES[f"{name}_{side}"]) < 1e-4, side
    # Every Keras weight was fed, each from its own source tensor (SwAV's heads come on top).
    heads = ("projection_head/", "prototypes/")
    targets = [v for v in manifest["mapping"].values() if not v.startswith(heads)]
    assert sorted(targets) == sorted(w.path for w in model.weights)


def test_manifest_records_source_mapping_skips_and_normalisation(tmp_path):
    out, manifest = _convert(tmp_path, "moco_v2")
    path = os.path.join(DATA, "moco_v2.pth.tar")
    assert manifest["source"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert manifest["source"]["format"] == "torch_legacy"
    assert manifest["source"]["container"] == "state_dict"
    assert manifest["mapping"]["module.encoder_q.layer2.0.downsample.0.weight"] == (
        "stage2_block0_proj_conv/kernel"
    )
    assert manifest["mapping"]["module.encoder_q.bn1.running_var"] == "stem_bn/moving_variance"
    skipped = manifest["skipped"]
    assert skipped["module.queue"].startswith("MoCo queue")
    assert "module.encoder_q.fc.0.weight" in skipped
    assert any(k.startswith("module.encoder_k.") for k in skipped)
    assert set(manifest["skipped_entries"]) == {"epoch", "arch", "optimizer"}
    assert manifest["normalization"]["mode"] == "imagenet"
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # A converted directory is a teacher like any other.
    from kd_keras.teachers import loading as teachers

    teacher = teachers.load_teacher(str(out), image_size=SIDES[0])
    assert teacher.spec.kind == "converted" and teacher.feature_dim == manifest["feature_dim"]


def test_swav_checkpoint_becomes_a_clustering_network(tmp_path):
    out, manifest = _convert(tmp_path, "swav")
    assert manifest["kind"] == factory.NETWORK_KIND
    cfg = types.SimpleNamespace(cluster=types.SimpleNamespace(proj_dim=8, num_prototypes=10))
    nets = factory.load_clustering_networks(str(out), cfg)
    for side in SIDES:
        features = nets["backbone"](FEATURES[f"images_{side}"], training=False)
        assert _max_rel(features, FEATURES[f"swav_{side}"]) < 1e-4
        embeddings = nets["head"](features, training=False)
        assert _max_rel(embeddings, FEATURES[f"swav_embeddings_{side}"]) < 1e-4
        z = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        assert _max_rel(nets["prototypes"](z), FEATURES[f"swav_scores_{side}"]) < 1e-4
    assert manifest["mapping"]["module.prototypes.weight"] == "prototypes/prototypes"


def _state(name="torchvision_bottleneck_zip"):
    return dict(torch_pickle.load(os.path.join(DATA, FIXTURES[name]["file"])))


def _save_safetensors(state, path):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return str(path)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            "rename",
            r"missing keys: layer2\.0\.conv2\.weight.*unexpected.*layer2\.0\.conv2\.weights",
        ),
        ("drop", r"1 missing keys: layer3\.0\.bn1\.running_var\."),
        ("reshape", r"ill-shaped tensors: layer1\.0\.conv3\.weight \[2, 8, 1, 1\] -> stage1"),
        ("extra", r"unexpected tensors \(no rule skips them\): layer5\.0\.conv1\.weight"),
    ],
)
def test_a_renamed_dropped_reshaped_or_extra_key_is_an_error_naming_it(tmp_path, edit, expected):
    state = _state()
    if edit == "rename":
        state["layer2.0.conv2.weights"] = state.pop("layer2.0.conv2.weight")
    elif edit == "drop":
        del state["layer3.0.bn1.running_var"]
    elif edit == "reshape":
        state["layer1.0.conv3.weight"] = state["layer1.0.conv3.weight"].transpose(1, 0, 2, 3)
    else:
        state["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    path = _save_safetensors(state, tmp_path / "edited.safetensors")
    with pytest.raises(convert.ConversionError, match=expected):
        _convert(tmp_path, "torchvision_bottleneck_zip", checkpoint=path)
    assert not os.path.exists(tmp_path / "torchvision_bottleneck_zip")  # nothing half-written
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_the_architecture_is_checked_against_the_checkpoint(tmp_path):
    with pytest.raises(convert.ConversionError, match="ill-shaped tensors: conv1.weight"):
        _convert(tmp_path, "torchvision_bottleneck_zip", arch="resnet-bottleneck-1.2.1.1-4")
    with pytest.raises(convert.ConversionError, match="missing keys: layer2.1.conv1.weight"):
        _convert(tmp_path, "torchvision_wide_zip", arch="resnet-bottleneck-1.2.1.1-2-wide2")


def test_unknown_layout_lists_the_first_keys_and_the_known_layouts(tmp_path):
    path = _save_safetensors({"encoder.w": np.zeros(3, np.float32)}, tmp_path / "odd.safetensors")
    with pytest.raises(
        ValueError, match=r"unknown checkpoint layout \(first keys \['encoder.w'\]\).*moco_v3"
    ):
        _convert(tmp_path, "torchvision_basic_zip", checkpoint=path)


class _Evil:
    """Pickles as a call of os.system (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_zip(path, marker):
    payload = pickle.dumps({"state_dict": {}, "x": _Evil(marker)}, protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    return str(path)


def _evil_legacy(path, marker):
    with open(path, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL, {}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"state_dict": {}, "x": _Evil(marker)}, f, protocol=2)
        pickle.dump([], f, protocol=2)
        f.write(struct.pack("<q", 0))
    return str(path)


@pytest.mark.parametrize("write", [_evil_zip, _evil_legacy])
def test_a_pickle_calling_a_forbidden_global_is_refused_without_running_it(tmp_path, write):
    marker = tmp_path / "pwned"
    path = write(tmp_path / "evil.pth", marker)
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"global (posix|os)\.system"):
        checkpoint_io.read_checkpoint(path)
    assert not marker.exists()


def test_reader_rebuilds_strided_and_scalar_tensors_of_both_formats():
    for name in ("torchvision_basic_zip", "torchvision_basic_legacy"):
        state = _state(name)
        assert state["bn1.num_batches_tracked"].shape == ()
        assert int(state["bn1.num_batches_tracked"]) == 7
        assert state["conv1.weight"].shape == (3, 3, 7, 7)
        assert state["conv1.weight"].flags.c_contiguous
    dino = torch_pickle.load(os.path.join(DATA, "dino_full.pth"))
    assert isinstance(dino["args"], argparse.Namespace) and dino["args"].arch == "resnet50"
    safetensors = checkpoint_io.read_checkpoint(os.path.join(DATA, "torchvision_basic.safetensors"))
    zipped = _state("torchvision_basic_zip")
    for key, value in safetensors.containers[""].items():
        np.testing.assert_array_equal(value, zipped[key])


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "kd_keras.convert", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_converts_and_reports_bad_input_in_one_line_with_exit_code_2(tmp_path):
    fixture = FIXTURES["swav"]
    out = tmp_path / "swav"
    ok = _run_cli(
        f"--checkpoint={os.path.join(DATA, fixture['file'])}",
        f"--arch={fixture['arch']}",
        f"--out={out}",
    )
    assert ok.returncode == 0, ok.stderr
    assert "layout swav" in ok.stdout and (out / "prototypes.npy").is_file()
    again = _run_cli(
        f"--checkpoint={os.path.join(DATA, fixture['file'])}", "--arch=resnet50", f"--out={out}"
    )
    assert again.returncode == 2
    lines = [line for line in again.stderr.splitlines() if line.startswith("kd_keras.convert")]
    assert lines == [f"kd_keras.convert: error: --out={out} exists; remove it or pass --overwrite."]
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(checkpoint="/nonexistent.pth"), "--checkpoint: .*nonexistent.pth does not exist"),
        (dict(arch="resnet51"), "--arch: unknown architecture 'resnet51'"),
        (dict(layout="simclr"), "--layout=simclr does not apply to a torch_zip checkpoint"),
        (dict(layout="moco"), r"layout moco: no backbone stem \['module.encoder_q.conv1.weight'"),
        (dict(norm="imagenet255"), "--norm=imagenet255: choose one of"),
    ],
)
def test_bad_input_names_the_flag(tmp_path, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _convert(tmp_path, "torchvision_basic_zip", **kwargs)
    assert not os.path.exists(tmp_path / "torchvision_basic_zip")


def test_files_that_are_no_checkpoint_are_named(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth: cannot read it as a PyTorch checkpoint"):
        checkpoint_io.read_checkpoint(str(text))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        checkpoint_io.read_checkpoint(str(broken))
    with pytest.raises(ValueError, match="directory without a TF checkpoint"):
        checkpoint_io.read_checkpoint(str(tmp_path))
    bare = tmp_path / "list.pth"
    with open(bare, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL, {}, [1, 2], []):
            pickle.dump(header, f, protocol=2)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        checkpoint_io.read_checkpoint(str(bare))


def test_config_from_flags_requires_checkpoint_and_out():
    fv = types.SimpleNamespace(
        checkpoint=None, out="/x", arch="resnet50", layout=None, norm="layout", overwrite=False
    )
    from kd_keras import convert as convert_cli

    with pytest.raises(ValueError, match="--checkpoint is required"):
        convert_cli.config_from_flags(fv)


def test_skipped_tensors_are_never_read(tmp_path, monkeypatch):
    reads = []
    real = torch_pickle._storage_array

    def counting(raw, storage_type):
        reads.append(len(raw))
        return real(raw, storage_type)

    monkeypatch.setattr(torch_pickle, "_storage_array", counting)
    _, manifest = _convert(tmp_path, "moco_v2")
    # One read per mapped tensor; the key encoder, queue, MLP and optimizer state stay on disk.
    assert len(reads) == len(manifest["mapping"]) < len(manifest["skipped"])


@pytest.mark.parametrize(
    "option, flag", [({"image_size": 224}, "--image_size"), ({"pool": "avg"}, "--pool")]
)
def test_vit_options_are_refused_for_a_resnet(tmp_path, option, flag):
    cfg = convert.ConvertConfig(
        checkpoint="/no/such.pth", out=str(tmp_path / "o"), arch="resnet18", **option
    )
    with pytest.raises(ValueError, match=f"{flag} is a ViT option; --arch=resnet18 is not a ViT"):
        convert.convert(cfg)
    assert not (tmp_path / "o").exists()
