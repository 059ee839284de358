"""The method registry: config reads it without TensorFlow, train builds from it, and a
throw-away method registered here trains through kd_keras.train with its own flag."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kd_keras import config as config_lib
from kd_keras.methods import registry

config_lib.define_flags()


# ---- A throw-away method: pulls the student's features towards zero, scaled by --toy_scale.


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    toy_scale: float = 1.0


def _define_toy_flags(flags):
    flags.DEFINE_float("toy_scale", 1.0, "--method=toy: loss multiplier.")


def _validate_toy(cfg):
    if not cfg.options().toy_scale > 0:
        raise ValueError(f"--toy_scale must be positive, got {cfg.options().toy_scale}.")


def _build_toy(ctx):
    import tensorflow as tf

    from kd_keras.methods.base import Method

    class Toy(Method):
        def __init__(self, student, scale, **kwargs):
            super().__init__(**kwargs)
            self.student = student
            self.scale = scale

        def call(self, images, training=False):
            return self.student(images, training=training)

        def train_step(self, data):
            with tf.GradientTape() as tape:
                features = self(data["student"], training=True)
                loss = self.scale * tf.reduce_mean(tf.square(features))
                scaled = self.scale_loss(loss, self.trainable_variables)
            self.apply_loss(tape, scaled, self.trainable_variables)
            return {"loss": loss}

    return Toy(ctx.student, ctx.options.toy_scale, weight_decay=ctx.weight_decay, name="toy")


TOY = registry.MethodSpec(
    name="toy",
    summary="test-only method",
    builder=_build_toy,
    views="single",
    validate_each_epoch=False,
    knn_random_init=False,
    nan_hint="Toy hint.",
    define_flags=_define_toy_flags,
    options=ToyOptions,
    validate=_validate_toy,
)


@pytest.fixture()
def toy():
    config_lib.register_method(TOY)
    yield TOY
    registry.unregister("toy")


def _parse(argv):
    config_lib.FLAGS.unparse_flags()
    config_lib.FLAGS(["prog", *argv])
    return config_lib.config_from_flags(config_lib.FLAGS)


def test_config_and_the_registry_import_no_tensorflow():
    code = (
        "import sys\n"
        "from kd_keras import config\n"
        "from kd_keras.methods import registry\n"
        "config.define_flags()\n"
        "specs = registry.specs()\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('tensorflow', 'keras')))[:5]\n"
        "print(','.join(s.name for s in specs))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ",".join(config_lib.METHODS)


def test_the_method_lists_are_the_registrys():
    assert config_lib.METHODS == (
        "simreg",
        "regress",
        "regress_bn",
        "supervised",
        "swav",
        "oss",
        "oss_offline",
        "compress_1q",
        "compress_2q",
        "seed",
        "crd",
    )
    assert config_lib.CLUSTERING_METHODS == ("swav", "oss", "oss_offline")
    baselines = ("compress_1q", "compress_2q", "seed", "crd")
    assert config_lib.TEACHER_METHODS == (
        "simreg",
        "regress",
        "regress_bn",
        "oss_offline",
        *baselines,
    )
    assert config_lib.CACHE_METHODS == ("simreg", "regress", "regress_bn", *baselines)
    assert registry.get("supervised").views == "single" and registry.get("oss").multicrop


def test_an_unknown_method_is_an_error_naming_the_flag(tmp_path):
    from kd_keras.training import run as train

    cfg = config_lib.Config(workdir=str(tmp_path / "run"), method="byol")
    with pytest.raises(ValueError, match="--method=byol: unknown method"):
        train.run(cfg)
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_throwaway_method_trains_through_train_with_its_own_flag(tmp_path, toy):
    from kd_keras.artifacts import export
    from kd_keras.eval import loading
    from kd_keras.training import run as train

    cfg = _parse(
        [
            "--method=toy",
            "--toy_scale=0.5",
            f"--workdir={tmp_path}/run",
            "--student=convnet_tiny",
            "--image_size=8",
            "--batch_size=32",
            "--epochs=1",
            "--steps_per_epoch=1",
            "--lr=0.1",
            "--knn_k=1",
            "--knn_max_train=64",
            "--eval_batch_size=128",
            "--log_images=0",
            "--verbose=0",
        ]
    )
    assert cfg.method_options == {"toy_scale": 0.5} and cfg.options() == ToyOptions(0.5)
    # The option survives config.json (evaluation and resumption rebuild from it).
    cfg.save(tmp_path / "config.json")
    assert config_lib.config_from_json(tmp_path / "config.json") == cfg
    results, method = train.run_and_return_model(cfg)
    assert results["steps"] == 1 and method.scale == 0.5
    assert set(results["knn"]) == {"protocol", "student"}  # knn_random_init=False
    images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    embed = export.load_exported(str(tmp_path / "run" / "export"))
    np.testing.assert_allclose(np.asarray(embed(images)), method.student(images), atol=1e-5)
    # Evaluation rebuilds the new method from its checkpoint through the registry too.
    loaded = loading.load_model(str(tmp_path / "run"), from_checkpoint=True)
    assert "checkpoint of step 1" in loaded.source
    np.testing.assert_allclose(loaded.backbone(images), method.student(images), atol=1e-5)


def test_a_methods_own_flag_is_validated_and_rejected_for_other_methods(tmp_path, toy):
    with pytest.raises(ValueError, match="--toy_scale must be positive"):
        _parse(["--method=toy", "--toy_scale=-1", f"--workdir={tmp_path}"])
    with pytest.raises(ValueError, match=r"--toy_scale applies to --method in \('toy',\)"):
        _parse(["--toy_scale=2", "--teacher=recipe:supervised", f"--workdir={tmp_path}"])


def test_flag_defaults_of_a_method_apply_only_when_the_flag_is_not_given(tmp_path, toy):
    lars_toy = dataclasses.replace(TOY, flag_defaults={"optimizer": "lars"})
    registry.register(lars_toy, replace=True)
    assert _parse(["--method=toy", f"--workdir={tmp_path}"]).optim.optimizer == "lars"
    given = _parse(["--method=toy", "--optimizer=sgd", f"--workdir={tmp_path}"])
    assert given.optim.optimizer == "sgd"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--teacher=x", "--lars_trust=0.01"], "--lars_trust=0.01 applies to --optimizer=lars"),
        (["--teacher=x", "--lars_exclude_bn_bias"], "--lars_exclude_bn_bias=True applies to"),
        (["--teacher=x", "--schedule=constant", "--final_lr=0.01"], "--final_lr=0.01 has no"),
        (["--teacher=x", "--schedule=constant", "--warmup_epochs=1"], "--warmup_epochs=1.0 has"),
        (["--method=supervised", "--aug_mode=different"], "--aug_mode=different needs two"),
        (["--method=supervised", "--teacher=x"], "--teacher applies to --method in"),
        (["--method=supervised", "--head=linear"], "--head applies to --method in"),
        (["--method=swav", "--augment=strong"], "--augment applies to --method in"),
        (
            ["--teacher=x", "--num_prototypes=10"],
            r"--num_prototypes applies to --method in \('swav'",
        ),
        (
            ["--method=swav", "--small_crop_size=8", "--export_network=teacher"],
            "--export_network=teacher applies",
        ),
    ],
)
def test_flags_the_method_would_ignore_are_rejected(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        _parse([f"--workdir={tmp_path}", *argv])


def test_lars_applies_to_simreg_and_moves_the_decay_into_the_optimizer(tmp_path):
    from kd_keras.optim import optimizers

    cfg = _parse(["--teacher=x", "--optimizer=lars", "--lars_trust=0.02", f"--workdir={tmp_path}"])
    opt = optimizers.make_optimizer(cfg.optim, steps_per_epoch=10)
    assert isinstance(opt, optimizers.LARS) and opt.trust_coefficient == 0.02
    assert opt.lars_weight_decay == cfg.optim.weight_decay
    assert optimizers.coupled_weight_decay(cfg.optim) == 0.0
    sgd = _parse(["--teacher=x", f"--workdir={tmp_path}"])
    assert optimizers.coupled_weight_decay(sgd.optim) == sgd.optim.weight_decay


def test_a_config_json_of_an_older_run_reads_its_optimizer_from_the_cluster_section(tmp_path):
    cfg = config_lib.Config(
        workdir=str(tmp_path),
        method="swav",
        optim=config_lib.OptimConfig(optimizer="lars", final_lr=0.006, lars_trust=0.002),
    )
    raw = json.loads(cfg.to_json())
    for key in ("optimizer", "final_lr", "lars_trust", "lars_exclude_bn_bias"):
        raw["cluster"][key] = raw["optim"].pop(key)
    del raw["method_options"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert config_lib.config_from_json(tmp_path / "config.json") == cfg
