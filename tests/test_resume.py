"""Step-exact resuming: a run stopped anywhere, even by SIGKILL, ends like an uninterrupted one."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from kd_keras import config
from kd_keras.artifacts import checkpointing
from kd_keras.training import run as train
from tests.helpers import h5_arrays

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(workdir, teacher, **overrides):
    cfg = config.Config(
        workdir=str(workdir),
        log_images=0,
        verbose=0,
        evaluate=False,
        export=False,
        save_freq=2,
        data=config.DataConfig(image_size=8, shuffle_buffer=256),
        model=config.ModelConfig(student="convnet_tiny", teachers=(teacher,), head="mlp2"),
        optim=config.OptimConfig(batch_size=32, epochs=3, steps_per_epoch=5, lr=0.4),
    )
    return dataclasses.replace(cfg, **overrides)


class _StopAtStep(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise KeyboardInterrupt("simulated pre-emption")


@pytest.mark.slow
def test_run_stopped_mid_epoch_resumes_at_the_exact_step(tmp_path, teacher_file):
    _, straight = train.run_and_return_model(_cfg(tmp_path / "straight", teacher_file))
    cfg = _cfg(tmp_path / "resumed", teacher_file)
    # Step 7 is inside the 2nd epoch; the newest checkpoint is step 6 (--save_freq=2).
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, extra_callbacks=[_StopAtStep(7)])
    assert checkpointing.available_steps(tmp_path / "resumed" / "checkpoints") == [6, 5]
    resumed_steps = []

    class _Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            resumed_steps.append(int(self.model.optimizer.iterations.numpy()))

    results, resumed = train.run_and_return_model(cfg, extra_callbacks=[_Steps()])
    assert resumed_steps == list(range(7, 16))  # nothing repeated, nothing skipped
    assert results["steps"] == 15
    np.testing.assert_allclose(
        results["final_learning_rate"], float(straight.optimizer.learning_rate.numpy())
    )
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_checkpoints_are_replaced_atomically_and_two_are_kept(tmp_path, teacher_file):
    cfg = _cfg(tmp_path / "run", teacher_file)
    train.run(cfg)
    ckpt = tmp_path / "run" / "checkpoints"
    state = json.loads((ckpt / "checkpoint.json").read_text())
    assert state["step"] == 15
    assert sorted(os.listdir(ckpt)) == [
        "checkpoint.json",
        "ckpt-000000014.weights.h5",
        "ckpt-000000015.weights.h5",
    ]


def _train_cmd(workdir, teacher):
    return [
        sys.executable,
        "-m",
        "kd_keras.train",
        f"--workdir={workdir}",
        f"--teacher={teacher}",
        "--student=convnet_tiny",
        "--head=mlp2",
        "--image_size=8",
        "--batch_size=32",
        "--epochs=3",
        "--steps_per_epoch=6",
        "--lr=0.4",
        "--save_freq=2",
        "--shuffle_buffer=256",
        "--evaluate=false",
        "--export=false",
        "--log_images=0",
        "--verbose=0",
    ]


@pytest.mark.slow
def test_sigkill_mid_run_then_same_command_ends_like_an_uninterrupted_run(tmp_path, teacher_file):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = subprocess.Popen(
        _train_cmd(straight_dir, teacher_file), cwd=REPO, env=env, stderr=subprocess.PIPE
    )
    victim = subprocess.Popen(
        _train_cmd(killed_dir, teacher_file), cwd=REPO, env=env, stderr=subprocess.PIPE
    )
    try:
        # Kill as soon as a checkpoint exists and before the run could finish.
        deadline = time.time() + 240
        while not checkpointing.available_steps(killed_dir / "checkpoints"):
            assert victim.poll() is None, victim.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        assert victim.returncode == -signal.SIGKILL
        killed_at = checkpointing.available_steps(killed_dir / "checkpoints")[0]
        assert killed_at < 18
        assert not (killed_dir / "results.json").exists()
        again = subprocess.run(
            _train_cmd(killed_dir, teacher_file), cwd=REPO, env=env, capture_output=True, text=True
        )
        assert again.returncode == 0, again.stderr
        assert straight.wait(timeout=240) == 0, straight.stderr.read().decode()
    finally:
        for proc in (straight, victim):
            if proc.poll() is None:
                proc.kill()
    a = json.loads((straight_dir / "results.json").read_text())
    b = json.loads((killed_dir / "results.json").read_text())
    assert a["steps"] == b["steps"] == 18
    assert b["final_learning_rate"] == pytest.approx(a["final_learning_rate"], abs=1e-9)
    wa = h5_arrays(straight_dir / "checkpoints" / "ckpt-000000018.weights.h5")
    wb = h5_arrays(killed_dir / "checkpoints" / "ckpt-000000018.weights.h5")
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        np.testing.assert_allclose(wa[key], wb[key], rtol=1e-4, atol=1e-5, err_msg=key)
