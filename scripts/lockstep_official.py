"""kd_keras and the authors' own training code stepping in lockstep (issue 21).

    python scripts/lockstep_official.py --official_repo=PATH --method=simreg --steps=20 \\
        --torch_python=/work/venv-bench/bin/python [--tiny] [--fixture=tests/data/...]

Run from the repository root with kd_keras' interpreter. --official_repo is an unmodified
checkout (or bare git directory) of the authors' repository (SimReg: UCDvision/simreg; SEED:
jacobswan1/SEED, --method=seed runs scripts/lockstep_seed.py); it is
exported to a temporary directory and run there by scripts/lockstep_torch_side.py under the
--torch_python interpreter, never copied into this repository.

Both sides start from the same weights and see the same batches at the same learning rate:
  * the views are kd_keras' (`augment.weak_view` of synthetic images), normalised once by
    kd_keras' ImageNet normalisation and handed to torch as NCHW arrays;
  * the official code initialises its student and prediction MLP (torch's init); the student
    is converted with kd_keras' converter (`teachers.conversion.convert`), the MLP copied
    (Linear transposed, BN as is), the teacher checkpoint converted and loaded as a teacher;
  * the official SimReg sets the lr once per epoch (cosine staircase): kd_keras trains with
    --schedule=epoch_cosine and the same --epochs and steps per epoch, lr_scaling none;
  * the official SGD (momentum 0.9, coupled weight decay 1e-4) = --momentum_form=torch.
Compared: the per-step losses (relative difference) and the final student and head weights
(BN running statistics included). The last stdout line is a JSON object with steps,
max_rel_loss_diff, max_abs_weight_diff, max_rel_weight_diff and the per-step losses.

--fixture=PATH also writes a golden trajectory for tests/test_lockstep_golden.py (use
--tiny: one block per stage, widths 4..32, 16 px): kd_keras' initial student and head
weights, the student views, the official teacher's targets, the official per-step losses,
learning rates and final weights.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

TINY_ARCH = "resnet-basic-1.1.1.1-4-stem64"  # the official ResNet class, width 1/16, 1 block
# torch nn.Sequential index of the official 4-layer MLP -> kd_keras layer of prediction_head.
MLP4_LAYERS = {
    "0": "linear1",
    "1": "bn1",
    "3": "linear2",
    "4": "linear3",
    "5": "bn3",
    "7": "linear4",
}
BN_FIELDS = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official_repo", required=True, help="authors' repository (checkout/git dir)")
    import lockstep_compress  # CompRess-1q / 2q (scripts/lockstep_compress.py)
    import lockstep_seed  # SEED (scripts/lockstep_seed.py)

    p.add_argument(
        "--method", default="simreg", choices=["simreg", *lockstep_compress.METHODS, "seed"]
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--torch_python", required=True, help="interpreter with torch, torchvision")
    p.add_argument("--steps_per_epoch", type=int, default=5, help="the lr changes every epoch")
    p.add_argument("--epochs", type=int, default=None, help="cosine length; default: all steps")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--momentum", type=float, default=0.9, help="official --sgd_momentum")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="official --weight_decay")
    p.add_argument("--tiny", action="store_true", help="tiny ResNets (fixtures, quick checks)")
    p.add_argument("--momentum_form", default="torch", choices=["torch", "keras"])
    p.add_argument(
        "--head_init",
        default="transfer",
        choices=["transfer", "torch", "keras"],
        help="transfer: the official MLP's initial weights; torch/keras: kd_keras' "
        "own draw (a loss curve only, weights differ)",
    )
    p.add_argument("--fixture", default=None, help="write a golden trajectory .npz here")
    p.add_argument(
        "--noise_floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run kd_keras from its initial student scaled by (1 + --noise_scale): how "
        "far a rounding-sized change of the start alone moves this trajectory",
    )
    p.add_argument("--noise_scale", type=float, default=1e-7)
    p.add_argument("--work", default=None, help="scratch directory (default: a new temp dir)")
    lockstep_compress.add_args(p)
    lockstep_seed.add_arguments(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.steps_per_epoch < 1:
        p.error("--steps and --steps_per_epoch must be positive.")
    args.epochs = args.epochs or -(-args.steps // args.steps_per_epoch)
    if args.epochs * args.steps_per_epoch < args.steps:
        p.error("--epochs x --steps_per_epoch must cover --steps.")
    if not os.path.exists(args.official_repo):
        p.error(f"--official_repo={args.official_repo} does not exist.")
    return args


def export_official(repo, dest, python_only=False):
    """An unmodified copy of `repo`'s HEAD (or the directory itself when it is no git repo).

    python_only: export the .py files alone; a partial mirror may lack files the code never
    reads (a project page's images), and `git archive` of the whole tree would fail on them.
    """
    git_dir = repo if os.path.isfile(os.path.join(repo, "HEAD")) else os.path.join(repo, ".git")
    if not os.path.exists(git_dir):
        return os.path.abspath(repo)
    git = ["git", f"--git-dir={git_dir}"]
    paths = []
    if python_only:
        names = subprocess.run(
            [*git, "ls-tree", "-r", "--name-only", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        paths = ["--", *(n for n in names if n.endswith(".py"))]
    archive = subprocess.run(
        [*git, "archive", "HEAD", *paths], check=True, capture_output=True
    ).stdout
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def make_views(args):
    """kd_keras' weak views of synthetic images, rounded to 8 bits (so a fixture stores them
    exactly as uint8): student and teacher float32 [steps, B, S, S, 3] in [0, 1]."""
    import tensorflow as tf

    from kd_keras.data import augment

    rng = np.random.default_rng(args.seed)
    n, side = args.steps * args.batch_size, 2 * args.image_size
    # Smooth colour fields with a few edges: low-frequency noise, upsampled, plus stripes.
    base = rng.uniform(size=(n, 8, 8, 3)).astype(np.float32)
    images = tf.image.resize(base, [side, side]).numpy()
    stripes = (np.arange(side) // rng.integers(3, 9, size=(n, 1, 1)) % 2).astype(np.float32)
    images = np.clip(0.8 * images + 0.2 * stripes[..., None], 0.0, 1.0)
    views = []
    for offset in (0, 1):
        out = [
            augment.weak_view(
                tf.constant(img), tf.constant([args.seed, 2 * i + offset]), args.image_size
            )
            for i, img in enumerate(images)
        ]
        views.append(
            from_uint8(np.round(np.stack([v.numpy() for v in out]) * 255).astype(np.uint8))
        )
    shape = (args.steps, args.batch_size, args.image_size, args.image_size, 3)
    return views[0].reshape(shape), views[1].reshape(shape)


def from_uint8(values):
    """uint8 pixels -> float32 in [0, 1], the one conversion both sides and the test use."""
    return values.astype(np.float32) / np.float32(255)


def to_nchw_normalised(views):
    from kd_keras.nets import backbones

    flat = views.reshape((-1, *views.shape[2:]))
    normal = np.asarray(backbones.normalize_images(flat, "imagenet"), np.float32)
    return np.ascontiguousarray(normal.reshape(views.shape).transpose(0, 1, 4, 2, 3))


def run_torch_side(args, script, official_dir, work, extra_flags=(), what="the official code"):
    """Runs scripts/`script` under --torch_python with the flags every torch half takes plus
    `extra_flags`; returns the JSON object of its last stdout line."""
    cmd = [
        args.torch_python,
        os.path.join(HERE, script),
        f"--official_dir={official_dir}",
        f"--work={work}",
        f"--steps_per_epoch={args.steps_per_epoch}",
        f"--steps={args.steps}",
        f"--epochs={args.epochs}",
        f"--lr={args.lr}",
        f"--momentum={args.momentum}",
        f"--weight_decay={args.weight_decay}",
        f"--batch_size={args.batch_size}",
        f"--seed={args.seed}",
        *extra_flags,
        *(["--tiny"] if args.tiny else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"lockstep: {what} failed (exit {done.returncode}).")
    return json.loads(done.stdout.strip().splitlines()[-1])


def convert(checkpoint, out, arch):
    from kd_keras.teachers import conversion

    conversion.convert(
        conversion.ConvertConfig(
            checkpoint=checkpoint, out=out, arch=arch, layout="torchvision", overwrite=True
        )
    )
    return out


def load_converted(directory):
    import keras

    return keras.saving.load_model(os.path.join(directory, "backbone.keras"), compile=False)


def converted_weights(work, name, arch):
    """weights_by_path of the torch backbone checkpoint work/`name`.pth, converted."""
    pth, out = os.path.join(work, f"{name}.pth"), os.path.join(work, name)
    return weights_by_path(load_converted(convert(pth, out, arch)))


def weight_name(layer, weight):
    """A weight's name as "layer/weight", without the model's own name."""
    return f"{layer.name}/{weight.path.split('/')[-1]}"


def weights_by_path(model):
    """{"layer/weight": array} of a backbone (the path without the model's own name)."""
    return {weight_name(layer, w): np.asarray(w) for layer in model.layers for w in layer.weights}


def assign_weights(model, values, scale=None):
    """Sets every weight of `model` from {"layer/weight": array}, times float32 `scale` if set."""
    for layer in model.layers:
        for w in layer.weights:
            value = values[weight_name(layer, w)]
            w.assign(value if scale is None else value * np.float32(scale))


def prefixed(parts):
    """{"student": {k: v}, "head": {...}} -> {"student/k": v, "head/...": ...}."""
    return {f"{part}/{k}": v for part, values in parts.items() for k, v in values.items()}


def head_from_torch(head, arrays):
    """Sets kd_keras' mlp4 prediction head from the official MLP's state dict arrays."""
    for index, name in MLP4_LAYERS.items():
        layer = head.get_layer(name)
        if name.startswith("linear"):
            layer.kernel.assign(arrays[f"{index}.weight"].T)
            layer.bias.assign(arrays[f"{index}.bias"])
        else:
            for field, key in BN_FIELDS.items():
                getattr(layer, field).assign(arrays[f"{index}.{key}"])


def head_arrays_as_keras(arrays):
    """The official MLP's arrays under kd_keras' names ("linear1/kernel", "bn1/gamma", ...)."""
    out = {}
    for index, name in MLP4_LAYERS.items():
        if name.startswith("linear"):
            out[f"{name}/kernel"] = arrays[f"{index}.weight"].T
            out[f"{name}/bias"] = arrays[f"{index}.bias"]
        else:
            for field, key in BN_FIELDS.items():
                out[f"{name}/{field}"] = arrays[f"{index}.{key}"]
    return out


class CachedTeacher:
    """What a method needs of a teacher when the batch carries its features."""

    def __init__(self, name, feature_dim):
        self.name, self.feature_dim = name, int(feature_dim)


def build_kd_keras(student_arch, image_size, teacher, steps_per_epoch, epochs, lr, options):
    """kd_keras' SimReg (student, mlp4 head, torch/keras SGD, epoch-cosine) ready to step.

    Args:
      options: dict with momentum_form, head_init ("transfer" counts as torch), weight_decay.
    Returns:
      (method, train_step function on a batch dict -> loss float).
    """
    from kd_keras import config

    head_init = "keras" if options["head_init"] == "keras" else "torch"
    cfg = config.Config(
        workdir=tempfile.gettempdir(),
        method="simreg",
        sync_bn=False,
        model=config.ModelConfig(student="resnet18", small_stem=False, head_init=head_init),
        optim=config.OptimConfig(
            batch_size=options["batch_size"],
            epochs=epochs,
            lr=lr,
            lr_scaling="none",
            schedule="epoch_cosine",
            momentum=options["momentum"],
            momentum_form=options["momentum_form"],
            weight_decay=options["weight_decay"],
        ),
    )
    return ready_to_step(cfg, student_arch, image_size, teacher, steps_per_epoch)


def ready_to_step(cfg, student_arch, image_size, teacher, steps_per_epoch):
    """kd_keras' method for Config `cfg` on a new student, compiled and built.

    Returns:
      (method, step function: batch dict -> loss float).
    """
    import tensorflow as tf

    from kd_keras.methods import registry
    from kd_keras.nets import backbones
    from kd_keras.optim import optimizers

    student = backbones.build_resnet(student_arch, image_size, norm="imagenet")
    method = registry.build_method(cfg, student, [teacher], steps_per_epoch=steps_per_epoch)
    method.compile(optimizer=optimizers.make_optimizer(cfg.optim, steps_per_epoch))
    method.build((None, image_size, image_size, 3))
    method.optimizer.build(method.trainable_variables)
    train = tf.function(method.train_step)

    def step(batch):
        method.reset_metrics()
        return float(train(batch)["loss"])

    return method, step


def rel_loss_diff(reference, losses):
    """|losses - reference| / |reference| per step, float64 [steps]."""
    return np.abs(np.asarray(losses) - reference) / np.abs(reference)


def noise_floor_of(losses, perturbed, label="noise floor"):
    """max relative difference of a perturbed twin's losses from `losses` (per step on stderr)."""
    rel = rel_loss_diff(losses, perturbed)
    print(f"{label} per step:", rel.tolist(), file=sys.stderr)
    return float(rel.max())


def loss_agreement(rel):
    """The result's max and mean of the per-step relative loss differences `rel`."""
    return {"max_rel_loss_diff": float(rel.max()), "mean_rel_loss_diff": float(rel.mean())}


def trajectories(losses, official, torch_seconds, keras_seconds):
    """The result's closing entries: both sides' per-step losses, the official rates, and
    how long each side took."""
    return {
        "losses_kd_keras": losses,
        "losses_official": official["losses"],
        "lrs_official": official["lrs"],
        "seconds_official_process": round(torch_seconds, 1),
        "seconds_kd_keras_steps": round(keras_seconds, 1),
    }


def official_arrays(official, work):
    """The fixture arrays every method stores of the official run."""
    return {
        "teacher_features": np.load(os.path.join(work, "teacher_features.npy")).astype(np.float32),
        "official_losses": np.asarray(official["losses"], np.float64),
        "official_lrs": np.asarray(official["lrs"], np.float64),
    }


def save_fixture(path, arrays, states):
    """Writes `arrays` plus every {prefix: {part: {name: array}}} as "prefix/part/name"."""
    arrays = dict(arrays)
    for prefix, state in states.items():
        arrays.update({f"{prefix}/{k}": v for k, v in prefixed(state).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **arrays)


def worst_weights(got, expected, count=5):
    """The `count` names with the largest max |a - b| / max |b|, with that number."""
    rel = {
        k: float(np.abs(got[k] - expected[k]).max() / max(np.abs(expected[k]).max(), 1e-12))
        for k in expected
    }
    trained = {k: v for k, v in rel.items() if "moving_" not in k}
    ranked = sorted(rel.items(), key=lambda kv: -kv[1])[:count]
    ranked += sorted(trained.items(), key=lambda kv: -kv[1])[:count]
    return dict(ranked)


def compare_weights(got, expected):
    """(max |a - b|, max |a - b| / max |b|) over the names both dicts hold."""
    missing = sorted(set(expected) - set(got))
    if missing:
        raise SystemExit(f"lockstep: kd_keras has no weights {missing[:5]}")
    abs_diff = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    rel = max(
        float(np.abs(got[k] - expected[k]).max() / max(np.abs(expected[k]).max(), 1e-12))
        for k in expected
    )
    return abs_diff, rel


def main(argv=None):
    args = parse_args(argv)
    if args.method.startswith("compress_"):
        import lockstep_compress

        return lockstep_compress.main(args)
    if args.method == "seed":
        import lockstep_seed

        return lockstep_seed.run(args)
    started = time.time()
    work = args.work or tempfile.mkdtemp(prefix="lockstep_")
    os.makedirs(work, exist_ok=True)
    official_dir = export_official(args.official_repo, os.path.join(work, "official"))

    student_views, teacher_views = make_views(args)
    np.savez(
        os.path.join(work, "inputs.npz"),
        student_nchw=to_nchw_normalised(student_views),
        teacher_nchw=to_nchw_normalised(teacher_views),
    )
    official = run_torch_side(
        args, "lockstep_torch_side.py", official_dir, work, [f"--method={args.method}"]
    )
    torch_seconds = time.time() - started

    from kd_keras.teachers import loading

    student_arch = TINY_ARCH if args.tiny else "resnet18"
    teacher_arch = TINY_ARCH if args.tiny else "resnet50"
    j = lambda name: os.path.join(work, name)  # noqa: E731
    teacher_dir = convert(j("teacher.pth"), j("teacher_converted"), teacher_arch)
    teacher = loading.load_teacher(loading.parse_teacher_spec(teacher_dir), args.image_size)
    options = dict(
        momentum_form=args.momentum_form,
        head_init=args.head_init,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        batch_size=args.batch_size,
    )
    method, step = build_kd_keras(
        student_arch, args.image_size, teacher, args.steps_per_epoch, args.epochs, args.lr, options
    )
    assign_weights(method.student, converted_weights(work, "student_init", student_arch))
    head = method.heads[0]
    if args.head_init == "transfer":
        head_from_torch(head, dict(np.load(j("head_init.npz"))))
    initial = {
        "student": weights_by_path(method.student),
        "head": weights_by_path(head),
    }

    keras_started = time.time()
    views = [
        {"student": s, "teacher": t} for s, t in zip(student_views, teacher_views, strict=True)
    ]
    losses = [step(batch) for batch in views]
    keras_seconds = time.time() - keras_started
    noise = None
    if args.noise_floor:
        noise = noise_floor(args, student_arch, teacher, options, initial, views, losses)

    rel = rel_loss_diff(np.asarray(official["losses"], np.float64), losses)
    final_student = converted_weights(work, "student_final", student_arch)
    final_head = head_arrays_as_keras(dict(np.load(j("head_final.npz"))))
    student_abs, student_rel = compare_weights(weights_by_path(method.student), final_student)
    head_abs, head_rel = compare_weights(weights_by_path(head), final_head)

    if args.fixture:
        write_fixture(args, student_views, work, official, initial, final_student, final_head)
    result = {
        "method": args.method,
        "steps": args.steps,
        "steps_per_epoch": args.steps_per_epoch,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "student": student_arch,
        "teacher": teacher_arch,
        "momentum_form": args.momentum_form,
        "head_init": args.head_init,
        **loss_agreement(rel),
        "noise_floor_max_rel_loss_diff": noise,
        "max_abs_weight_diff": max(student_abs, head_abs),
        "max_rel_weight_diff": max(student_rel, head_rel),
        "student_max_abs_weight_diff": student_abs,
        "head_max_abs_weight_diff": head_abs,
        "worst_student_weights": worst_weights(weights_by_path(method.student), final_student),
        "worst_head_weights": worst_weights(weights_by_path(head), final_head),
        **trajectories(losses, official, torch_seconds, keras_seconds),
    }
    print(json.dumps(result))
    return result


def noise_floor(args, student_arch, teacher, options, initial, views, losses):
    """max relative loss difference between kd_keras' run and kd_keras from the same start with
    every student weight scaled by (1 + --noise_scale), about one float32 rounding: how much
    this trajectory amplifies a rounding-sized difference (ReLU and max-pool decisions near
    ties flip, BN biases get cancellation-dominated gradients)."""
    method, step = build_kd_keras(
        student_arch, args.image_size, teacher, args.steps_per_epoch, args.epochs, args.lr, options
    )
    assign_weights(method.student, initial["student"], scale=1 + args.noise_scale)
    assign_weights(method.heads[0], initial["head"])
    return noise_floor_of(losses, [step(batch) for batch in views])


def write_fixture(args, student_views, work, official, initial, final_student, final_head):
    """The golden trajectory tests/test_lockstep_golden.py replays without torch."""
    arrays = {
        "student_views_uint8": np.round(student_views * 255).astype(np.uint8),
        **official_arrays(official, work),
        "settings": np.asarray(
            json.dumps(
                {
                    "student_arch": TINY_ARCH if args.tiny else "resnet18",
                    "image_size": args.image_size,
                    "batch_size": args.batch_size,
                    "steps_per_epoch": args.steps_per_epoch,
                    "epochs": args.epochs,
                    "lr": args.lr,
                    "weight_decay": args.weight_decay,
                    "momentum": args.momentum,
                    "source": "UCDvision/simreg main.py via scripts/lockstep_official.py",
                }
            )
        ),
    }
    final = {"student": final_student, "head": final_head}
    save_fixture(args.fixture, arrays, {"init": initial, "final": final})


if __name__ == "__main__":
    main()
