import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.optim import schedules


def _np_alpha(n, big_n):
    return -2.0 / (1.0 + np.exp(-10.0 * n / big_n)) + 1.0


def test_grl_alpha_start_middle_end_python_and_tensor():
    big_n = 1000
    for n in (0, 1, 250, 500, 999, 1000):
        want = _np_alpha(n, big_n)
        got = schedules.grl_alpha(n, big_n)
        assert isinstance(got, float)
        assert got == pytest.approx(want, abs=1e-12)
        got_t = schedules.grl_alpha(tf.constant(n, tf.int64), tf.constant(big_n))
        assert got_t.dtype == tf.float32
        assert float(got_t) == pytest.approx(want, abs=1e-6)
    assert schedules.grl_alpha(0, big_n) == 0.0
    assert schedules.grl_alpha(500, 1000) == pytest.approx(-2 / (1 + math.exp(-5)) + 1)
    assert schedules.grl_alpha(500, 1000) == pytest.approx(-0.98661, abs=1e-5)
    assert schedules.grl_alpha(1000, 1000) == pytest.approx(-2 / (1 + math.exp(-10)) + 1)
    assert schedules.grl_alpha(1000, 1000) == pytest.approx(-0.99991, abs=1e-5)
    assert schedules.grl_alpha(10**6, 1000) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.grl_alpha(3, 0)
    with pytest.raises(ValueError, match="step"):
        schedules.grl_alpha(-1, 10)


def _np_warmup_cosine(n, total, peak, final, warm, start):
    n = min(max(n, 0), total)
    if n < warm:
        return start + (peak - start) * n / warm
    return final + 0.5 * (peak - final) * (1 + np.cos(np.pi * (n - warm) / (total - warm)))


@pytest.mark.parametrize("warm,start", [(0, 0.0), (10, 0.0), (10, 0.3)])
def test_warmup_cosine_matches_numpy(warm, start):
    total, peak, final = 110, 0.6, 0.0006
    sched = schedules.WarmupCosine(
        peak, total, final_lr=final, warmup_steps=warm, warmup_start_lr=start
    )
    steps = [0, 1, warm // 2, warm, warm + 1, (warm + total) // 2, total - 1, total, total + 50]
    for n in steps:
        want = _np_warmup_cosine(n, total, peak, final, warm, start)
        assert float(sched(tf.constant(n, tf.int64))) == pytest.approx(want, rel=1e-5, abs=1e-7)
        got = schedules.warmup_cosine(n, total, peak, final, warm, start)
        assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert float(sched(warm)) == pytest.approx(peak)
    assert float(sched((warm + total) / 2)) == pytest.approx((peak + final) / 2)
    assert float(sched(total)) == pytest.approx(final)
    assert float(sched(0)) == pytest.approx(start if warm else peak)


def test_warmup_cosine_serialises_and_drives_an_optimizer():
    sched = schedules.WarmupCosine(0.6, 100, final_lr=0.0006, warmup_steps=5)
    clone = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(sched))
    assert isinstance(clone, schedules.WarmupCosine)
    assert clone.get_config() == sched.get_config()
    opt = keras.optimizers.SGD(learning_rate=clone)
    opt.iterations.assign(5)
    assert float(opt.learning_rate) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="warmup_steps"):
        schedules.WarmupCosine(0.6, 100, warmup_steps=100)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.WarmupCosine(0.6, 0)
    with pytest.raises(ValueError, match="peak_lr"):
        schedules.WarmupCosine(-0.1, 10)


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0])
def test_training_schedule_equals_the_keras_cosine_of_earlier_runs(warmup_epochs):
    # SimReg runs used keras' CosineDecay (with its linear warm-up) before every method
    # went through optimizers.learning_rate_schedule; resumed runs must see the same rates.
    from kd_keras import config
    from kd_keras.optim import optimizers

    o = config.OptimConfig(batch_size=64, epochs=4, lr=0.4, warmup_epochs=warmup_epochs)
    ours = optimizers.learning_rate_schedule(o, steps_per_epoch=5)
    peak, total, warm = o.scaled_lr(), 20, int(round(warmup_epochs * 5))
    if warm:
        ref = keras.optimizers.schedules.CosineDecay(
            0.0, total - warm, warmup_target=peak, warmup_steps=warm
        )
    else:
        ref = keras.optimizers.schedules.CosineDecay(peak, total)
    for step in range(total + 3):
        assert float(ours(step)) == pytest.approx(float(ref(step)), rel=1e-5, abs=1e-7), step
    constant = config.OptimConfig(batch_size=64, lr=0.4, schedule="constant")
    assert optimizers.learning_rate_schedule(constant, 5) == pytest.approx(0.1)
