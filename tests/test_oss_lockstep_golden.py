"""kd_keras' OSS train step in lockstep with an independent PyTorch port of appendix A.1.

The fixture tests/data/oss_a1_lockstep.npz is written by scripts/oss_a1_torch.py (torch, no
kd_keras): initial weights, 16 batches of multi-crop views, the dropout keep-masks of every
step, and the per-step losses and weights of the torch run. Here the same tiny networks are
built from kd_keras' blocks (ProjectionHead, Prototypes, EmbeddingQueue, feature_classifier,
GradientReversal, OSS, the torch-form SGD), given the torch weights, fed the same crops and
masks, and stepped 16 times: swapped-prediction losses, classifier cross-entropies, alpha and
every trainable weight must match. Two deliberate departures (the GRL's sign flipped, alpha
not following the schedule) must not. No torch import here.
"""

import functools
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.methods import OSS
from kd_keras.methods import oss as oss_module
from kd_keras.nets import clustering, heads
from kd_keras.optim.optimizers import SGD

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "oss_a1_lockstep.npz")
# float32 on both sides through 16 steps: what separates the runs is rounding only.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


@functools.lru_cache(maxsize=1)
def _fixture():
    with np.load(FIXTURE) as data:
        arrays = {k: data[k] for k in data.files}
    setup = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("setup/")}
    pick = {
        part: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(part + "/")}
        for part in ("init", "input", "log", "weights")
    }
    return setup, pick


def _backbone(channels, name):
    return keras.Sequential(
        [
            keras.Input((None, None, 3)),
            keras.layers.Conv2D(channels, 1, name="conv"),
            keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
        ],
        name=name,
    )


def _variables(model):
    """{torch parameter name: Keras variable} for every trainable weight of the port."""
    out = {}
    for key, net in (("f", model.teacher_backbone), ("g", model.student_backbone)):
        conv, bn = net.get_layer("conv"), net.get_layer("bn")
        out.update(
            {
                f"{key}.conv.weight": conv.kernel,
                f"{key}.conv.bias": conv.bias,
                f"{key}.bn.weight": bn.gamma,
                f"{key}.bn.bias": bn.beta,
            }
        )
    for key, head in (("h_T", model.teacher_head), ("h_S", model.student_head)):
        out.update(
            {
                f"{key}.l1.weight": head.linear1.kernel,
                f"{key}.l1.bias": head.linear1.bias,
                f"{key}.bn.weight": head.bn.gamma,
                f"{key}.bn.bias": head.bn.beta,
                f"{key}.l2.weight": head.linear2.kernel,
                f"{key}.l2.bias": head.linear2.bias,
            }
        )
    d = model.classifier
    out.update(
        {
            "D.l1.weight": d.get_layer("linear1").kernel,
            "D.l1.bias": d.get_layer("linear1").bias,
            "D.bn.weight": d.get_layer("bn1").gamma,
            "D.bn.bias": d.get_layer("bn1").beta,
            "D.l2.weight": d.get_layer("linear2").kernel,
            "D.l2.bias": d.get_layer("linear2").bias,
            "C": model.prototypes.kernel,
        }
    )
    return out


def _to_keras(name, value):
    """torch layout -> Keras layout (Linear [out, in] -> [in, out]; conv OIHW -> HWIO)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and name != "C":
        return value.T
    return value


def _build(setup, init, grl_scale=1.0):
    s = {k: v.item() if v.ndim == 0 else tuple(v.tolist()) for k, v in setup.items()}
    keras.utils.set_random_seed(0)
    model = OSS(
        _backbone(s["teacher_channels"], "teacher"),
        heads.ProjectionHead(s["hidden"], s["embed"], s["rates"], sync_bn=False),
        _backbone(s["student_channels"], "student"),
        heads.ProjectionHead(s["hidden"], s["embed"], s["rates"], sync_bn=False),
        clustering.Prototypes(s["prototypes"], s["embed"]),
        clustering.EmbeddingQueue(2, s["queue_length"], s["embed"]),
        heads.feature_classifier(s["embed"], s["classifier_hidden"], sync_bn=False),
        heads.GradientReversal(),
        total_steps=s["total_steps"],
        grl_scale=grl_scale,
        online=True,
        temperature=s["temperature"],
        epsilon=s["epsilon"],
        sinkhorn_iters=s["sinkhorn_iters"],
        queue_start_step=s["queue_start"],
        weight_decay=s["weight_decay"],
    )
    model.compile(optimizer=SGD(s["lr"], momentum=s["momentum"], momentum_form="torch"))
    model.build((None, s["large"], s["large"], 3))
    for name, var in _variables(model).items():
        var.assign(_to_keras(name, init[name]))
    return model, s


def _replayed_dropout(keep1, keep2):
    """A `ProjectionHead._drop` that applies the fixture's keep-mask of (step, network)."""
    masks = (tf.constant(keep1), tf.constant(keep2))

    def drop(self, x, k, dropout_seed):
        if dropout_seed is None:
            return x
        # dropout_seed = [step, replica * 16 + network] (`methods.swav.dropout_seed`).
        keep = tf.gather_nd(masks[k], tf.cast(dropout_seed, tf.int64)[None])[0]
        return tf.where(keep, x / (1.0 - self.dropout_rates[k]), tf.zeros_like(x))

    return drop


