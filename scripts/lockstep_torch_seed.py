"""The PyTorch half of `scripts/lockstep_official.py --method=seed`: runs SEED's unmodified
`main.py` (jacobswan1/SEED, single-process path) on kd_keras' views and records what it does.
Not a test dependency.

Run by lockstep_official.py (via lockstep_seed.py) with the bench interpreter:

    PY scripts/lockstep_torch_seed.py --official_dir=DIR --work=DIR --steps=N ...

The official code is imported from --official_dir (an export of the authors' repository);
nothing of it is copied here. Run-time patches, in this process only:
  * `.cuda()` is the identity; `torch.cuda.synchronize`, `empty_cache` no-ops and
    `max_memory_allocated` 0 (the official loop logs GPU memory);
  * `torch.cuda.amp.autocast` / `GradScaler` are disabled: the official step runs under fp16
    autocast with dynamic loss scaling on a GPU; here it runs in float32 like kd_keras (a
    documented deviation, docs/lockstep.md);
  * `torch.distributed.get_rank` returns 0 (the non-distributed path still asks for the rank
    before saving) and `save_checkpoint` keeps nothing (the weights are read at the end);
  * modules the official imports need but this interpreter lacks (cv2, termcolor,
    tensorboard, `torchvision.models.utils`) are stand-ins: none of them computes anything
    here (the TSV reader, the log colouring, the summary writer, a download helper);
  * the dataset and `DataLoader` yield kd_keras' views from --work/inputs.npz as
    (images, labels) batches; the official code feeds the same image to student and teacher;
  * with --tiny, `resnet18` / `resnet50` are the official MoCo `ResNet` class with one
    BasicBlock per stage and stage widths 4..32 (stem 64), built through its own
    `width_multiplier` (a number whose product with an int is an int).
Written to --work: teacher.pth.tar (a MoCo v2 checkpoint: the official ResNet with its MLP fc,
torch's init, random BN, what the official code loads with --teacher_ssl=moco),
student_init.pth / student_final.pth (the student backbone, torchvision keys, fc left out),
head_init.npz / head_final.npz (the student MLP fc.0 / fc.2), queue_init.npy ([dim, K], the
official random queue), teacher_features.npy (the teacher's normalised embeddings per step)
and, as the last stdout line, JSON with the per-step losses and learning rates.
"""

import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lockstep_torch_side as side  # noqa: E402


class _Sixteenth(float):
    """width_multiplier = 1/16 that keeps channel counts integral: 64 * w -> 4 (an int)."""

    def __rmul__(self, other):
        return int(round(other * float(self)))


def _stub_modules():
    """Stand-ins for imports the official code makes but never uses on this path."""
    cv2 = types.ModuleType("cv2")  # tools/qd_common.py (TSV index generation)
    termcolor = types.ModuleType("termcolor")  # tools/logger.py (log colours)
    termcolor.colored = lambda text, *a, **k: text
    board = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        def __init__(self, *a, **k):
            pass

        def add_scalar(self, *a, **k):
            pass

    board.SummaryWriter = SummaryWriter
    tv_utils = types.ModuleType("torchvision.models.utils")  # removed from torchvision
    tv_utils.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    for name, module in (
        ("cv2", cv2),
        ("termcolor", termcolor),
        ("torch.utils.tensorboard", board),
        ("torchvision.models.utils", tv_utils),
    ):
        sys.modules.setdefault(name, module)


def _patch_gpu_only():
    """The stand-in modules, the CPU patches, and what the official GPU loop calls besides."""
    _stub_modules()
    side._patch_cpu()
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.amp.autocast = lambda *a, **k: torch.autocast("cpu", enabled=False)
    torch.cuda.amp.GradScaler = lambda *a, **k: torch.amp.GradScaler("cpu", enabled=False)
    torch.distributed.get_rank = lambda *a, **k: 0


class _Loader(side.EpochLoader):
    """(images, labels) batches of kd_keras' views; one pass = one epoch."""

    stop_after_short_epoch = True

    def batch(self, t):
        batch = torch.from_numpy(self.views[t])
        return batch, torch.zeros(batch.shape[0], dtype=torch.long)


def _moco_v2_teacher(models, arch, dim):
    """The teacher as MoCo v2 trains it: ResNet + fc MLP (as SEED's builder adds for moco)."""
    teacher = models.__dict__[arch](num_classes=dim)
    hidden = teacher.fc.weight.shape[1]
    teacher.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), teacher.fc)
    return teacher


