"""kd_keras' SEED stepping in lockstep with SEED's own `main.py` (jacobswan1/SEED; issue 21).

    python scripts/lockstep_official.py --official_repo=PATH --method=seed --steps=20 \\
        --torch_python=/work/venv-bench/bin/python [--tiny] [--fixture=...]

`lockstep_official.py` parses the flags and hands --method=seed to `run` here. The official
side is scripts/lockstep_torch_seed.py (run under --torch_python on an export of the authors'
repository). What both sides share:
  * the views: kd_keras' weak views of synthetic images (8-bit), normalised once by kd_keras;
    SEED feeds ONE image to student and teacher, kd_keras' --aug_mode=same does the same;
  * the teacher: a MoCo v2 checkpoint (official ResNet + fc MLP, torch's init, random BN)
    that the official code loads with --teacher_ssl=moco; kd_keras converts its backbone with
    `teachers.conversion` (layout moco, which drops the MLP) and puts the MLP back as two
    Dense layers (SEED distils the 128-d projection; see docs/lockstep.md);
  * the student backbone (torch's init, converted) and its MLP fc = kd_keras' --head=mlp2
    --head_hidden_dims=<m> --head_batch_norm=false (copied: Linear weights transposed);
  * the queue: the official random unit vectors, [dim, K] transposed into kd_keras' bank;
  * SGD momentum 0.9, coupled weight decay 1e-4 (--momentum_form=torch), lr set once per
    epoch: SEED's 5 warm-up epochs (a hold at --lr on one process) then the cosine at the
    epoch = --schedule=epoch_cosine --warmup_epochs=5 --lr_scaling=none;
  * tau_S = --temp, tau_T = --distill-t, K = --queue, dim = --dim.
Compared: per-step losses, final student / head weights (BN running statistics included,
and the worst one without moving variances), the final queue (what was pushed, in which rows)
and kd_keras' teacher embeddings against the official ones. Controls: the same kd_keras run
fed the official teacher embeddings (a teacher cache: the student side alone), and two noise
floors, kd_keras against itself with (a) the student, (b) every teacher weight scaled by
(1 + --noise_scale): with tau_T = 1e-4 a rounding-sized teacher difference reaches the targets
multiplied by 1e4. The last stdout line is JSON (see `run`).
"""

import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import lockstep_official as lo  # noqa: E402

SEED_WARMUP_EPOCHS = 5  # main.py: args.warmup_epochs = 5 (both paths)
TEACHER_NAME = "official"


def add_arguments(parser):
    """SEED's own knobs on lockstep_official.py's parser (ignored by --method=simreg)."""
    parser.add_argument("--queue_size", type=int, default=None, help="SEED --queue (K)")
    parser.add_argument("--seed_dim", type=int, default=128, help="SEED --dim")
    parser.add_argument("--student_temperature", type=float, default=0.2, help="SEED --temp")
    parser.add_argument("--teacher_temperature", type=float, default=1e-4, help="SEED --distill-t")


def kd_keras_config(s, momentum_form="torch", student_temperature=None):
    """kd_keras' Config matching the official SEED run described by settings dict `s`."""
    from kd_keras import config

    return config.Config(
        workdir=tempfile.gettempdir(),
        method="seed",
        sync_bn=False,
        model=config.ModelConfig(
            student="resnet18",
            small_stem=False,
            head="mlp2",
            head_hidden_dims=(s["student_dim"],),
            head_batch_norm=False,
            head_init="torch",
        ),
        optim=config.OptimConfig(
            batch_size=s["batch_size"],
            epochs=s["epochs"],
            lr=s["lr"],
            lr_scaling="none",
            schedule="epoch_cosine",
            warmup_epochs=s["warmup_epochs"],
            momentum=s["momentum"],
            momentum_form=momentum_form,
            weight_decay=s["weight_decay"],
        ),
        method_options={
            "queue_size": s["queue_size"],
            "seed_student_temperature": student_temperature or s["student_temperature"],
            "seed_teacher_temperature": s["teacher_temperature"],
        },
    )


