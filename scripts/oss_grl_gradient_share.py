"""How large is the reversed classifier gradient next to the swapped-prediction gradient in an
OSS run? Loads an OSS checkpoint and, on a few training batches, prints per network part the
norm of d(L_T + L_S) and of alpha x d(L_D) (L_D: the feature classifier's two
cross-entropies, alpha the GRL multiplier of that step) and their cosine.

Usage (reads <workdir>/config.json and <workdir>/checkpoints/ckpt-<step>.weights.h5):
  PYTHONPATH=. python scripts/oss_grl_gradient_share.py --workdir=runs/oss_probe/full \
      --step=73 --batches=3
"""

import argparse
import os

import numpy as np
import tensorflow as tf

from kd_keras import config as config_lib
from kd_keras.data import sources
from kd_keras.methods import factory, registry
from kd_keras.optim import optimizers


class _Identity:
    def set_alpha(self, value):
        del value

    def __call__(self, x):
        return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    cfg = config_lib.config_from_json(os.path.join(args.workdir, "config.json"))
    examples, info = sources.load_split(
        cfg.data.dataset, cfg.data.train_split, image_size_hint=cfg.data.image_size
    )
    steps_per_epoch = info.num_examples // cfg.optim.batch_size
    ds = sources.make_train_dataset(
        examples,
        factory.multicrop_view_fn(cfg),
        cfg.optim.batch_size,
        seed=cfg.seed,
        start_epoch=args.step // steps_per_epoch,
        skip_batches=args.step % steps_per_epoch,
    )
    student = registry.build_student(cfg, cfg.data.image_size)
    model = registry.build_method(cfg, student, (), info.num_classes, steps_per_epoch)
    model.compile(optimizer=optimizers.make_optimizer(cfg.optim, steps_per_epoch))
    model.build((None, cfg.data.image_size, cfg.data.image_size, 3))
    model.optimizer.build(model.trainable_variables)
    model.load_weights(
        os.path.join(args.workdir, "checkpoints", f"ckpt-{args.step:09d}.weights.h5")
    )
    parts = {
        "teacher backbone": model.teacher_backbone,
        "teacher head": model.teacher_head,
        "student backbone": model.student_backbone,
        "student head": model.student_head,
    }
    ids = {name: {id(v) for v in net.trainable_variables} for name, net in parts.items()}
    grl, step = model.grl, tf.constant(args.step, tf.int64)
    for b, batch in enumerate(ds.take(args.batches)):
        model.grl = _Identity()  # plain gradients; alpha applied below
        with tf.GradientTape(persistent=True) as tape:
            out = model.compute_losses(batch, step, training=True)
            swav = out["loss_teacher"] + out["loss_student"]
        model.grl = grl
        variables = model.trainable_variables
        g_swav = tape.gradient(swav, variables)
        g_dom = tape.gradient(out["loss_domain"], variables)
        alpha = float(out["grl_alpha"])
        print(
            f"batch {b}: step {args.step}, alpha {alpha:.4f}, L_T+L_S {float(swav):.4f}, "
            f"L_D {float(out['loss_domain']):.4f}, domain acc {float(out['domain_accuracy']):.3f}"
        )
        for name, members in ids.items():
            s = [
                tf.reshape(g, [-1])
                for g, v in zip(g_swav, variables, strict=True)
                if id(v) in members
            ]
            d = [
                tf.reshape(g, [-1])
                for g, v in zip(g_dom, variables, strict=True)
                if id(v) in members
            ]
            s, d = tf.concat(s, 0).numpy(), alpha * tf.concat(d, 0).numpy()
            cos = float(s @ d / (np.linalg.norm(s) * np.linalg.norm(d) + 1e-30))
            print(
                f"  {name:17s} |g_swav| {np.linalg.norm(s):.4e}  |alpha g_D| "
                f"{np.linalg.norm(d):.4e}  ratio {np.linalg.norm(d) / np.linalg.norm(s):.3f}  "
                f"cos {cos:+.3f}"
            )


if __name__ == "__main__":
    main()
