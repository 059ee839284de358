"""A resume that is refused leaves the run as it was; one that is accepted says what changed
(issue 22)."""

import dataclasses
import logging
import os

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


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda c: dataclasses.replace(c, optim=dataclasses.replace(c.optim, batch_size=16)),
            "global_batch_size: 32 -> 16",
        ),
        (lambda c: dataclasses.replace(c, seed=7), "seed: 0 -> 7"),
        (
            lambda c: dataclasses.replace(c, data=dataclasses.replace(c.data, crop_scale_min=0.5)),
            "views.crop_scale_min: 0.2 -> 0.5",
        ),
    ],
)
def test_a_resume_with_other_data_settings_is_refused_naming_each(stopped_run, edit, expected):
    cfg, saved = stopped_run
    with pytest.raises(train.UsageError) as err:
        train.run(edit(cfg))
    message = str(err.value)
    assert "its checkpoint of step 2 was trained with other data settings" in message
    assert expected in message and "\n" not in message
    with open(f"{cfg.workdir}/config.json") as f:
        assert f.read() == saved


def test_a_folder_listing_changes_when_files_are_added_removed_or_renamed(tmp_path):
    import numpy as np
    from PIL import Image

    from kd_keras.data import sources

    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
                tmp_path / "train" / name / f"{i}.png"
            )

    def listing():
        return sources.load_split(str(tmp_path), "train", verify=False)[1].listing_hash

    first = listing()
    assert listing() == first  # deterministic
    os.utime(tmp_path / "train" / "a" / "0.png", (0, 0))
    assert listing() == first  # a touched file is the same example
    (tmp_path / "train" / "a" / "0.png").rename(tmp_path / "train" / "a" / "9.png")
    renamed = listing()
    (tmp_path / "train" / "b" / "1.png").unlink()
    removed = listing()
    assert len({first, renamed, removed}) == 3


def test_a_checkpoint_beyond_the_runs_length_is_refused(stopped_run, tmp_path):
    cfg, _ = stopped_run
    shorter = dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, epochs=1, steps_per_epoch=1)
    )
    with pytest.raises(
        train.UsageError, match="checkpoint is of step 2, beyond this run's 1 steps"
    ):
        train.run(shorter)


def test_a_copied_in_checkpoint_is_named_as_unverified(stopped_run, caplog):
    cfg, _ = stopped_run
    ckpt = os.path.join(cfg.workdir, "checkpoints")
    os.remove(os.path.join(ckpt, "checkpoint.json"))  # the file alone, as if copied in
    with caplog.at_level(logging.WARNING, logger="kd_keras"):
        results = train.run(cfg)
    assert results["steps"] == 4
    assert (
        "resuming at step 2 from a checkpoint that checkpoint.json does not record" in caplog.text
    )
