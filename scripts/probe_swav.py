"""Short SwAV probes: does a setting keep the loss below ln K, and does k-NN move? (CPU minutes)

    python scripts/probe_swav.py --base=flags/swav_imagenette_cpu.cfg --batches=30 --steps=150 \
        '{"color_strength": 1.0, "blur_prob": 0.5, "sinkhorn_epsilon": 0.05}' \
        '{"sinkhorn_epsilon": 0.03}'

Each JSON argument is a set of flag overrides on top of --base. For each probe the first
--batches multi-crop batches of the run's own pipeline (seed 0; built once per set of view
settings and cached in memory, so every probe of a view setting sees the same views) are
replayed for --steps optimizer steps through `kd_keras.methods.factory` (the same SwAV model
and optimizer as `kd_keras.train`; the schedule's epochs are set to steps / batches, so the
warm-up and cosine fit the probe). Printed per probe: the mean loss of every pass over the
batches, ln K, and k-NN top-1 (k = 1, 20) of the backbone on every 5th train image (memory)
and every 4th val image (queries), centre crops. Used for the probe table of
docs/reproduction_swav.md.
"""

import argparse
import json
import time

import keras
import numpy as np
import tensorflow as tf
from absl import flags

from kd_keras import config as config_lib
from kd_keras.data import augment
from kd_keras.data import sources as data
from kd_keras.eval import features, knn
from kd_keras.methods import factory, registry
from kd_keras.optim import optimizers


def every_nth(examples, n):
    return examples.filter(lambda ex: ex["index"] % n == 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="flagfile of a --method=swav run")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("probes", nargs="+", help="JSON flag overrides, one probe each")
    args = parser.parse_args()
    if args.steps % args.batches:
        raise SystemExit("probe_swav.py: --steps must be a multiple of --batches.")
    config_lib.define_flags()
    fv = flags.FLAGS
    base_argv = ["probe", f"--flagfile={args.base}", "--workdir=/tmp/probe_swav"]
    passes = args.steps // args.batches
    cache = {}
    for probe in args.probes:
        overrides = json.loads(probe)
        fv.unparse_flags()
        config_lib.parse_command_line(base_argv, prog="probe_swav.py")
        for name, value in {"epochs": passes, **overrides}.items():
            setattr(fv, name, value)
        cfg = config_lib.config_from_flags(fv)
        t0 = time.time()
        size = cfg.data.image_size
        train, _ = data.load_split(cfg.data.dataset, cfg.data.train_split, image_size_hint=size)
        val, _ = data.load_split(cfg.data.dataset, cfg.data.eval_split or "val",
                                 image_size_hint=size)  # fmt: skip
        c = cfg.cluster
        views = (c.color_strength, c.blur_prob, c.large_crop_scale, c.small_crop_scale,
                 c.num_small_crops, c.small_crop_size, cfg.optim.batch_size)  # fmt: skip
        if views not in cache:
            ds = data.make_train_dataset(
                train, factory.multicrop_view_fn(cfg), cfg.optim.batch_size, seed=0
            )
            cache[views] = [{k: b[k] for k in ("large", "small")} for b in ds.take(args.batches)]
        batches = cache[views]
        keras.utils.set_random_seed(0)
        backbone = registry.build_student(cfg, size)
        method = registry.build_method(cfg, backbone, steps_per_epoch=args.batches)
        method.compile(optimizer=optimizers.make_optimizer(cfg.optim, args.batches))
        method.build((None, size, size, 3))
        spec = {k: tf.TensorSpec(v.shape, tf.float32) for k, v in batches[0].items()}
        replay = tf.data.Dataset.from_generator(
            lambda batches=batches: iter(batches), output_signature=spec
        ).repeat()
        history = method.fit(replay, epochs=passes, steps_per_epoch=args.batches, verbose=0)

        def centre(image, size=size):
            return augment.center_crop(image, size)

        memory = data.make_eval_dataset(every_nth(train, 5), centre, 256)
        queries = data.make_eval_dataset(every_nth(val, 4), centre, 256)
        xtr, ytr = features.extract_features(backbone, memory)
        xte, yte = features.extract_features(backbone, queries)
        acc = knn.knn_accuracy(xtr, ytr, xte, yte, ks=(1, 20))
        print(
            json.dumps(overrides),
            "loss",
            [round(v, 3) for v in history.history["loss"]],
            f"lnK {np.log(c.num_prototypes):.3f}",
            f"knn k1 {acc['knn_top1_k1']:.3f} k20 {acc['knn_top1_k20']:.3f}",
            f"{time.time() - t0:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