def build_kd_keras(s, teacher, momentum_form="torch", student_temperature=None):
    """kd_keras' SEED on settings `s` ready to step: (method, step(batch) -> loss float)."""
    cfg = kd_keras_config(s, momentum_form, student_temperature)
    return lo.ready_to_step(cfg, s["student_arch"], s["image_size"], teacher, s["steps_per_epoch"])


def set_state(method, initial, queue, student_scale=1.0):
    """Student and head weights from `initial` ({"student": {...}, "head": {...}}), the queue
    from float32 [K, dim], the queue pointer 0."""
    lo.assign_weights(method.student, initial["student"], scale=student_scale)
    lo.assign_weights(method.head, initial["head"])
    method.queue.bank.assign(queue)
    method.queue.pointer.assign(0)


def trained_weight_diff(got, expected):
    """(name, max |a - b|) of the worst weight, BN moving variances left out (Keras averages
    the biased batch variance, torch the unbiased one: a known, training-neutral deviation)."""
    diffs = {
        k: float(np.abs(got[k] - expected[k]).max()) for k in expected if "moving_variance" not in k
    }
    worst = max(diffs, key=diffs.get)
    return [worst, diffs[worst]]


def head_arrays_as_keras(arrays):
    """SEED's student MLP (fc.0, fc.2 of torch) under kd_keras' mlp2 names, no BN."""
    return {
        "linear1/kernel": arrays["0.weight"].T,
        "linear1/bias": arrays["0.bias"],
        "linear2/kernel": arrays["2.weight"].T,
        "linear2/bias": arrays["2.bias"],
    }


def teacher_with_projection(converted_dir, fc, image_size):
    """kd_keras' teacher: the converted MoCo backbone, then MoCo v2's MLP (fc.0 ReLU fc.2)."""
    import keras

    from kd_keras.teachers import loading

    backbone = lo.load_converted(converted_dir)
    inputs = keras.Input((image_size, image_size, 3))
    hidden = keras.layers.Dense(fc["0.weight"].shape[0], activation="relu", name="proj1")
    out = keras.layers.Dense(fc["2.weight"].shape[0], name="proj2")
    model = keras.Model(inputs, out(hidden(backbone(inputs))))
    hidden.set_weights([fc["0.weight"].T, fc["0.bias"]])
    out.set_weights([fc["2.weight"].T, fc["2.bias"]])
    spec = loading.TeacherSpec(kind="converted", path=converted_dir, name=TEACHER_NAME)
    return loading.Teacher(spec, model, image_size)


def run_torch_side(args, s, official_dir, work):
    """The official SEED run (scripts/lockstep_torch_seed.py) on settings `s`."""
    flags = [
        f"--queue={s['queue_size']}",
        f"--dim={s['dim']}",
        f"--temp={s['student_temperature']}",
        f"--distill_t={s['teacher_temperature']}",
    ]
    return lo.run_torch_side(
        args, "lockstep_torch_seed.py", official_dir, work, flags, "the official SEED code"
    )


def settings_from(args):
    if args.head_init != "transfer":
        raise SystemExit(
            "lockstep --method=seed always starts kd_keras' head from the official MLP "
            "(--head_init=transfer); kd_keras' own draws are compared by --method=simreg."
        )
    if args.epochs <= SEED_WARMUP_EPOCHS:
        raise SystemExit(
            f"lockstep --method=seed: --epochs={args.epochs} must exceed SEED's "
            f"{SEED_WARMUP_EPOCHS} warm-up epochs (kd_keras' --warmup_epochs < --epochs)."
        )
    queue = args.queue_size or 65_536
    if queue % args.batch_size:
        raise SystemExit(f"--queue_size={queue} must be a multiple of --batch_size.")
    return {
        "student_arch": lo.TINY_ARCH if args.tiny else "resnet18",
        "teacher_arch": lo.TINY_ARCH if args.tiny else "resnet50",
        "student_dim": 32 if args.tiny else 512,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "steps_per_epoch": args.steps_per_epoch,
        "epochs": args.epochs,
        "warmup_epochs": SEED_WARMUP_EPOCHS,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "queue_size": queue,
        "dim": args.seed_dim,
        "student_temperature": args.student_temperature,
        "teacher_temperature": args.teacher_temperature,
        "source": "jacobswan1/SEED main.py via scripts/lockstep_official.py --method=seed",
    }


