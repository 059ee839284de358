"""The PyTorch half of scripts/lockstep_official.py: runs the authors' unmodified training
code on the batches kd_keras made, and records what it does. Not a test dependency.

Run by lockstep_official.py with the bench interpreter (torch, torchvision):

    PY scripts/lockstep_torch_side.py --official_dir=DIR --work=DIR --method=simreg ...

The official code is imported from --official_dir (an export of the authors' repository made
by lockstep_official.py); nothing of it is copied here. What a CPU and small images need is
patched at run time, in this process only:
  * `.cuda()` on tensors and modules is the identity, `torch.cuda.synchronize` a no-op;
  * `nn.AvgPool2d(7)` (the 224 px ResNet's final pool) becomes a global average pool, which
    is what it computes at 224 px;
  * the data loader (`get_train_loader`) yields kd_keras' views from --work/inputs.npz in the
    batch format of the official loader;
  * with --tiny, the official `ResNet` class is built with one block per stage and a width
    multiplier 1/16 under the names the official code asks for (resnet18 / resnet50).
Written to --work: teacher.pth (the teacher the official code loads), student_init.pth and
student_final.pth (the student's state dicts, torchvision keys), head_init.npz /
head_final.npz (the prediction MLP), teacher_features.npy (the frozen teacher's normalised
targets per step), and as the last stdout line a JSON object with the per-step losses and
learning rates.
"""

import argparse
import builtins
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn


def _patch_cpu():
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    # Only the official ResNet's final pool uses AvgPool2d here: at 224 px its 7x7 window is
    # the whole feature map, i.e. a global average, which small images need explicitly.
    nn.AvgPool2d = lambda *a, **k: nn.AdaptiveAvgPool2d(1)


def _patch_tiny(resnet):
    """Official ResNet class, 1 block per stage, stage widths 4..32 (stem stays 64)."""

    def tiny(fc_dim=128, **kwargs):
        return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], fc_dim=fc_dim, width=1 / 16)

    resnet.resnet18 = tiny
    resnet.resnet50 = tiny


class _Done(Exception):
    """Raised by the loader once every recorded batch has been trained on."""


class EpochLoader:
    """Batches of kd_keras' views in epochs of `steps_per_epoch` consecutive steps (the last
    one may be short); raises _Done when asked for an epoch past the views. Subclasses give
    `batch(t)`, step t's batch in the official loader's format."""

    stop_after_short_epoch = False  # raise _Done right after a short last epoch

    def __init__(self, views, steps_per_epoch):
        self.views, self.steps_per_epoch, self.epoch = views, steps_per_epoch, 0

    def __len__(self):
        return self.steps_per_epoch

    def __iter__(self):
        start = self.epoch * self.steps_per_epoch
        self.epoch += 1
        if start >= len(self.views):
            raise _Done
        for t in range(start, min(start + self.steps_per_epoch, len(self.views))):
            yield self.batch(t)
        if self.stop_after_short_epoch and start + self.steps_per_epoch > len(self.views):
            raise _Done

    def batch(self, t):
        raise NotImplementedError


class _Loader:
    """The official loader's batches, (indices, names, (im_q, im_t), labels), from kd_keras'
    views; one pass = one epoch of `steps_per_epoch` consecutive steps."""

    def __init__(self, student, teacher, steps_per_epoch):
        self.student, self.teacher = student, teacher
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0

    def __len__(self):
        return self.steps_per_epoch

    def __iter__(self):
        start = self.epoch * self.steps_per_epoch
        self.epoch += 1
        if start >= len(self.student):
            raise _Done  # --steps reached before the official --epochs
        for t in range(start, start + self.steps_per_epoch):
            batch = self.student.shape[1]
            yield (
                torch.arange(batch),
                [f"img{t}_{i}" for i in range(batch)],
                (torch.from_numpy(self.student[t]), torch.from_numpy(self.teacher[t])),
                torch.zeros(batch, dtype=torch.long),
            )


def random_teacher(build, seed):
    """build() under torch.manual_seed(seed + 1), then random BN statistics (generator seeded
    with seed + 1 as well): the teacher checkpoint every official script loads."""
    generator = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    teacher = build()
    _randomise_bn(teacher, generator)
    return teacher


def _randomise_bn(model, generator):
    """Non-trivial BN statistics and affine parameters, so the converted teacher's BN matters."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=generator) + 0.5
            m.bias.data = 0.1 * torch.randn(n, generator=generator)
            m.running_mean = 0.1 * torch.randn(n, generator=generator)
            m.running_var = torch.rand(n, generator=generator) + 0.5


def _state(module_state, prefix):
    """Tensors of `module_state` under `prefix`, prefix removed (numpy-free torch tensors)."""
    return {k[len(prefix) :]: v.clone() for k, v in module_state.items() if k.startswith(prefix)}


def backbone_state(state, prefix):
    """Tensors under `prefix` without it, the fc (head) left out: torchvision backbone keys."""
    return {k: v for k, v in _state(state, prefix).items() if not k.startswith("fc.")}


def fc_arrays(state, prefix):
    """The fc (head) tensors under `prefix`, as numpy arrays named without `prefix` + "fc."."""
    return {k: v.numpy().copy() for k, v in _state(state, prefix + "fc.").items()}


def base_parser(optimizer_required=False):
    """The flags every torch half takes (lockstep_official.run_torch_side passes them all)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--official_dir", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps_per_epoch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    if optimizer_required:
        parser.add_argument("--weight_decay", type=float, required=True)
        parser.add_argument("--momentum", type=float, required=True)
    else:
        parser.add_argument("--weight_decay", type=float, default=1e-4)
        parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true")
    return parser


