"""Hostile and careless PyTorch checkpoints: each ends in one clear error, reads no foreign
memory, stays within a memory bound and writes nothing (issue 22). Files by tests/hostile.py."""

import io
import os
import pickle

import numpy as np
import pytest

from kd_keras.teachers import checkpoint_io, converted_dir, torch_pickle
from kd_keras.teachers import conversion as convert
from tests import hostile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWAV = os.path.join(REPO, "tests", "data", "convert", "swav.pth.tar")
SWAV_ARCH = "resnet-bottleneck-1.2.1.1-2"
ENV = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
WRITERS = [hostile.write_zip, hostile.write_legacy]
BOMB_BYTES = 200 << 20  # what the bomb members inflate to
# Peak RSS of a child reading a checkpoint without TensorFlow (numpy alone: ~35 MB).
READER_BOUND_MB = 120


def _weights(**tensors):
    return {
        "state_dict": {"fc.weight": hostile.tensor(np.ones((2, 2), np.float32), "w"), **tensors}
    }


def _read_all(path):
    """What a conversion does with the tensors it maps: read each one."""
    source = checkpoint_io.read_checkpoint(path)
    return {k: np.asarray(v) for c in source.containers.values() for k, v in c.items()}


@pytest.mark.parametrize("write", WRITERS)
@pytest.mark.parametrize(
    "offset, size, stride, message",
    [
        (-1, (2,), (1,), "storage offset -1"),
        (3, (2,), (1,), r"runs past its storage \(4 elements\)"),
        (0, (2, 2), (-1, 1), "stride -1"),
        (0, (2, -2), (1, 1), "size -2"),
        (0, (3, 2), (2, 1), r"runs past its storage"),
    ],
)
def test_offsets_sizes_and_strides_outside_the_storage_are_refused(
    tmp_path, write, offset, size, stride, message
):
    storage = hostile.Storage("s", np.arange(4, dtype=np.float32))
    path = write(tmp_path / "bad.pth", _weights(x=hostile.Tensor(storage, size, stride, offset)))
    with pytest.raises(ValueError, match=message) as err:
        _read_all(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("write", WRITERS)
def test_a_view_at_the_storage_end_is_still_read(tmp_path, write):
    storage = hostile.Storage("s", np.arange(6, dtype=np.float32))
    path = write(tmp_path / "ok.pth", _weights(x=hostile.Tensor(storage, (2, 2), (1, 2), 1)))
    np.testing.assert_array_equal(_read_all(path)["x"], [[1, 3], [2, 4]])


def test_a_legacy_storage_whose_count_differs_from_its_declaration_is_refused(tmp_path):
    storage = hostile.Storage("s", np.arange(4, dtype=np.float32), numel=400)
    path = hostile.write_legacy(tmp_path / "bad.pth", _weights(x=hostile.Tensor(storage, (4,))))
    with pytest.raises(ValueError, match="storage s holds 4 elements, its tensors declare 400"):
        _read_all(path)


def test_more_elements_than_the_cap_are_refused_before_reading(tmp_path):
    # Stride 0 over one element: 2^29 elements (2 GiB as float32) claimed by 4 bytes.
    storage = hostile.Storage("s", np.zeros(1, np.float32))
    huge = hostile.Tensor(storage, (1 << 15, 1 << 14), (0, 0))
    path = hostile.write_zip(tmp_path / "bad.pth", _weights(x=huge))
    with pytest.raises(ValueError, match="has more than 268435456 elements"):
        checkpoint_io.read_checkpoint(path)


def _bomb(tmp_path, declared):
    """A 4-element tensor on a deflated storage member of BOMB_BYTES zeros (~200 KB on disk)
    that declares `declared` elements."""
    storage = hostile.Storage("s", np.zeros(4, np.float32), numel=declared, raw=BOMB_BYTES)
    path = hostile.write_zip(
        tmp_path / "bomb.pth", _weights(x=hostile.Tensor(storage, (2, 2))), deflate=True
    )
    assert os.path.getsize(path) < BOMB_BYTES // 100
    return path


_READ_IN_CHILD = """
import sys
import numpy as np
from kd_keras.teachers import checkpoint_io
try:
    source = checkpoint_io.read_checkpoint({path!r})
    arrays = [np.asarray(v) for c in source.containers.values() for v in c.values()]
    print("read", sum(a.size for a in arrays))
except ValueError as err:
    print("error:", err)
"""


def test_a_deflate_bomb_member_larger_than_its_storage_is_refused_in_bounded_memory(tmp_path):
    path = _bomb(tmp_path, declared=4)
    out = hostile.peak_rss(_READ_IN_CHILD.format(path=path), ENV)
    assert out["returncode"] == 0, out["stderr"]
    assert (
        out["stdout"].startswith("error:") and "more than its declared 4 elements" in out["stdout"]
    )
    assert out["peak_mb"] < READER_BOUND_MB, out


def test_a_storage_is_inflated_only_as_far_as_its_tensors_reach(tmp_path):
    # Declared honestly (200 MB of storage), but the only tensor uses its first 4 elements.
    path = _bomb(tmp_path, declared=BOMB_BYTES // 4)
    out = hostile.peak_rss(_READ_IN_CHILD.format(path=path), ENV)
    assert out["stdout"].strip() == "read 8", out  # fc.weight and x: 4 elements each
    assert out["peak_mb"] < READER_BOUND_MB, out


def _shared_list(depth):
    """A list shared along 2^depth paths: [[a, a], [a, a]] ... depth levels."""
    item = [1]
    for _ in range(depth):
        item = [item, item]
    return item


def test_shared_containers_are_walked_once(tmp_path):
    loop = []
    loop.append(loop)
    # In dict entries, which the reader describes by counting their tensors.
    path = hostile.write_zip(
        tmp_path / "shared.pth",
        {**_weights(), "extra": {"s": _shared_list(60), "w": _weights()}, "loop": {"l": loop}},
    )
    source = checkpoint_io.read_checkpoint(path)  # 2^60 paths: hangs unless walked once
    assert source.other == {
        "extra": "dict with 2 entries, 1 tensors",
        "loop": "dict with 1 entries, 0 tensors",
    }
    loaded = torch_pickle.load(path)  # a RecursionError unless walked once
    assert loaded["loop"]["l"][0] is loaded["loop"]["l"]
    assert loaded["extra"]["w"]["state_dict"]["fc.weight"].tolist() == [[1, 1], [1, 1]]


@pytest.mark.parametrize("write", WRITERS)
def test_containers_nested_too_deep_are_one_line_errors(tmp_path, write):
    deep = []
    for _ in range(200):
        deep = [deep]
    path = write(tmp_path / "deep.pth", {**_weights(), "extra": {"deep": deep}})
    with pytest.raises(ValueError, match="containers nested deeper than 64 levels") as err:
        checkpoint_io.read_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(torch_pickle.CheckpointFormatError, match="nested deeper"):
        torch_pickle.load(path)


def _swav_with_prototypes(tmp_path, prototypes):
    """The SwAV fixture rewritten with `prototypes` as module.prototypes.weight."""
    state = torch_pickle.load(SWAV)["state_dict"]
    tensors = {k: hostile.tensor(v, str(i)) for i, (k, v) in enumerate(state.items())}
    tensors["module.prototypes.weight"] = prototypes
    return hostile.write_zip(tmp_path / "swav.pth", {"state_dict": tensors})


def test_swav_prototypes_are_checked_before_they_are_read(tmp_path, monkeypatch):
    one = hostile.Storage("p", np.ones(1, np.float32))
    path = _swav_with_prototypes(tmp_path, hostile.Tensor(one, (1 << 24, 8), (0, 0)))
    reads = []
    real = torch_pickle._storage_array
    monkeypatch.setattr(
        torch_pickle, "_storage_array", lambda raw, t: reads.append(len(raw)) or real(raw, t)
    )
    cfg = convert.ConvertConfig(checkpoint=path, out=str(tmp_path / "out"), arch=SWAV_ARCH)
    with pytest.raises(
        ValueError, match=r"prototypes.weight rows \(K\) is 16777216, expected 1..65536"
    ):
        convert.convert(cfg)
    assert reads == [] and not os.path.exists(tmp_path / "out")


def _run_convert(*args):
    code = (
        "import sys; from kd_keras import convert; "
        f"sys.argv = ['kd_keras.convert', *{list(args)!r}]; convert.run_cli()"
    )
    return hostile.peak_rss(code, ENV)


@pytest.mark.slow
def test_cli_refuses_forged_prototypes_in_one_line_and_bounded_memory(tmp_path):
    # [2^24, 8] floats from one stored element: 512 MB per copy once materialised.
    one = hostile.Storage("p", np.ones(1, np.float32))
    path = _swav_with_prototypes(tmp_path, hostile.Tensor(one, (1 << 24, 8), (0, 0)))
    out = _run_convert(f"--checkpoint={path}", f"--arch={SWAV_ARCH}", f"--out={tmp_path}/out")
    assert out["returncode"] == 2, out["stderr"][-2000:]
    lines = [line for line in out["stderr"].splitlines() if line.startswith("kd_keras.convert")]
    assert len(lines) == 1 and "expected 1..65536" in lines[0], out["stderr"][-2000:]
    assert "Traceback" not in out["stderr"] and not os.path.exists(tmp_path / "out")
    # TensorFlow and Keras alone take several hundred MB; the forged tensor would add >1 GB.
    assert out["peak_mb"] < 1200, out["peak_mb"]


@pytest.mark.slow
def test_overwrite_replaces_only_a_converted_teacher(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    # A checkpoint that converts: the directory would be replaced after a successful conversion.
    fixture = os.path.join(REPO, "tests", "data", "convert", "torchvision_basic_zip.pth")
    args = [f"--checkpoint={fixture}", "--arch=resnet-basic-2.1.1.1-3"]
    out = _run_convert(*args, f"--out={precious}", "--overwrite")
    assert out["returncode"] == 2
    lines = [line for line in out["stderr"].splitlines() if line.startswith("kd_keras.convert")]
    assert lines == [
        f"kd_keras.convert: error: --out={precious} is not a kd_keras converted teacher (no "
        "manifest.json of kind kd_keras_converted_teacher); --overwrite refuses to delete it."
    ]
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(os.listdir(tmp_path)) == ["home"]


def test_overwrite_accepts_an_earlier_conversion_and_an_empty_directory(tmp_path):
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "manifest.json").write_text(
        '{"kind": "kd_keras_converted_teacher", "source": {}, "mapping": {}}'
    )
    converted_dir.check_out(str(converted), overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    converted_dir.check_out(str(empty), overwrite=True)
    (empty / "x").write_text("")
    with pytest.raises(ValueError, match="not a kd_keras converted teacher"):
        converted_dir.check_out(str(empty), overwrite=True)


# --- The restricted unpickler -------------------------------------------------------------------


def _build_on_global(module, name, slot_state):
    """A pickle applying BUILD to the global module.name (setting attributes on it)."""
    state = pickle.dumps((None, slot_state), protocol=2)[2:-1]  # without PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + state + b"b."


@pytest.mark.parametrize(
    "module, name",
    [("torch._utils", "_rebuild_tensor_v2"), ("numpy", "dtype"), ("torch", "FloatStorage")],
)
def test_a_pickle_cannot_modify_the_allowed_globals(tmp_path, module, name):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (hostile.LEGACY_MAGIC, hostile.LEGACY_PROTOCOL, {}):
            pickle.dump(header, f, protocol=2)
        f.write(_build_on_global(module, name, {"__defaults__": (None,), "dtype": "x"}))
    with pytest.raises(ValueError, match="tried to modify"):
        checkpoint_io.read_checkpoint(str(path))
    assert torch_pickle._rebuild_tensor.__defaults__ is None
    # A later load in the same process is unaffected.
    ok = hostile.write_legacy(tmp_path / "ok.pth", _weights())
    assert _read_all(ok)["fc.weight"].tolist() == [[1, 1], [1, 1]]


def test_the_tensor_type_a_pickle_alters_is_its_own(tmp_path):
    data = _build_on_global("torch", "Tensor", {"marker": 1})
    loaded = torch_pickle.RestrictedUnpickler(io.BytesIO(data), None).load()
    assert loaded.marker == 1 and not hasattr(torch_pickle._TensorType, "marker")


def test_protocol_2_sets_with_builtin_module_names_are_accepted(tmp_path):
    path = hostile.write_zip(tmp_path / "set.pth", {**_weights(), "tags": {"a"}, "f": frozenset()})
    assert b"__builtin__\nset" in hostile.dumps({"s": {1}})[0]
    source = checkpoint_io.read_checkpoint(path)
    assert source.other == {"tags": "set", "f": "frozenset"}


def test_a_legacy_pickle_claiming_a_huge_string_names_the_reason(tmp_path):
    path = tmp_path / "huge.pth"
    path.write_bytes(b"\x80\x04\x8e" + (1 << 60).to_bytes(8, "little") + b"xx")
    with pytest.raises(ValueError, match=r"\(MemoryError: a length in the file is too large\)"):
        checkpoint_io.read_checkpoint(str(path))


def test_hostile_helper_writes_what_torch_pickle_reads_back(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    for write in WRITERS:
        loaded = torch_pickle.load(
            write(tmp_path / f"{write.__name__}.pth", _weights(a=hostile.tensor(a, "a")))
        )
        np.testing.assert_array_equal(loaded["state_dict"]["a"], a)
