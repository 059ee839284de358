"""A resume that is refused leaves the run as it was; one that is accepted says what changed
(issue 22)."""

import dataclasses
import logging

import keras
import pytest

from kd_keras import config
from kd_keras.training import run as train


def _cfg(workdir, teacher, **overrides):
    cfg = config.Config(
        workdir=str(workdir),
        log_images=0,
        verbose=0,
        evaluate=False,
        export=False,
        save_freq=2,
        data=config.DataConfig(image_size=8, shuffle_buffer=64),
        model=config.ModelConfig(student="convnet_tiny", teachers=(teacher,), head="mlp2"),
        optim=config.OptimConfig(batch_size=32, epochs=2, steps_per_epoch=2, lr=0.4),
    )
    return dataclasses.replace(cfg, **overrides)


class _StopAtStep(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 2:
            raise KeyboardInterrupt("simulated pre-emption")


@pytest.fixture
def stopped_run(tmp_path, teacher_file):
    """A run stopped after its checkpoint of step 2: (config, config.json text)."""
    cfg = _cfg(tmp_path / "run", teacher_file)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, extra_callbacks=[_StopAtStep()])
    return cfg, (tmp_path / "run" / "config.json").read_text()


def test_a_refused_resume_names_the_change_and_keeps_config_json(stopped_run):
    cfg, saved = stopped_run
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, head="mlp4"))
    with pytest.raises(ValueError) as err:
        train.run(other)
    message = str(err.value)
    assert "\n" not in message
    assert "its checkpoint of step 2 does not fit this command's configuration" in message
    assert "changed: model.head: mlp2 -> mlp4" in message
    with open(f"{cfg.workdir}/config.json") as f:
        assert f.read() == saved


def test_an_accepted_resume_logs_each_change_and_then_saves(stopped_run, caplog):
    cfg, saved = stopped_run
    more = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=3))
    with caplog.at_level(logging.WARNING, logger="kd_keras"):
        results = train.run(more)
    assert results["steps"] == 6
    assert "differs from this command's configuration (optim.epochs: 2 -> 3)" in caplog.text
    with open(f"{cfg.workdir}/config.json") as f:
        assert f.read() == more.to_json() + "\n" != saved


def test_config_changes_name_nested_settings():
    old = {"a": 1, "b": {"c": "x", "d": [1, 2]}}
    new = {"a": 1, "b": {"c": "y", "d": [1, 2]}, "e": None}
    assert train.config_changes(old, new) == ["b.c: x -> y", "e: (unset) -> null"]