def main():
    parser = side.base_parser()
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--temp", type=float, default=0.2)
    parser.add_argument("--distill_t", type=float, default=1e-4)
    args = parser.parse_args()

    side.enter_official(args, _patch_gpu_only)
    import main as official_main  # the authors' main.py
    import seed.architectures.moco.moco_resnet as moco_resnet
    import seed.builder as official_builder
    import seed.models as official_models

    if args.tiny:

        def tiny(num_classes=1000, **kwargs):
            return moco_resnet.ResNet(
                moco_resnet.BasicBlock,
                [1, 1, 1, 1],
                num_classes=num_classes,
                width_multiplier=_Sixteenth(1 / 16),
            )

        official_models.resnet18 = tiny
        official_models.resnet50 = tiny
    student_arch, teacher_arch = "resnet18", "resnet50"
    views = np.load(os.path.join(args.work, "inputs.npz"))["student_nchw"][: args.steps]

    # The teacher checkpoint: official ResNet (+ MoCo v2 MLP), torch's init, random BN.
    teacher = side.random_teacher(
        lambda: _moco_v2_teacher(official_models, teacher_arch, args.dim), args.seed
    )
    torch.save(
        {"state_dict": {f"module.encoder_q.{k}": v for k, v in teacher.state_dict().items()}},
        "teacher.pth.tar",
    )
    # kd_keras' converter leaves MoCo's fc MLP out (layout moco); the kd_keras side rebuilds
    # it from these arrays on top of the converted backbone.
    np.savez("teacher_fc.npz", **side.fc_arrays(teacher.state_dict(), ""))

    losses, rates, built = [], [], {}
    original_seed = official_builder.SEED

    def make_seed(*a, **k):
        torch.manual_seed(args.seed)
        model = original_seed(*a, **k)
        state = model.state_dict()
        torch.save(side.backbone_state(state, "student."), "student_init.pth")
        np.savez("head_init.npz", **side.fc_arrays(state, "student."))
        np.save("queue_init.npy", model.queue.numpy().copy())
        built["model"] = model
        return model

    criterion = official_main.soft_cross_entropy

    def recorded_criterion(logit, label):
        loss = criterion(logit, label)
        losses.append(float(loss.item()))
        return loss

    # adjust_learning_rate(optimizer, epoch, opt)
    record_rate = side.rate_recorder(official_main.adjust_learning_rate, rates, args, 0)
    loader = _Loader(views, args.steps_per_epoch)
    # main.py reaches the class as `seed.builder.SEED`; the class itself stays untouched (its
    # __init__ names itself in super()), only main's view of the package is redirected.
    official_main.seed = types.SimpleNamespace(builder=types.SimpleNamespace(SEED=make_seed))
    official_main.soft_cross_entropy = recorded_criterion
    official_main.adjust_learning_rate = record_rate
    official_main.save_checkpoint = lambda *a, **k: None
    official_main.TSVDataset = lambda *a, **k: None
    torch.utils.data.DataLoader = lambda *a, **k: loader

    sys.argv = [
        "main.py",
        f"--data={os.path.join(args.work, 'unused_data_dir')}",
        f"--output={os.path.join(args.work, 'official_output')}",
        f"-a={student_arch}",
        f"-k={teacher_arch}",
        "--teacher_ssl=moco",
        "--workers=0",
        f"--epochs={args.epochs}",
        f"--batch-size={args.batch_size}",
        f"--lr={args.lr}",
        f"--momentum={args.momentum}",
        f"--wd={args.weight_decay}",
        "--print-freq=100000",
        f"--distill={os.path.join(args.work, 'teacher.pth.tar')}",
        f"--dim={args.dim}",
        f"--queue={args.queue}",
        f"--temp={args.temp}",
        f"--distill-t={args.distill_t}",
    ]
    from tools.opts import parse_opt

    opts = parse_opt()
    stdout, sys.stdout = sys.stdout, sys.stderr  # the official logger writes to stdout
    try:
        official_main.main(opts)
    except side._Done:
        pass
    finally:
        sys.stdout = stdout

    model = built["model"]
    final = model.state_dict()  # what the official checkpoint's "state_dict" holds
    torch.save(side.backbone_state(final, "student."), "student_final.pth")
    np.savez("head_final.npz", **side.fc_arrays(final, "student."))
    np.save("queue_final.npy", model.queue.numpy().copy())
    # The teacher's normalised embeddings of each batch (frozen, eval mode: a function of
    # the images), what the official forward pushes into the queue.
    with torch.no_grad():
        model.teacher.eval()
        features = [
            nn.functional.normalize(model.teacher(torch.from_numpy(v)), dim=1).numpy()
            for v in views
        ]
    side.write_results(features, losses, rates)


if __name__ == "__main__":
    main()