def _run(monkeypatch, grl_scale=1.0, constant_alpha=None, steps=None):
    """Steps kd_keras' OSS through the fixture (the first `steps`, default all); per-step
    logs and weights in torch layout. Eager: tracing the step costs more than 16 eager steps
    of these tiny networks."""
    setup, data = _fixture()
    inputs = data["input"]
    monkeypatch.setattr(
        heads.ProjectionHead, "_drop", _replayed_dropout(inputs["keep1"], inputs["keep2"])
    )
    if constant_alpha is not None:
        monkeypatch.setattr(
            oss_module.schedules, "grl_alpha", lambda step, total: tf.constant(constant_alpha)
        )
    model, s = _build(setup, data["init"], grl_scale)
    variables = _variables(model)
    logs = {n: [] for n in ("loss_teacher", "loss_student", "loss_domain", "loss", "grl_alpha")}
    weights = {n: [] for n in variables}
    for step in range(s["steps"] if steps is None else steps):
        batch = {
            key: tf.constant(inputs[key][step].astype(np.float32) / 255.0)
            for key in ("large", "small")
        }
        for tracker in model.metrics:
            tracker.reset_state()
        out = model.train_step(batch)
        for n in logs:
            logs[n].append(float(out[n]))
        for n, var in variables.items():
            value = var.numpy()
            weights[n].append(
                value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if n != "C" else value
            )
    return {n: np.array(v) for n, v in logs.items()}, {n: np.stack(v) for n, v in weights.items()}


def _differences(logs, weights):
    """(max relative loss difference, max absolute weight difference) to the torch run, over
    the steps in `logs`."""
    _, data = _fixture()
    steps = len(logs["loss"])
    want = {k: v[:steps] for k, v in data["log"].items()}
    torch_logs = {
        "loss_teacher": want["loss_teacher"],
        "loss_student": want["loss_student"],
        "loss_domain": want["ce_teacher"] + want["ce_student"],
        "loss": want["loss"],
    }
    loss_diff = max(float(np.max(np.abs(logs[n] - v) / np.abs(v))) for n, v in torch_logs.items())
    weight_diff = max(
        float(np.max(np.abs(weights[k] - v[:steps]))) for k, v in data["weights"].items()
    )
    return loss_diff, weight_diff


def test_oss_train_step_matches_torch_a1_port_for_16_steps(monkeypatch):
    logs, weights = _run(monkeypatch)
    _, data = _fixture()
    np.testing.assert_allclose(logs["grl_alpha"], data["log"]["alpha"], rtol=1e-6, atol=1e-7)
    loss_diff, weight_diff = _differences(logs, weights)
    print(f"lockstep: max rel loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    assert loss_diff < LOSS_RTOL
    assert weight_diff < WEIGHT_ATOL


@pytest.mark.parametrize(
    "departure",
    [dict(grl_scale=-1.0), dict(constant_alpha=-1.0), dict(grl_scale=0.0)],
    ids=["grl_sign_flipped", "alpha_not_scheduled", "no_reversed_gradient"],
)
def test_lockstep_catches_grl_departures(monkeypatch, departure):
    # Six steps: alpha is 0 at step 0, so the departures show from step 1's update on.
    logs, weights = _run(monkeypatch, steps=6, **departure)
    loss_diff, weight_diff = _differences(logs, weights)
    print(f"{departure}: max rel loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e}")
    assert loss_diff > 10 * LOSS_RTOL
    assert weight_diff > 10 * WEIGHT_ATOL