def enter_official(args, patch=None):
    """One torch thread, the run-time patches (default: the CPU ones), the official code on
    sys.path and --work the current directory (every output file is written there)."""
    torch.set_num_threads(1)
    (patch or _patch_cpu)()
    sys.path.insert(0, args.official_dir)
    os.chdir(args.work)


def rate_recorder(adjust, rates, args, optimizer_at):
    """Wraps the official per-epoch `adjust` (its optimizer is positional argument
    `optimizer_at`) to append the epoch's rate to `rates` once per step, --steps at most."""

    def record(*a):
        adjust(*a)
        rates.extend([a[optimizer_at].param_groups[0]["lr"]] * args.steps_per_epoch)
        del rates[args.steps :]

    return record


def run_official_main(main, *a):
    """main(*a) with its print() on stderr (stdout's last line is ours), until _Done."""
    quiet = builtins.print
    builtins.print = lambda *p, **k: quiet(*p, **{**k, "file": sys.stderr})
    try:
        main(*a)
    except _Done:
        pass
    builtins.print = quiet


def write_results(features, losses, rates):
    """teacher_features.npy and the last stdout line, the JSON the kd_keras side reads."""
    np.save("teacher_features.npy", np.stack(features))
    print(json.dumps({"losses": losses, "lrs": rates}))


def _head_arrays(state):
    return {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def main():
    parser = base_parser()
    parser.add_argument("--method", default="simreg", choices=["simreg"])
    args = parser.parse_args()

    enter_official(args)
    import main as official_main  # the authors' main.py
    import models.resnet as official_resnet
    import simreg as official_simreg

    if args.tiny:
        _patch_tiny(official_resnet)
    inputs = np.load(os.path.join(args.work, "inputs.npz"))
    student_views = inputs["student_nchw"][: args.steps]
    teacher_views = inputs["teacher_nchw"][: args.steps]

    # The teacher the official code loads: the official ResNet, torch's init, random BN.
    teacher = random_teacher(official_resnet.resnet50, args.seed)
    torch.save(teacher.state_dict(), "teacher.pth")

    losses, rates, built = [], [], {}

    def make_simreg(*a, **k):
        torch.manual_seed(args.seed)
        model = official_simreg.SimReg(*a, **k)
        torch.save(model.encoder_q.state_dict(), "student_init.pth")
        np.savez("head_init.npz", **_head_arrays(model.predict_q.state_dict()))
        model.register_forward_hook(lambda mod, inp, out: losses.append(float(out.item())))
        built["model"] = model
        return model

    # adjust_learning_rate(epoch, opt, optimizer)
    record_rate = rate_recorder(official_main.adjust_learning_rate, rates, args, 2)
    loader = _Loader(student_views, teacher_views, args.steps_per_epoch)
    official_main.SimReg = make_simreg
    official_main.get_train_loader = lambda opt: loader
    official_main.adjust_learning_rate = record_rate
    sys.argv = [
        "main.py",
        os.path.join(args.work, "unused_data_dir"),
        "--debug",  # keeps builtins.print (the logger would replace it)
        f"--base_dir={args.work}",
        "--exp=lockstep",
        f"--batch_size={args.batch_size}",
        "--num_workers=0",
        f"--epochs={args.epochs}",
        f"--learning_rate={args.lr}",
        f"--weight_decay={args.weight_decay}",
        f"--sgd_momentum={args.momentum}",
        "--arch_teacher=resnet50",
        "--arch_student=resnet18",
        "--n_mlp_layers=4",
        f"--teacher_weights={os.path.join(args.work, 'teacher.pth')}",
        f"--save_freq={args.epochs + 1}",  # no checkpoint files: the weights are read below
        "--print_freq=100000",
    ]
    run_official_main(official_main.main)

    model = built["model"]
    final = model.state_dict()  # what the official checkpoint's "state_dict" holds
    torch.save(_state(final, "encoder_q.module."), "student_final.pth")
    np.savez("head_final.npz", **_head_arrays(_state(final, "predict_q.module.")))
    # The targets the official forward regresses on (the teacher is frozen, in eval mode).
    with torch.no_grad():
        encoder_t = model.encoder_t.module
        features = [
            nn.functional.normalize(encoder_t(torch.from_numpy(v)), dim=1).numpy()
            for v in teacher_views
        ]
    write_results(features, losses, rates)


if __name__ == "__main__":
    main()
