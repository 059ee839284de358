"""Options that reproduce UMBCvision/CompRess' training code (issue 21): its step learning-rate
schedule (--schedule=step, --lr_decay_epochs, --lr_decay_rate) and its reading of the memory
banks, whose random initial rows are not normalised (--compress_bank_rows=as_stored)."""

import numpy as np
import pytest

from kd_keras import config as config_lib
from kd_keras import losses
from kd_keras.methods import compress_spec
from kd_keras.optim import optimizers, schedules
from tests.helpers import parsed_flags


def _official_rate(epoch, lr, decay_epochs, decay_rate):
    """CompRess util.adjust_learning_rate for a 1-based epoch."""
    return lr * decay_rate ** int(np.sum(epoch > np.asarray(decay_epochs)))


def test_step_schedule_is_the_official_compress_schedule():
    steps_per_epoch, epochs = 3, 6
    cfg = config_lib.OptimConfig(
        batch_size=8,
        epochs=epochs,
        lr=0.01,
        lr_scaling="none",
        schedule="step",
        lr_decay_epochs=(2, 4),
        lr_decay_rate=0.2,
    )
    schedule = optimizers.learning_rate_schedule(cfg, steps_per_epoch)
    assert isinstance(schedule, schedules.EpochStepDecay)
    got = [float(schedule(step)) for step in range(epochs * steps_per_epoch)]
    expected = [
        _official_rate(e, 0.01, [2, 4], 0.2)
        for e in range(1, epochs + 1)
        for _ in range(steps_per_epoch)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert len(set(expected)) == 3


def test_step_schedule_defaults_are_compress_defaults():
    cfg = config_lib.OptimConfig()
    assert (cfg.lr_decay_epochs, cfg.lr_decay_rate) == ((90, 120), 0.2)
    assert cfg.schedule == "cosine"  # the default schedule is unchanged


def test_step_schedule_flags_reach_the_optimizer(tmp_path):
    argv = ["--schedule=step", "--epochs=4", "--lr_decay_epochs=1,3", "--lr_decay_rate=0.5"]
    cfg = config_lib.config_from_flags(parsed_flags(tmp_path, *argv, "--lr_scaling=none"))
    assert cfg.optim.lr_decay_epochs == (1, 3)
    opt = optimizers.make_optimizer(cfg.optim, 10)
    rates = [float(opt._learning_rate(s)) for s in (0, 9, 10, 29, 30)]
    np.testing.assert_allclose(rates, [0.05, 0.05, 0.025, 0.025, 0.0125], rtol=1e-6)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--schedule=step", "--lr_decay_epochs=3,2"], "strictly increasing"),
        (["--schedule=step", "--lr_decay_epochs=0,2"], "--lr_decay_epochs"),
        (["--schedule=step", "--lr_decay_epochs=a"], "--lr_decay_epochs"),
        (["--schedule=step", "--lr_decay_rate=0"], "--lr_decay_rate"),
        (["--schedule=step", "--lr_decay_rate=1.5"], "--lr_decay_rate"),
        (["--schedule=step", "--warmup_epochs=1"], "--warmup_epochs"),
        (["--schedule=step", "--final_lr=0.001"], "--final_lr"),
        (["--lr_decay_epochs=5,6"], "--schedule=step"),
        (["--schedule=epoch_cosine", "--lr_decay_rate=0.1"], "--schedule=step"),
        (["--method=compress_1q", "--compress_bank_rows=raw"], "compress_bank_rows"),
    ],
)
def test_compress_option_flags_that_would_do_nothing_or_are_wrong_are_refused(
    tmp_path, argv, message
):
    with pytest.raises(Exception, match=message):
        config_lib.config_from_flags(parsed_flags(tmp_path, *argv))


