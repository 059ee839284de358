"""Issue 22, case 8 and the silent resumes: what a changed resume does to a stopped run.

  PYTHONPATH=/tmp/before22 python scripts/resume_refusal.py /tmp/rr_before   # before
  PYTHONPATH=. python scripts/resume_refusal.py /tmp/rr_after                 # after

A tiny run (digits at 8 px, convnet_tiny, 2 epochs of 2 steps) is stopped after step 2, then
resumed once per change; each line prints the outcome (first line of the error, or the steps
it ended at) and whether config.json was rewritten.
"""

import dataclasses
import os
import shutil
import sys

import keras

from kd_keras import config
from kd_keras.nets import backbones
from kd_keras.training import run as train


class _StopAtStep2(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 2:
            raise KeyboardInterrupt


def _stopped_run(root, teacher):
    cfg = config.Config(
        workdir=os.path.join(root, "run"), log_images=0, verbose=0, evaluate=False,
        export=False, save_freq=2,
        data=config.DataConfig(image_size=8, shuffle_buffer=64),
        model=config.ModelConfig(student="convnet_tiny", teachers=(teacher,), head="mlp2"),
        optim=config.OptimConfig(batch_size=32, epochs=2, steps_per_epoch=2, lr=0.4),
    )  # fmt: skip
    shutil.rmtree(cfg.workdir, ignore_errors=True)
    try:
        train.run(cfg, extra_callbacks=[_StopAtStep2()])
    except KeyboardInterrupt:
        pass
    return cfg


def main(root):
    os.makedirs(root, exist_ok=True)
    teacher = os.path.join(root, "teacher.keras")
    keras.utils.set_random_seed(11)
    backbones.build_backbone("convnet_tiny", 8).save(teacher)
    changes = {
        "--head=mlp4": lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, head="mlp4")),
        "--batch_size=16": lambda c: dataclasses.replace(c, optim=dataclasses.replace(c.optim, batch_size=16)),
        "--seed=7": lambda c: dataclasses.replace(c, seed=7),
        "--epochs=3 (allowed)": lambda c: dataclasses.replace(c, optim=dataclasses.replace(c.optim, epochs=3)),
    }  # fmt: skip
    for name, edit in changes.items():
        cfg = _stopped_run(root, teacher)
        path = os.path.join(cfg.workdir, "config.json")
        saved = open(path).read()
        try:
            outcome = f"ran to step {train.run(edit(cfg))['steps']}"
        except Exception as err:  # noqa: BLE001 - the outcome is what is reported
            outcome = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
        rewritten = open(path).read() != saved
        print(f"| {name} | {outcome} | config.json rewritten: {rewritten} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
