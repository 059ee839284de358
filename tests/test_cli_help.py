"""`--help` of every command line: a user-level summary on stdout, exit code 0."""

import os
import subprocess
import sys

import pytest
from absl import flags

from kd_keras import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["train", "cache_teacher", "experiment", "launch"]
SLOW = ["evaluate", "convert"]  # these import TensorFlow with their flags


def _help(command, arg="--help"):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-m", f"kd_keras.{command}", arg],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def _check(command, result):
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: kd_keras.{command} ")
    assert "most used flags:" in result.stdout
    assert f"kd_keras.{command} --helpfull" in result.stdout
    assert result.stderr == ""  # no TensorFlow banners, no absl chatter


@pytest.mark.parametrize("command", FAST)
def test_help_is_a_summary_and_exits_0(command):
    _check(command, _help(command))


def test_train_help_names_choices_and_short_form():
    result = _help("train", "-h")
    _check("train", result)
    assert "one of simreg, regress, regress_bn" in result.stdout
    assert "torch:ARCH=CHECKPOINT" in result.stdout
    assert "paper 00" not in result.stdout and "repeat this option" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", SLOW)
def test_help_of_the_tensorflow_commands(command):
    _check(command, _help(command))


def test_help_text_lists_the_given_flags_with_choices_and_defaults():
    values = flags.FlagValues()
    flags.DEFINE_enum("colour", "red", ["red", "blue"], "Paint colour.", flag_values=values)
    flags.DEFINE_integer("size", 3, "Brush size.", flag_values=values)
    text = cli.help_text("paint", "Paints things.", ["colour", "size", "missing"], values)
    assert "Paints things." in text
    assert "  --colour\n      Paint colour. (one of red, blue; default red)" in text
    assert "  --size\n      Brush size. (default 3)" in text
    assert "--missing" not in text