@pytest.mark.parametrize("method", ["compress_1q", "compress_2q"])
def test_compress_bank_rows_flag_reaches_the_method_options(tmp_path, method):
    default = config_lib.config_from_flags(parsed_flags(tmp_path, f"--method={method}"))
    assert default.options().compress_bank_rows == "unit"  # kd_keras' reading is the default
    cfg = config_lib.config_from_flags(
        parsed_flags(tmp_path, f"--method={method}", "--compress_bank_rows=as_stored")
    )
    assert cfg.options().compress_bank_rows == "as_stored"


def test_bank_row_choices_agree_with_the_method():
    from kd_keras.methods import compress

    assert compress_spec.BANK_ROWS == compress.BANK_ROWS


def _reference_loss(s, t, bank_s, bank_t, temperature, normalise_banks):
    """CompRess nn/compress_loss.py in numpy (float64): rows used as stored unless normalised."""

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    if normalise_banks:
        bank_s, bank_t = unit(bank_s), unit(bank_t)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_ps = log_softmax(unit(s) @ bank_s.T / temperature)
    log_pt = log_softmax(unit(t) @ bank_t.T / temperature)
    return float(np.mean(np.sum(np.exp(log_pt) * (log_pt - log_ps), -1)))


def test_compress_loss_reads_the_banks_as_stored_when_asked():
    rng = np.random.default_rng(3)
    dim = 16
    bound = 1 / np.sqrt(dim / 3)  # CompRess' initial rows: U(-a, a), not unit vectors
    s, t = rng.normal(size=(4, dim)), rng.normal(size=(4, dim))
    bank_s, bank_t = (rng.uniform(-bound, bound, size=(10, dim)) for _ in range(2))
    args = [x.astype(np.float32) for x in (s, t, bank_s, bank_t)]
    as_stored = float(losses.compress_loss(*args, 0.04, normalise_banks=False))
    unit = float(losses.compress_loss(*args, 0.04))
    assert as_stored == pytest.approx(_reference_loss(s, t, bank_s, bank_t, 0.04, False), rel=1e-4)
    assert unit == pytest.approx(_reference_loss(s, t, bank_s, bank_t, 0.04, True), rel=1e-4)
    assert abs(as_stored - unit) > 1e-2 * unit  # the raw rows' norms matter at T = 0.04


def test_compress_loss_readings_agree_on_unit_rows():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(2, 3, 8)).astype(np.float32)
    bank = rng.normal(size=(6, 8))
    bank = (bank / np.linalg.norm(bank, axis=-1, keepdims=True)).astype(np.float32)
    a = float(losses.compress_loss(s, t, bank, bank, 0.1, normalise_banks=False))
    b = float(losses.compress_loss(s, t, bank, bank, 0.1))
    assert a == pytest.approx(b, rel=1e-5)


def _teacher(dim=5, size=8):
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(dim)(x))


@pytest.mark.parametrize("bank_rows", ["unit", "as_stored"])
def test_the_method_scores_against_the_rows_as_bank_rows_says(bank_rows):
    import kd_keras
    from tests.helpers import tiny_student

    model = kd_keras.CompRess(
        student=tiny_student(), teacher=_teacher(), mode="1q", bank_size=12, bank_rows=bank_rows
    )
    model.build((None, 8, 8, 3))
    rng = np.random.default_rng(5)
    s, t = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(2))
    rows = model.teacher_bank.rows()
    assert np.abs(np.linalg.norm(rows, axis=-1) - 1).max() > 1e-2  # CompRess' raw initial rows
    expected = losses.compress_loss(s, t, rows, rows, 0.04, normalise_banks=bank_rows == "unit")
    assert float(model._loss(s, t)) == pytest.approx(float(expected), rel=1e-6)


def test_the_api_names_bank_rows_in_its_error():
    import kd_keras
    from tests.helpers import tiny_student

    with pytest.raises(ValueError, match="bank_rows must be one of") as err:
        kd_keras.CompRess(student=tiny_student(), teacher=_teacher(), bank_rows="raw")
    assert "--" not in str(err.value)
