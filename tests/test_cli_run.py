"""kd_keras.train as a user meets it: fast answers to bad paths, no workdir left by a failed
start, stage headings and a final summary that says where everything is."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args, code=None):
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = ["-m", "kd_keras.train", *args] if code is None else ["-c", code]
    return subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def _main_without_tensorflow(*args):
    """Runs kd_keras.train's command line in-process; prints the exit code and whether
    TensorFlow got imported."""
    return (
        "import sys\n"
        f"sys.argv = ['kd_keras.train', *{list(args)!r}]\n"
        "from kd_keras import train\n"
        "try:\n"
        "    train.run_cli()\n"
        "except SystemExit as stop:\n"
        "    print('exit', stop.code, 'tensorflow' in sys.modules)\n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "--workdir is required"),
        (("--workdir=/tmp/x", "--dataset=/no/such/folder"), "image-folder root does not exist"),
        (("--workdir=/etc/hostname",), "is a file, not a directory"),
    ],
)
def test_bad_paths_are_reported_before_tensorflow_loads(args, message):
    result = _train(code=_main_without_tensorflow(*args, "--teacher=recipe:supervised"))
    assert "exit 2 False" in result.stdout, result.stderr[-2000:]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_failed_start_leaves_no_workdir(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    workdir = tmp_path / "run"
    result = _train(f"--workdir={workdir}", f"--dataset={empty}", "--teacher=recipe:supervised")
    assert result.returncode == 2 and str(empty) in result.stderr
    assert not workdir.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    _train(f"--workdir={existing}", f"--dataset={empty}", "--teacher=recipe:supervised")
    assert (existing / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_recipe_run_has_stage_headings_and_a_summary(tmp_path):
    workdir = tmp_path / "run"
    result = _train(
        f"--workdir={workdir}",
        "--teacher=recipe:supervised",
        "--teacher_recipe_backbone=resnet_tiny",
        "--teacher_recipe_epochs=1",
        "--student=resnet_tiny",
        "--image_size=8",
        "--epochs=1",
        "--batch_size=64",
        "--verbose=0",
        "--log_images=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "1/2 training the recipe teacher 'supervised'" in out
    assert "2/2 distilling into the student resnet_tiny (simreg)" in out
    assert out.index("1/2 training") < out.index("2/2 distilling")
    assert "== supervised | network resnet_tiny" in out  # the recipe is not a "student"
    assert f"results:     {workdir}/results.json" in out
    assert f"TensorBoard: tensorboard --logdir {workdir}/logs" in out
    assert "export:      " in out and "keras.models.load_model" in out
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr
    # TensorFlow's SavedModel writer logs at INFO through absl: warnings only, as promised.
    assert "Assets written to" not in result.stderr and "fingerprint" not in result.stderr
    assert "k-NN                  network:" in out  # the recipe's k-NN line, too
