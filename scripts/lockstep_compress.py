"""CompRess-1q / CompRess-2q in lockstep with the authors' code (issue 21), the kd_keras half.

    python scripts/lockstep_official.py --official_repo=PATH_TO_UMBCvision_CompRess \\
        --method=compress_1q|compress_2q --steps=20 --torch_python=/work/venv-bench/bin/python \\
        --lr=0.01 [--bank_size=K --lr_decay_epochs=2,3 --tiny --fixture=...]

Called by scripts/lockstep_official.py (`add_args`, `main`); the torch half is
scripts/lockstep_torch_compress.py, which runs the official `train_student.py` (2q) or
`train_student_one_queue.py` (1q) unmodified from an export of the repository.

Both sides start from the same state and see the same batches at the same learning rate:
  * one view per image (kd_keras' `weak_view` of synthetic images, 8-bit), seen by the
    teacher, the student and (2q) the key copy, as the official loop feeds `inputs` to all;
  * the official script draws the student (and, 1q, its linear `fc`) with torch's init and
    its banks with `torch.rand`; the student goes through kd_keras' converter, the `fc`
    becomes kd_keras' linear head, the bank rows and write index are copied into the
    `FeatureBank` variables, and the 2q key copy starts as the student (as the official
    `moment_update(student, student_key, 0)`);
  * the teacher: the official ResNet with torch's init and random BN statistics, loaded by
    the official code from a MoCo-layout checkpoint and by kd_keras from its conversion;
  * official SGD (momentum 0.9, coupled weight decay 1e-4 on every parameter) =
    --momentum_form=torch; the official `adjust_learning_rate` (x --lr_decay_rate at the
    1-based epochs after --lr_decay_epochs) = --schedule=step with the same milestones;
  * --bank_rows=as_stored (default here): the loss reads bank rows as the official
    `SampleSimilarities` does, without normalising the random initial rows again.
Compared: per-step losses, the final student (and 1q head, 2q key copy) weights and the
final bank rows. With --fixture, a golden trajectory for
tests/test_lockstep_compress_golden.py.
"""

import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import lockstep_official as base  # noqa: E402

METHODS = ("compress_1q", "compress_2q")


def add_args(parser):
    """CompRess' own settings of the lockstep (defaults: the official scripts', except the
    bank size and the lr milestones, shrunk to a few steps)."""
    g = parser.add_argument_group("compress_1q / compress_2q")
    g.add_argument("--bank_size", type=int, default=1000, help="--compress_memory_size")
    g.add_argument("--compress_t", type=float, default=0.04, help="official --compress_t")
    g.add_argument("--alpha", type=float, default=0.999, help="official --alpha (2q key)")
    g.add_argument(
        "--lr_decay_epochs", default="2,3", help="official --lr_decay_epochs (1-based > m)"
    )
    g.add_argument("--lr_decay_rate", type=float, default=0.2, help="official --lr_decay_rate")
    g.add_argument(
        "--bank_rows",
        default="as_stored",
        choices=["as_stored", "unit"],
        help="kd_keras --compress_bank_rows (as_stored = the official reading of the rows)",
    )


def run_torch_side(args, official_dir, work):
    """The official CompRess script's run (scripts/lockstep_torch_compress.py)."""
    flags = [
        f"--method={args.method}",
        f"--lr_decay_epochs={args.lr_decay_epochs}",
        f"--lr_decay_rate={args.lr_decay_rate}",
        f"--bank_size={args.bank_size}",
        f"--temperature={args.compress_t}",
        f"--alpha={args.alpha}",
    ]
    return base.run_torch_side(args, "lockstep_torch_compress.py", official_dir, work, flags)


def settings(args):
    """What the kd_keras side needs to rebuild the run (also stored in a fixture)."""
    return {
        "method": args.method,
        "student_arch": base.TINY_ARCH if args.tiny else "resnet18",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps_per_epoch": args.steps_per_epoch,
        "epochs": args.epochs,
        "lr": args.lr,
        "lr_decay_epochs": [int(m) for m in args.lr_decay_epochs.split(",")],
        "lr_decay_rate": args.lr_decay_rate,
        "weight_decay": args.weight_decay,
        "momentum": args.momentum,
        "bank_size": args.bank_size,
        "temperature": args.compress_t,
        "alpha": args.alpha,
        "source": "UMBCvision/CompRess train_student*.py via scripts/lockstep_official.py",
    }


