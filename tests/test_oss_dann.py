"""OSS' feature classifier against the DANN reference (Ganin & Lempitsky, 2015).

DANN trains the domain classifier on its ordinary loss while the feature extractor in front of
the gradient reversal layer gets that loss' gradient multiplied by -lambda_p, lambda_p =
2 / (1 + exp(-10 p)) - 1. OSS (appendix A.1 text) writes the multiplier with its sign,
alpha = -2 / (1 + exp(-10 n / N)) + 1 = -lambda_{n/N}. Checked here on a tiny OSS through
kd_keras' own `compute_losses`: the schedule, the gradient split (networks: swapped-prediction
gradient + alpha x classifier gradient; classifier: its plain gradient; prototypes: no
classifier gradient), a finite-difference check of the reversed part, which embeddings the
classifier sees and the weight of its loss, and the classifier's initialisation in `build_oss`.
"""

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras import config as config_lib
from kd_keras.methods import OSS, factory, registry
from kd_keras.methods.oss import STUDENT, TEACHER
from kd_keras.methods.swav import crop_groups, dropout_seed
from kd_keras.nets import backbones, clustering, heads
from kd_keras.optim import schedules
from kd_keras.optim.optimizers import SGD

E, K, B, SIZE, SMALL = 8, 12, 8, 12, 6
TOTAL_STEPS, STEP = 20, 7  # alpha(7 / 20) = -tanh(1.75) ~ -0.94


def _paper_alpha(n, big_n):
    return -2.0 / (1.0 + math.exp(-10.0 * n / big_n)) + 1.0


def _dann_lambda(p):
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


def test_grl_alpha_is_the_oss_formula_and_minus_danns_lambda():
    for n in range(0, 41):
        got = schedules.grl_alpha(n, 40)
        assert got == pytest.approx(_paper_alpha(n, 40), abs=1e-12)
        assert got == pytest.approx(-_dann_lambda(n / 40), abs=1e-12)
        assert got <= 0.0
        tensor = schedules.grl_alpha(tf.constant(n, tf.int64), tf.constant(40))
        assert float(tensor) == pytest.approx(got, abs=1e-6)
    assert schedules.grl_alpha(0, 40) == 0.0


class _NoReversal:
    """Stands in for the GRL: identity forward and backward, ignores the schedule."""

    def set_alpha(self, value):
        del value

    def __call__(self, x):
        return x


def _backbone():
    return backbones.build_backbone("convnet_tiny", SIZE, sync_bn=False, any_input_size=True)


def _oss(grl_scale=1.0):
    keras.utils.set_random_seed(11)
    model = OSS(
        _backbone(),
        heads.ProjectionHead(16, E, (0.1, 0.05), sync_bn=False),
        _backbone(),
        heads.ProjectionHead(16, E, (0.1, 0.05), sync_bn=False),
        clustering.Prototypes(K, E),
        None,
        heads.feature_classifier(E, 10, sync_bn=False),
        heads.GradientReversal(),
        total_steps=TOTAL_STEPS,
        grl_scale=grl_scale,
    )
    model.compile(optimizer=SGD(0.1, momentum=0.9))
    model.build((None, SIZE, SIZE, 3))
    return model


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "large": tf.constant(rng.uniform(size=(B, 2, SIZE, SIZE, 3)).astype(np.float32)),
        "small": tf.constant(rng.uniform(size=(B, 2, SMALL, SMALL, 3)).astype(np.float32)),
    }


def _groups(model):
    nets = {
        "networks": [
            model.teacher_backbone,
            model.teacher_head,
            model.student_backbone,
            model.student_head,
        ],
        "classifier": [model.classifier],
        "prototypes": [model.prototypes],
    }
    return {k: {id(v) for n in ns for v in n.trainable_variables} for k, ns in nets.items()}


def _gradients(model, batch, step, terms, reversal=True):
    """{term: [gradient per trainable variable]} of `compute_losses`' terms."""
    saved = model.grl
    if not reversal:
        model.grl = _NoReversal()
    try:
        with tf.GradientTape(persistent=True) as tape:
            out = model.compute_losses(batch, step, training=True)
            sums = {t: sum(out[n] for n in t.split("+")) for t in terms}
        grads = {t: tape.gradient(v, model.trainable_variables) for t, v in sums.items()}
    finally:
        model.grl = saved
    return out, grads


def _dense(g, v):
    return np.zeros(v.shape, np.float32) if g is None else tf.convert_to_tensor(g).numpy()


@pytest.mark.parametrize("grl_scale", [1.0, 0.25])
def test_reversed_classifier_gradient_reaches_networks_scaled_by_alpha(grl_scale):
    """One backward pass through the GRL equals, variable by variable, the gradients of a
    separate tape without it: networks get d(L_T + L_S) + alpha d(L_D), the classifier d(L_D)
    un-reversed, the prototypes d(L_T + L_S) only."""
    model = _oss(grl_scale)
    batch, step = _batch(), tf.constant(STEP, tf.int64)
    alpha = grl_scale * _paper_alpha(STEP, TOTAL_STEPS)
    out, full = _gradients(model, batch, step, ["loss"])
    plain_out, plain = _gradients(
        model, batch, step, ["loss_teacher+loss_student", "loss_domain"], reversal=False
    )
    # The GRL is the identity forward: the same loss values.
    for name in ("loss_teacher", "loss_student", "loss_domain", "loss"):
        np.testing.assert_allclose(out[name].numpy(), plain_out[name].numpy(), rtol=1e-6)
    assert float(out["grl_alpha"]) == pytest.approx(alpha, rel=1e-6)
    groups = _groups(model)
    reversed_norm = plain_norm = 0.0
    for i, v in enumerate(model.trainable_variables):
        got = _dense(full["loss"][i], v)
        swav = _dense(plain["loss_teacher+loss_student"][i], v)
        domain = _dense(plain["loss_domain"][i], v)
        if id(v) in groups["networks"]:
            want = swav + alpha * domain
            reversed_norm += float(np.sum((alpha * domain) ** 2))
            plain_norm += float(np.sum(swav**2))
        elif id(v) in groups["classifier"]:
            assert not swav.any(), v.path
            want = domain
        else:
            assert id(v) in groups["prototypes"], v.path
            assert not domain.any(), v.path
            want = swav
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=v.path)
    # The reversed part is not negligible next to the swapped-prediction gradient here.
    assert reversed_norm > 1e-4 * plain_norm


