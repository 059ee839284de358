"""--jit_compile unset picks XLA per machine and input size; an explicit value always wins."""

import pytest

from kd_keras.training import precision


def test_explicit_value_wins():
    assert precision.choose_jit_compile(True, 16, True, [], {"avx512f"})[0] is True
    assert precision.choose_jit_compile(False, 224, False, [(8, 0)], set())[0] is False


def test_auto_by_device_and_size():
    on_gpu, why = precision.choose_jit_compile(None, 16, True, [(8, 0)], {"avx512f"})
    assert on_gpu and "GPU" in why
    on_cpu, why = precision.choose_jit_compile(None, 112, False, [], {"avx2", "avx512f"})
    assert on_cpu and "AVX-512" in why
    assert not precision.choose_jit_compile(None, 112, True, [], {"avx512f"})[0]
    assert precision.choose_jit_compile(None, 32, False, [], {"avx2"}) == (
        False,
        "auto: AVX2 CPU, 32 px < 64 px",
    )


def test_grouped_conv_students_stay_off_xla_on_cpu_only():
    from kd_keras.nets import backbones
    from kd_keras.training import run as train

    off, why = precision.choose_jit_compile(None, 112, False, [], {"avx512f"}, grouped_convs=True)
    assert off is False and "grouped" in why
    assert precision.choose_jit_compile(None, 112, False, [(8, 0)], set(), grouped_convs=True)[0]
    assert precision.choose_jit_compile(True, 112, False, [], set(), grouped_convs=True)[0]
    regnet = backbones.build_regnet("regnety-1.1-8.16-g4-stem8", 32)
    resnet = backbones.build_backbone("resnet_tiny", 32)
    assert train._has_grouped_convs(regnet) and not train._has_grouped_convs(resnet)


def _tiny_simreg():
    import keras

    from kd_keras.methods import SimReg
    from kd_keras.nets import backbones, heads
    from tests.helpers import tiny_teacher

    keras.utils.set_random_seed(0)
    teacher = tiny_teacher("t", size=16, dim=8)
    student = backbones.build_backbone("convnet_tiny", 16, sync_bn=False)
    head = heads.prediction_head(student.output_shape[-1], 8, "mlp2", name="head_t")
    method = SimReg(student, [teacher], [head], weight_decay=1e-4)
    method.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False)
    method.build((None, 16, 16, 3))
    return method


def test_measuring_xla_times_both_and_leaves_the_model_as_it_was():
    import numpy as np
    import tensorflow as tf

    from kd_keras.training import xla_choice

    method = _tiny_simreg()
    batch = {"student": tf.random.stateless_uniform([4, 16, 16, 3], [1, 2])}
    strategy = tf.distribute.get_strategy()
    # A run resumed mid-way: momentum and a step count exist.
    xla_choice.seconds_per_step(method, batch, False, strategy)
    done = int(method.optimizer.iterations.numpy())
    assert done == xla_choice.WARMUP_STEPS + xla_choice.TIMED_STEPS
    state = xla_choice._state_variables(method)
    before = [v.numpy().copy() for v in state]
    record = xla_choice.measure(method, batch, strategy)
    assert set(record["seconds_per_step"]) == {"off", "on"}
    assert all(t > 0 for t in record["seconds_per_step"].values())
    t = record["seconds_per_step"]
    assert record["jit_compile"] == (t["on"] < t["off"])
    assert int(method.optimizer.iterations.numpy()) == done
    for v, value in zip(state, before, strict=True):
        np.testing.assert_array_equal(v.numpy(), value, err_msg=v.path)


def test_measured_choice_is_cached_per_setup(tmp_path, monkeypatch):
    import dataclasses

    from kd_keras import config
    from kd_keras.training import xla_choice

    monkeypatch.setenv("KD_KERAS_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_measure(model, batch, strategy):
        calls.append(batch)
        return {"jit_compile": False, "seconds_per_step": {"off": 0.5, "on": 0.7}}

    monkeypatch.setattr(xla_choice, "measure", fake_measure)
    cfg = config.Config(workdir=str(tmp_path), data=config.DataConfig(image_size=112))
    flags = {"avx2", "fma", "sse4_2"}
    jit, why = xla_choice.choose_by_measurement(cfg, None, lambda: "batch", None, flags)
    assert (jit, calls) == (False, ["batch"])
    assert "0.500 s/step without XLA, 0.700 s/step with XLA (this run)" in why
    jit, why = xla_choice.choose_by_measurement(cfg, None, lambda: "batch", None, flags)
    assert len(calls) == 1 and "cached in" in why and not jit
    other = dataclasses.replace(cfg, data=config.DataConfig(image_size=224))
    xla_choice.choose_by_measurement(other, None, lambda: "other", None, flags)
    assert calls == ["batch", "other"]  # another input size is another setup
    stored = (tmp_path / xla_choice.CACHE_FILE).read_text()
    assert '"image_size": 224' in stored and '"image_size": 112' in stored


@pytest.mark.slow
def test_train_run_with_jit_compile_unset_times_the_step_once_per_setup(tmp_path, monkeypatch):
    """A CPU run that the rule would give XLA is timed both ways, trains with the faster
    setting (logged) and a second run of the same setup reads the stored choice."""
    import json

    import keras
    import numpy as np

    from kd_keras import config
    from kd_keras.nets import backbones
    from kd_keras.training import run as train
    from kd_keras.training import xla_choice

    monkeypatch.setenv("KD_KERAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(xla_choice, "MIN_STEPS_TO_MEASURE", 2)
    monkeypatch.setattr(xla_choice, "TIMED_STEPS", 1)
    monkeypatch.setattr(xla_choice, "WARMUP_STEPS", 1)
    keras.utils.set_random_seed(4)
    teacher_path = str(tmp_path / "teacher.keras")
    size = 64  # the rule's smallest XLA size on a CPU
    backbones.build_backbone("convnet_tiny", size).save(teacher_path)

    def run(name):
        cfg = config.Config(
            workdir=str(tmp_path / name),
            log_images=0,
            verbose=0,
            export=False,
            evaluate=False,
            data=config.DataConfig(image_size=size, shuffle_buffer=64),
            model=config.ModelConfig(
                student="convnet_tiny", teachers=(teacher_path,), head="linear"
            ),
            optim=config.OptimConfig(batch_size=8, epochs=1, steps_per_epoch=2, lr=0.1),
            eval=config.EvalConfig(knn_k=(1,), knn_max_train=64),
        )
        return train.run_and_return_model(cfg)

    results, method = run("a")
    table = json.loads((tmp_path / "cache" / xla_choice.CACHE_FILE).read_text())
    (record,) = table.values()
    assert method.jit_compile == record["jit_compile"]
    assert results["steps"] == 2 and np.isfinite(results["final_logs"]["loss"])
    # The timing steps were undone: training started from step 0 and ran its 2 steps.
    assert int(method.optimizer.iterations.numpy()) == 2
    monkeypatch.setattr(xla_choice, "measure", lambda *a: (_ for _ in ()).throw(AssertionError))
    _, again = run("b")
    assert again.jit_compile == record["jit_compile"]
