"""--precision / --jit_compile: what stays float32, loss scaling, end-to-end runs, warnings."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras import config, losses
from kd_keras.methods import SimReg
from kd_keras.nets import backbones, heads
from kd_keras.training import precision
from kd_keras.training import run as train
from tests.helpers import tiny_teacher


def test_precisions_of_config_and_precision_module_agree():
    assert config.PRECISIONS == precision.PRECISIONS


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_sinkhorn_stays_float32_under_mixed_precision(policy):
    rng = np.random.default_rng(0)
    scores32 = rng.uniform(-1, 1, size=(64, 10)).astype(np.float32)
    with precision.policy_scope(policy):
        low = tf.constant(scores32, dtype=keras.mixed_precision.global_policy().compute_dtype)
        codes = losses.sinkhorn(low, epsilon=0.05, num_iters=3)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    assert low.dtype != tf.float32 and codes.dtype == tf.float32
    # Same codes as float32 scores rounded the same way: the iterations ran in float32, not in
    # 16 bits (16-bit exp(s / 0.05) would overflow float16 or lose bfloat16's 8-bit mantissa).
    want = losses.sinkhorn(tf.cast(low, tf.float32), epsilon=0.05, num_iters=3)
    np.testing.assert_allclose(codes.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(codes.numpy().sum(axis=1), 1.0, atol=1e-5)


def _simreg(policy, jit, student_name="resnet_tiny"):
    with precision.policy_scope(policy):
        keras.utils.set_random_seed(0)
        teacher = tiny_teacher("t", size=16, dim=8)
        student = backbones.build_backbone(student_name, 16, sync_bn=False)
        head = heads.prediction_head(student.output_shape[-1], 8, "mlp2", name="head_t")
        method = SimReg(student, [teacher], [head], weight_decay=1e-4)
        method.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=jit)
        method.build((None, 16, 16, 3))
    return method


@pytest.mark.parametrize(
    "policy,compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")]
)
def test_mixed_precision_simreg_trains_with_float32_variables_and_loss(policy, compute):
    method = _simreg(policy, jit=False)
    scaled = isinstance(method.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (policy == "mixed_float16")  # loss scaling only where float16 needs it
    assert method.student.output.dtype == compute
    assert all(v.dtype == "float32" for v in method.trainable_variables)
    bns = [layer for layer in method.student.layers if "bn" in layer.name]
    assert bns and all(layer.dtype_policy.variable_dtype == "float32" for layer in bns)
    images = np.random.default_rng(1).uniform(size=(32, 16, 16, 3)).astype(np.float32)
    before = [v.numpy().copy() for v in method.student.trainable_variables]
    ds = tf.data.Dataset.from_tensors({"student": images}).repeat(3)
    history = method.fit(ds, epochs=1, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss) and 0.0 < loss < 4.0
    changed = [
        not np.array_equal(b, v.numpy())
        for b, v in zip(before, method.student.trainable_variables, strict=True)
    ]
    assert all(changed)  # with a 2**15 loss scale the first step must not be skipped for good


def test_jit_compile_is_kept_for_simreg():
    method = _simreg("float32", jit=True, student_name="convnet_tiny")
    assert method.jit_compile is True  # every layer supports XLA; Keras would else turn it off
    images = np.random.default_rng(2).uniform(size=(16, 16, 16, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensors({"student": images}).repeat(2)
    assert np.isfinite(method.fit(ds, epochs=1, verbose=0).history["loss"][0])


def test_support_warning_names_the_missing_hardware():
    assert precision.support_warning("float32", [], set()) is None
    assert "without a GPU" in precision.support_warning("mixed_float16", [], {"avx512_bf16"})
    assert precision.support_warning("mixed_float16", [(8, 0)], set()) is None
    assert "< 7.0" in precision.support_warning("mixed_float16", [(6, 1)], set())
    assert precision.support_warning("mixed_bfloat16", [], {"avx512_bf16"}) is None
    assert precision.support_warning("mixed_bfloat16", [], {"amx_bf16"}) is None
    assert "AVX512_BF16" in precision.support_warning("mixed_bfloat16", [], {"avx2"})
    assert "< 8.0" in precision.support_warning("mixed_bfloat16", [(7, 5)], set())
    with pytest.raises(ValueError, match="--precision"):
        with precision.policy_scope("float64"):
            pass


@pytest.mark.slow
def test_train_run_with_bfloat16_and_xla(tmp_path):
    keras.utils.set_random_seed(4)
    teacher_path = str(tmp_path / "teacher.keras")
    backbones.build_backbone("convnet_tiny", 8).save(teacher_path)
    cfg = config.Config(
        workdir=str(tmp_path / "run"),
        log_images=0,
        verbose=0,
        export=False,
        precision="mixed_bfloat16",
        jit_compile=True,
        evaluate=False,
        data=config.DataConfig(image_size=8, shuffle_buffer=128, deterministic=False),
        model=config.ModelConfig(student="convnet_tiny", teachers=(teacher_path,), head="mlp2"),
        optim=config.OptimConfig(batch_size=32, epochs=1, steps_per_epoch=3, lr=0.2),
        eval=config.EvalConfig(knn_k=(1,), knn_max_train=200),
    )
    results, method = train.run_and_return_model(cfg)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after building
    assert method.jit_compile is True
    assert method.student.output.dtype == "bfloat16"
    assert results["steps"] == 3 and np.isfinite(results["final_logs"]["loss"])
    # The configuration records the speed settings.
    saved = config.config_from_json(str(tmp_path / "run" / "config.json"))
    assert saved.precision == "mixed_bfloat16"
    assert saved.jit_compile and not saved.data.deterministic


def test_flags_validate_precision_and_teacher_cache():
    from absl import flags

    config.define_flags()
    fv = config.FLAGS
    fv.unparse_flags()
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["prog", "--precision=float16"])
    fv.unparse_flags()
    fv(["prog", "--workdir=/tmp/x", "--method=supervised", "--teacher_cache=/tmp/c"])
    with pytest.raises(ValueError, match="--teacher_cache works with --method"):
        config.config_from_flags(fv)
    fv.unparse_flags()
    fv(["prog", "--workdir=/tmp/x", "--teacher=/t", "--precision=mixed_float16", "--jit_compile"])
    cfg = config.config_from_flags(fv)
    assert (cfg.precision, cfg.jit_compile, cfg.op_determinism) == ("mixed_float16", True, False)
    fv.unparse_flags()