def test_reversed_part_matches_finite_differences_of_the_classifier_loss():
    """<g_networks - g_swav, u> = alpha * dL_D/du along u, with dL_D/du by central differences
    of the forward loss (float32, h = 1e-3 on a unit direction over the network weights)."""
    model = _oss()
    batch, step = _batch(1), tf.constant(STEP, tf.int64)
    alpha = _paper_alpha(STEP, TOTAL_STEPS)
    _, full = _gradients(model, batch, step, ["loss"])
    _, plain = _gradients(
        model, batch, step, ["loss_teacher+loss_student", "loss_domain"], reversal=False
    )
    groups = _groups(model)
    net = [(i, v) for i, v in enumerate(model.trainable_variables) if id(v) in groups["networks"]]
    direction = [_dense(plain["loss_domain"][i], v) for i, v in net]
    norm = math.sqrt(sum(float(np.sum(d**2)) for d in direction))
    direction = [d / norm for d in direction]
    reversed_part = sum(
        float(
            np.sum(
                (_dense(full["loss"][i], v) - _dense(plain["loss_teacher+loss_student"][i], v)) * d
            )
        )
        for (i, v), d in zip(net, direction, strict=True)
    )
    start = [v.numpy() for _, v in net]

    def domain_loss(h):
        for (_, v), x, d in zip(net, start, direction, strict=True):
            v.assign(x + h * d)
        return float(model.compute_losses(batch, step, training=True)["loss_domain"])

    h = 1e-3
    slope = (domain_loss(h) - domain_loss(-h)) / (2 * h)
    for (_, v), x in zip(net, start, strict=True):
        v.assign(x)
    print(f"reversed part {reversed_part:.5f}, alpha x finite difference {alpha * slope:.5f}")
    assert slope > 0.05  # u is the ascent direction of L_D
    assert reversed_part == pytest.approx(alpha * slope, rel=0.01)
    assert alpha < -0.9 and reversed_part < 0  # descending along it raises L_D: the reversal


def _np_ce(logits, label):
    logits = logits - logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[:, label].mean())


def test_classifier_sees_plain_and_dropout_embeddings_of_each_network_with_weight_one():
    """A.1: d_T, d_S = D(cat(z, z~)), D(cat(w, w~)) (one call per network, so its BN takes
    each network's batch statistics); loss = L_T + L_S + CE(d_T, 0) + CE(d_S, 1)."""
    model = _oss()
    batch, step = _batch(2), tf.constant(STEP, tf.int64)
    out = model.compute_losses(batch, step, training=True)
    groups, n_large, n_small = crop_groups(batch)
    n_views = n_large + n_small
    want = 0.0
    for net, label in ((model.teacher_net, TEACHER), (model.student_net, STUDENT)):
        z, z_drop = net.embed(groups, n_views, True, dropout_seed(step, label))
        rows = tf.reshape(tf.concat([z, z_drop], axis=0), [-1, E])
        np.testing.assert_allclose(np.linalg.norm(rows.numpy(), axis=1), 1.0, rtol=1e-5)
        assert rows.shape[0] == 2 * n_views * B
        want += _np_ce(model.classifier(rows, training=True).numpy(), label)
    np.testing.assert_allclose(float(out["loss_domain"]), want, rtol=1e-5)
    np.testing.assert_allclose(
        float(out["loss"]),
        float(out["loss_teacher"] + out["loss_student"] + out["loss_domain"]),
        rtol=1e-6,
    )


def test_build_oss_wires_torch_init_classifier_schedule_length_and_grl_scale():
    cfg = config_lib.Config(
        workdir="unused",
        method="oss",
        data=config_lib.DataConfig(image_size=SIZE),
        model=config_lib.ModelConfig(student="convnet_tiny"),
        optim=config_lib.OptimConfig(epochs=3),
        cluster=dataclasses.replace(
            config_lib.ClusterConfig(),
            online_teacher="convnet_tiny",
            proj_dim=E,
            proj_hidden_dim=16,
            num_prototypes=K,
            classifier_hidden=100,
        ),
    )
    assert cfg.model.head_init == "torch" and cfg.cluster.grl_scale == 1.0
    keras.utils.set_random_seed(0)
    student = backbones.build_backbone("convnet_tiny", SIZE, sync_bn=False, any_input_size=True)
    ctx = registry.BuildContext(cfg=cfg, student=student, steps_per_epoch=5)
    model = factory.build_oss(ctx)
    assert model.total_steps == 15 and model.grl_scale == 1.0
    # torch.nn.Linear: weight and bias U(+-1/sqrt(fan_in)), fan_in E then 100.
    for layer, fan_in in (("linear1", E), ("linear2", 100)):
        kernel, bias = model.classifier.get_layer(layer).get_weights()
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        assert np.abs(kernel).max() > 0.8 * bound and bias.any()
    weak = factory.build_oss(
        dataclasses.replace(
            ctx,
            cfg=dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, grl_scale=0.1)),
        )
    )
    assert weak.grl_scale == 0.1