def build_kd_keras(s, teacher, momentum_form="torch", bank_rows="as_stored", head_init="torch"):
    """kd_keras' CompRess for settings `s` (see `settings`) around a teacher, ready to step.

    Returns:
      (method, step function: batch dict -> loss float).
    """
    from kd_keras import config

    one_queue = s["method"] == "compress_1q"
    options = {
        "bank_size": s["bank_size"],
        "compress_temperature": s["temperature"],
        "compress_student_features": "head" if one_queue else "backbone",
        "compress_bank_rows": bank_rows,
    }
    if not one_queue:
        options["compress_momentum"] = s["alpha"]
    cfg = config.Config(
        workdir=tempfile.gettempdir(),
        method=s["method"],
        seed=0,
        sync_bn=False,
        model=config.ModelConfig(
            student="resnet18", small_stem=False, head="linear", head_init=head_init
        ),
        optim=config.OptimConfig(
            batch_size=s["batch_size"],
            epochs=s["epochs"],
            lr=s["lr"],
            lr_scaling="none",
            schedule="step",
            lr_decay_epochs=tuple(s["lr_decay_epochs"]),
            lr_decay_rate=s["lr_decay_rate"],
            momentum=s["momentum"],
            momentum_form=momentum_form,
            weight_decay=s["weight_decay"],
        ),
        method_options=options,
    )
    return base.ready_to_step(
        cfg, s["student_arch"], s["image_size"], teacher, s["steps_per_epoch"]
    )


def head_weights(fc):
    """The official linear `fc` ({"weight", "bias"}) as kd_keras' linear head weights."""
    return {"linear1/kernel": fc["weight"].T, "linear1/bias": fc["bias"]} if fc else {}


def bank_arrays(banks):
    """Official {"teacher_memory", "teacher_index", ...} -> kd_keras' {"teacher_bank/bank", ...}."""
    out = {}
    for side in ("teacher", "student"):
        if f"{side}_memory" in banks:
            out[f"{side}_bank/bank"] = np.asarray(banks[f"{side}_memory"], np.float32)
            out[f"{side}_bank/pointer"] = np.asarray(banks[f"{side}_index"], np.int32)
    return out


def set_state(method, state):
    """Assigns {"student": {...}, "head": {...}, "banks": {...}} to kd_keras' CompRess; the 2q
    key copy becomes the student (official `moment_update(student, student_key, 0)`)."""
    parts = {"student": method.student}
    if method.head is not None:
        parts["head"] = method.head
    for part, model in parts.items():
        base.assign_weights(model, state[part])
    for name, value in state["banks"].items():
        bank, field = name.split("/")
        getattr(getattr(method, bank), field).assign(value)
    if method.key_encoder is not None:
        networks = method.key_encoder._networks.items
        for copies, network in zip(method.key_encoder.copies, networks, strict=True):
            for copy, v in zip(copies, network.trainable_variables, strict=True):
                copy.assign(v)


def read_state(method):
    """kd_keras' CompRess state under the names `set_state` takes, plus "key" (2q)."""
    state = {"student": base.weights_by_path(method.student)}
    if method.head is not None:
        state["head"] = base.weights_by_path(method.head)
    banks = {}
    for side in ("teacher_bank", "student_bank"):
        bank = getattr(method, side)
        if bank is not None:
            banks[f"{side}/bank"] = np.asarray(bank.bank)
            banks[f"{side}/pointer"] = np.asarray(bank.pointer)
    state["banks"] = banks
    if method.key_encoder is not None:
        names = {
            id(w): base.weight_name(layer, w)
            for layer in method.student.layers
            for w in layer.trainable_weights
        }
        copies = method.key_encoder.copies[0]
        state["key"] = {
            names[id(v)]: np.asarray(c)
            for v, c in zip(method.student.trainable_variables, copies, strict=True)
        }
    return state


def compare_state(got, expected):
    """{part: (max abs diff, max rel diff)} over student / head / key / banks; BN moving
    variances are left out (biased vs unbiased running variance, docs/lockstep.md)."""
    out = {}
    for part, values in expected.items():
        trained = {k: v for k, v in values.items() if "moving_variance" not in k}
        if trained:
            out[part] = base.compare_weights(got[part], trained)
    return out


