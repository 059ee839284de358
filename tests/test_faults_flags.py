"""Bad flags end in one line naming the flag or file, exit code 2 (issue 11)."""

import os
import subprocess
import sys

import pytest

from kd_keras import config as config_lib

config_lib.define_flags()
FLAGS = config_lib.FLAGS


def _parse(argv):
    """parse_command_line on fresh flags; returns the parsed FLAGS."""
    FLAGS.unparse_flags()
    config_lib.parse_command_line(["prog", *argv], prog="kd_keras.train")
    return FLAGS


def _one_line_exit(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kd_keras.train: error: ") and "\n" not in err, err
    return err


def _preset(tmp_path):
    preset = tmp_path / "preset.cfg"
    preset.write_text("--method=simreg\n--teacher=recipe:supervised\n--teacher_cache=/c1\n")
    return preset


def test_command_line_teacher_replaces_the_flagfile_list(tmp_path):
    fv = _parse([f"--flagfile={_preset(tmp_path)}", "--teacher=/m.keras", "--teacher", "/n"])
    assert fv.teacher == ["/m.keras", "/n"]
    assert fv.teacher_cache == ["/c1"]  # only the flags given on the command line are replaced


def test_plus_equals_appends_to_the_flagfile_list(tmp_path):
    fv = _parse([f"--flagfile={_preset(tmp_path)}", "--teacher+=/m.keras"])
    assert fv.teacher == ["recipe:supervised", "/m.keras"]
    fv = _parse([f"--flagfile={_preset(tmp_path)}"])
    assert fv.teacher == ["recipe:supervised"]
    # Once a plain `=` is given the flagfile's values go; the command line's stay in order.
    fv = _parse([f"--flagfile={_preset(tmp_path)}", "--teacher+=/a", "--teacher=/b"])
    assert fv.teacher == ["/a", "/b"]


def test_nested_flagfile_teacher_is_replaced_too(tmp_path):
    inner = _preset(tmp_path)
    outer = tmp_path / "outer.cfg"
    outer.write_text(f"--flagfile={inner}\n--teacher=app:resnet50=imagenet\n")
    fv = _parse(["--flagfile", str(outer), "--teacher=/x"])
    assert fv.teacher == ["/x"]


@pytest.mark.parametrize("cycle", [1, 2])
def test_self_including_flagfile_is_an_error(tmp_path, capsys, cycle):
    a, b = tmp_path / "a.cfg", tmp_path / "b.cfg"
    if cycle == 1:
        a.write_text(f"--seed=3\n--flagfile={a}\n")
    else:
        a.write_text(f"--flagfile={b}\n")
        b.write_text(f"--seed=3\n--flagfile={a}\n")
    err = _one_line_exit([f"--flagfile={a}"], capsys)
    assert "a.cfg includes itself" in err


def test_missing_flagfile_is_one_line(tmp_path, capsys):
    err = _one_line_exit([f"--flagfile={tmp_path}/none.cfg"], capsys)
    assert "none.cfg" in err


@pytest.mark.parametrize(
    "argv, flag",
    [(["--method=bogus"], "method"), (["--head=mlp9"], "head"), (["--nope=1"], "nope")],
)
def test_unknown_enum_value_or_flag_is_one_line(capsys, argv, flag):
    assert flag in _one_line_exit(argv, capsys)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--lr=nan"], "--lr"),
        (["--lr=inf"], "--lr"),
        (["--momentum=nan"], "--momentum"),
        (["--warmup_epochs=-inf"], "--warmup_epochs"),
        (["--final_lr=nan"], "--final_lr"),
        (["--temperature=inf"], "--temperature"),
        (["--proj_dropout=nan,0.1"], "--proj_dropout"),
        (["--large_crop_scale=0.1,inf"], "--large_crop_scale"),
    ],
)
def test_non_finite_floats_are_rejected(tmp_path, argv, flag):
    fv = _parse([f"--workdir={tmp_path}", "--teacher=/t", *argv])
    with pytest.raises(ValueError, match=flag):
        config_lib.config_from_flags(fv)


def test_train_command_line_unknown_method_exits_2():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-m", "kd_keras.train", "--method=bogus", "--workdir=/tmp/x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_keras.train: error:") and "method" in last


@pytest.mark.parametrize("content", [b"just some text\n", b""])
def test_keras_teacher_that_is_not_a_model_says_so(tmp_path, content):
    from kd_keras.teachers import loading as teachers

    path = tmp_path / "teacher.keras"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a Keras model file") as err:
        teachers.load_teacher(str(path), image_size=16)
    assert str(path) in str(err.value) and "File not found" not in str(err.value)