def run(args):
    """The SEED lockstep; prints and returns the result dict (see lockstep_official.main)."""
    s = settings_from(args)
    started = time.time()
    work = args.work or tempfile.mkdtemp(prefix="lockstep_seed_")
    os.makedirs(work, exist_ok=True)
    official_dir = lo.export_official(args.official_repo, os.path.join(work, "official"))
    student_views, _ = lo.make_views(args)  # SEED trains on one view
    np.savez(os.path.join(work, "inputs.npz"), student_nchw=lo.to_nchw_normalised(student_views))
    official = run_torch_side(args, s, official_dir, work)
    torch_seconds = time.time() - started

    from kd_keras.teachers import conversion

    j = lambda name: os.path.join(work, name)  # noqa: E731
    conversion.convert(
        conversion.ConvertConfig(
            checkpoint=j("teacher.pth.tar"),
            out=j("teacher_converted"),
            arch=s["teacher_arch"],
            layout="moco",
            overwrite=True,
        )
    )
    teacher = teacher_with_projection(
        j("teacher_converted"), dict(np.load(j("teacher_fc.npz"))), s["image_size"]
    )
    method, step = build_kd_keras(s, teacher, args.momentum_form)
    initial = {
        "student": lo.converted_weights(work, "student_init", s["student_arch"]),
        "head": head_arrays_as_keras(dict(np.load(j("head_init.npz")))),
    }
    queue_init = np.ascontiguousarray(np.load(j("queue_init.npy")).T)
    set_state(method, initial, queue_init)

    # kd_keras' own teacher forward against the official embeddings (what enters the queue).
    official_features = np.load(j("teacher_features.npy"))
    own_features = np.stack(
        [
            np.asarray(teacher(v)) / np.linalg.norm(np.asarray(teacher(v)), axis=1, keepdims=True)
            for v in student_views
        ]
    )
    teacher_diff = float(np.abs(own_features - official_features).max())

    keras_started = time.time()
    views = [{"student": v} for v in student_views]
    losses = [step(batch) for batch in views]
    keras_seconds = time.time() - keras_started
    official_losses = np.asarray(official["losses"], np.float64)

    # The same kd_keras run fed the official teacher's embeddings (a teacher cache): what is
    # left is the student side alone.
    cached = lo.CachedTeacher(TEACHER_NAME, official_features.shape[-1])
    fed, fed_step = build_kd_keras(s, cached, args.momentum_form)
    set_state(fed, initial, queue_init)
    fed_losses = [
        fed_step({"student": v, "teacher_features": {TEACHER_NAME: f}})
        for v, f in zip(student_views, official_features, strict=True)
    ]
    noise = teacher_noise = twin_weights = None
    if args.noise_floor:
        # kd_keras against itself, (a) the student, (b) every teacher weight scaled by
        # (1 + --noise_scale): how far one rounding of either start moves this trajectory.
        twin, twin_step = build_kd_keras(s, teacher, args.momentum_form)
        set_state(twin, initial, queue_init, student_scale=1 + args.noise_scale)
        twin_losses = [twin_step(batch) for batch in views]
        noise = lo.noise_floor_of(losses, twin_losses, "student noise floor")
        twin_weights = lo.prefixed(
            {"student": lo.weights_by_path(twin.student), "head": lo.weights_by_path(twin.head)}
        )
        nudged = teacher_with_projection(
            j("teacher_converted"), dict(np.load(j("teacher_fc.npz"))), s["image_size"]
        )
        for w in nudged.model.weights:
            w.assign(w * np.float32(1 + args.noise_scale))
        twin, twin_step = build_kd_keras(s, nudged, args.momentum_form)
        set_state(twin, initial, queue_init)
        twin_losses = [twin_step(batch) for batch in views]
        teacher_noise = lo.noise_floor_of(losses, twin_losses, "teacher noise floor")

    rel = lo.rel_loss_diff(official_losses, losses)
    fed_rel = lo.rel_loss_diff(official_losses, fed_losses)
    final_student = lo.converted_weights(work, "student_final", s["student_arch"])
    final_head = head_arrays_as_keras(dict(np.load(j("head_final.npz"))))
    final_queue = np.ascontiguousarray(np.load(j("queue_final.npy")).T)
    got_student = lo.weights_by_path(method.student)
    got_head = lo.weights_by_path(method.head)
    student_abs, student_rel = lo.compare_weights(got_student, final_student)
    head_abs, head_rel = lo.compare_weights(got_head, final_head)
    queue_abs = float(np.abs(method.queue.bank.numpy() - final_queue).max())
    got = lo.prefixed({"student": got_student, "head": got_head})
    expected = lo.prefixed({"student": final_student, "head": final_head})
    trained_abs = trained_weight_diff(got, expected)
    noise_weight_abs = None if twin_weights is None else trained_weight_diff(twin_weights, got)

    if args.fixture:
        write_fixture(
            args.fixture,
            s,
            student_views,
            official,
            initial,
            queue_init,
            work,
            final_student,
            final_head,
        )
    result = {
        "method": "seed",
        **{k: v for k, v in s.items() if k != "source"},
        "momentum_form": args.momentum_form,
        **lo.loss_agreement(rel),
        "rel_loss_diff_per_step": rel.tolist(),
        "noise_floor_max_rel_loss_diff": noise,
        "teacher_noise_floor_max_rel_loss_diff": teacher_noise,
        "max_rel_loss_diff_official_teacher_features": float(fed_rel.max()),
        "rel_loss_diff_per_step_official_teacher_features": fed_rel.tolist(),
        "max_abs_weight_diff": max(student_abs, head_abs),
        "max_abs_weight_diff_without_moving_variance": trained_abs,
        "noise_floor_max_abs_weight_diff_without_moving_variance": noise_weight_abs,
        "max_rel_weight_diff": max(student_rel, head_rel),
        "student_max_abs_weight_diff": student_abs,
        "head_max_abs_weight_diff": head_abs,
        "queue_max_abs_diff": queue_abs,
        "teacher_embedding_max_abs_diff": teacher_diff,
        "worst_student_weights": lo.worst_weights(got_student, final_student),
        "worst_head_weights": lo.worst_weights(got_head, final_head),
        **lo.trajectories(losses, official, torch_seconds, keras_seconds),
    }
    print(json.dumps(result))
    return result


def write_fixture(
    path,
    s,
    student_views,
    official,
    initial,
    queue_init,
    work,
    final_student,
    final_head,
):
    """The golden trajectory tests/test_lockstep_seed_golden.py replays without torch.

    The final queue is left out: it holds the last K / B batches' teacher embeddings, which
    the fixture has (`teacher_features`); the run's JSON reports queue_max_abs_diff."""
    arrays = {
        "student_views_uint8": np.round(student_views * 255).astype(np.uint8),
        "queue_init": queue_init.astype(np.float32),
        **lo.official_arrays(official, work),
        "settings": np.asarray(json.dumps(s)),
    }
    final = {"student": final_student, "head": final_head}
    lo.save_fixture(path, arrays, {"init": initial, "final": final})