def main(args):
    started = time.time()
    work = args.work or tempfile.mkdtemp(prefix="lockstep_compress_")
    os.makedirs(work, exist_ok=True)
    official_dir = base.export_official(
        args.official_repo, os.path.join(work, "official"), python_only=True
    )
    views, _ = base.make_views(args)
    np.savez(os.path.join(work, "inputs.npz"), student_nchw=base.to_nchw_normalised(views))
    official = run_torch_side(args, official_dir, work)
    torch_seconds = time.time() - started

    from kd_keras.teachers import loading

    s = settings(args)
    arch = s["student_arch"]
    teacher_arch = base.TINY_ARCH if args.tiny else "resnet50"
    j = lambda name: os.path.join(work, name)  # noqa: E731
    teacher_dir = base.convert(j("teacher.pth"), j("teacher_converted"), teacher_arch)
    teacher = loading.load_teacher(loading.parse_teacher_spec(teacher_dir), args.image_size)

    initial = {
        "student": base.converted_weights(work, "student_init", arch),
        "head": head_weights(dict(np.load(j("head_init.npz")))),
        "banks": bank_arrays(np.load(j("banks_init.npz"))),
    }
    if args.method == "compress_2q":
        del initial["head"]
    head_init = "torch" if args.head_init == "transfer" else args.head_init
    method, step = build_kd_keras(s, teacher, args.momentum_form, args.bank_rows, head_init)
    if args.head_init != "transfer" and "head" in initial:
        initial["head"] = base.weights_by_path(method.head)
    set_state(method, initial)

    keras_started = time.time()
    batches = [{"student": v} for v in views]
    losses = [step(b) for b in batches]
    keras_seconds = time.time() - keras_started

    noise = None
    if args.noise_floor:
        other, other_step = build_kd_keras(s, teacher, args.momentum_form, args.bank_rows)
        scaled = dict(initial)
        scale = np.float32(1 + args.noise_scale)
        scaled["student"] = {k: v * scale for k, v in initial["student"].items()}
        set_state(other, scaled)
        perturbed = [other_step(b) for b in batches]
        noise = base.noise_floor_of(losses, perturbed)

    expected = {
        "student": base.converted_weights(work, "student_final", arch),
        "banks": bank_arrays(np.load(j("banks_final.npz"))),
    }
    if args.method == "compress_1q":
        expected["head"] = head_weights(dict(np.load(j("head_final.npz"))))
    else:
        # The key's BN running statistics are never used (its BN runs in training mode).
        key = base.converted_weights(work, "key_final", arch)
        expected["key"] = {k: v for k, v in key.items() if "moving_" not in k}
    got = read_state(method)
    diffs = compare_state(got, expected)

    rel = base.rel_loss_diff(np.asarray(official["losses"], np.float64), losses)
    if args.fixture:
        write_fixture(args.fixture, s, views, work, official, initial, expected)
    weights = {k: v for k, v in diffs.items() if k != "banks"}
    result = {
        **{k: s[k] for k in ("method", "batch_size", "image_size", "steps_per_epoch", "epochs")},
        "steps": args.steps,
        "student": arch,
        "teacher": teacher_arch,
        "bank_size": args.bank_size,
        "momentum_form": args.momentum_form,
        "head_init": args.head_init,
        "bank_rows": args.bank_rows,
        **base.loss_agreement(rel),
        "noise_floor_max_rel_loss_diff": noise,
        "max_abs_weight_diff": max(v[0] for v in weights.values()),
        "max_rel_weight_diff": max(v[1] for v in weights.values()),
        "abs_rel_diff_by_part": diffs,
        "worst_student_weights": base.worst_weights(got["student"], expected["student"]),
        "rel_loss_diff_per_step": rel.tolist(),
        **base.trajectories(losses, official, torch_seconds, keras_seconds),
    }
    print(json.dumps(result))
    return result


def write_fixture(path, s, views, work, official, initial, expected):
    """The golden trajectory: views (uint8), the official teacher's raw features, losses,
    rates, and the initial and final state in kd_keras' names."""
    arrays = {
        "views_uint8": np.round(views * 255).astype(np.uint8),
        **base.official_arrays(official, work),
        "settings": np.asarray(json.dumps(s)),
    }
    # The 2q key copy's final weights are left out (130 kB for the tiny net): the student bank
    # rows it wrote, and the losses scored against them, already pin it.
    final = {part: values for part, values in expected.items() if part != "key"}
    base.save_fixture(path, arrays, {"init": initial, "final": final})
