"""The PyTorch half of `scripts/lockstep_official.py --method=compress_1q|compress_2q`: runs
the authors' unmodified CompRess training script on kd_keras' batches and records what it
does. Not a test dependency.

Run by scripts/lockstep_compress.py with the bench interpreter (torch, torchvision):

    PY scripts/lockstep_torch_compress.py --official_dir=DIR --work=DIR --method=compress_2q ...

--official_dir is an export of UMBCvision/CompRess; its `train_student.py` (2q: teacher bank,
student bank filled by a momentum key copy) or `train_student_one_queue.py` (1q: one teacher
bank, `student.fc` = a linear layer to the teacher's dimension) runs here through its own
`main()`. Run-time patches, in this process only (those of lockstep_torch_side.py plus):
  * `get_train_loader` yields (index, images, target) batches of kd_keras' views: one view
    per image, seen by the teacher, the student and the key copy (as the official loop does);
  * with --tiny, the script's `resnet18` / `resnet50` names build the official `ResNet` class
    with one block per stage and width 1/16 (teacher included);
  * wrappers around `get_student_model`, `get_teacher_model`, the loss module's class and
    `adjust_learning_rate` record the initial student, the random initial bank rows, the
    per-step losses and learning rates; the teacher checkpoint is written in the MoCo layout
    the official loader reads (`state_dict` with `module.encoder_q.` keys) and its load is
    checked (the official load is strict=False and would ignore a key mismatch silently).
Written to --work: teacher.pth (torchvision keys, for kd_keras' converter), student_init.pth
/ student_final.pth (backbone, torchvision keys), head_init.npz / head_final.npz (1q: the
linear `fc`), key_final.pth (2q: the key copy), banks_init.npz / banks_final.npz (bank rows
and write index), teacher_features.npy (the teacher's raw features per step), and as the last
stdout line a JSON object with the per-step losses and learning rates.
"""

import importlib
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lockstep_torch_side as side  # noqa: E402

SCRIPTS = {"compress_1q": "train_student_one_queue", "compress_2q": "train_student"}
LOSSES = {"compress_1q": "CompReSSA", "compress_2q": "CompReSSMomentum"}


class _Loader(side.EpochLoader):
    """(index, images, target) batches of kd_keras' views, `steps_per_epoch` per pass."""

    def batch(self, t):
        batch = self.views.shape[1]
        return (
            torch.arange(batch) + t * batch,
            torch.from_numpy(self.views[t]),
            torch.zeros(batch, dtype=torch.long),
        )


def _tiny(resnet):
    def build(fc_dim=128, **kwargs):
        return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], fc_dim=fc_dim, width=1 / 16)

    return build


def _split_fc(state):
    """(backbone state without fc.*, {"weight", "bias"} numpy arrays of fc or {})."""
    return side.backbone_state(state, ""), side.fc_arrays(state, "")


def _banks(loss_module):
    out = {}
    for name in ("teacher_sample_similarities", "student_sample_similarities"):
        part = getattr(loss_module, name, None)
        if part is not None:
            out[f"{name.split('_')[0]}_memory"] = part.memory.numpy().copy()
            out[f"{name.split('_')[0]}_index"] = np.asarray(part.index, np.int64)
    return out


def main():
    parser = side.base_parser(optimizer_required=True)
    parser.add_argument("--method", required=True, choices=sorted(SCRIPTS))
    parser.add_argument("--lr_decay_epochs", required=True, help="official form: '90,120'")
    parser.add_argument("--lr_decay_rate", type=float, required=True)
    parser.add_argument("--bank_size", type=int, required=True)
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--alpha", type=float, required=True, help="2q key momentum")
    args = parser.parse_args()

    side.enter_official(args)
    official = importlib.import_module(SCRIPTS[args.method])
    import models.resnet as official_resnet

    if args.tiny:
        official.resnet18 = official.resnet50 = _tiny(official_resnet)
    views = np.load(os.path.join(args.work, "inputs.npz"))["student_nchw"][: args.steps]

    # The teacher: the official ResNet (resnet50 or the tiny one), torch's init, random BN.
    teacher_net = side.random_teacher(official.resnet50, args.seed)
    torch.save(teacher_net.state_dict(), "teacher.pth")
    moco_keys = {
        f"module.encoder_q.{k}": v for k, v in teacher_net.state_dict().items() if "fc." not in k
    }
    torch.save({"state_dict": moco_keys}, "teacher_official.pth")

    losses, rates, built = [], [], {}
    get_teacher, get_student = official.get_teacher_model, official.get_student_model

    def teacher_model(opt):
        teacher = get_teacher(opt)
        loaded = teacher.model.state_dict()
        for key, value in moco_keys.items():
            if not torch.equal(loaded[key[len("module.") :]], value):
                raise SystemExit(f"the official teacher did not load {key}")
        built["teacher"] = teacher
        return teacher

    def student_model(opt):
        torch.manual_seed(args.seed)
        built["student"] = get_student(opt)
        return built["student"]

    loss_class = getattr(official, LOSSES[args.method])

    def make_loss(*a, **k):
        torch.manual_seed(args.seed + 2)
        loss_module = loss_class(*a, **k)
        # Built after the 1q script has set student.fc: the complete initial student.
        student = built["student"][0] if args.method == "compress_2q" else built["student"]
        backbone, fc = _split_fc(student.state_dict())
        torch.save(backbone, "student_init.pth")
        np.savez("head_init.npz", **fc)
        np.savez("banks_init.npz", **_banks(loss_module))
        loss_module.register_forward_hook(lambda mod, inp, out: losses.append(float(out.item())))
        built["loss"] = loss_module
        return loss_module

    # adjust_learning_rate(epoch, opt, optimizer)
    record_rate = side.rate_recorder(official.adjust_learning_rate, rates, args, 2)
    official.get_teacher_model = teacher_model
    official.get_student_model = student_model
    setattr(official, LOSSES[args.method], make_loss)
    official.adjust_learning_rate = record_rate
    official.get_train_loader = lambda opt: _Loader(views, args.steps_per_epoch)
    sys.argv = [
        f"{SCRIPTS[args.method]}.py",
        os.path.join(args.work, "unused_data_dir"),
        f"--batch_size={args.batch_size}",
        "--num_workers=0",
        f"--epochs={args.epochs}",
        f"--learning_rate={args.lr}",
        f"--lr_decay_epochs={args.lr_decay_epochs}",
        f"--lr_decay_rate={args.lr_decay_rate}",
        f"--weight_decay={args.weight_decay}",
        f"--momentum={args.momentum}",
        "--student_arch=resnet18",
        "--teacher_arch=resnet50",
        f"--compress_memory_size={args.bank_size}",
        f"--compress_t={args.temperature}",
        f"--teacher={os.path.join(args.work, 'teacher_official.pth')}",
        f"--checkpoint_path={os.path.join(args.work, 'official_checkpoints')}",
        f"--save_freq={args.epochs + 1}",  # no checkpoint files: the weights are read below
        "--print_freq=100000",
        *([f"--alpha={args.alpha}"] if args.method == "compress_2q" else []),
    ]
    side.run_official_main(official.main)
    if len(losses) != args.steps:
        raise SystemExit(f"the official script trained {len(losses)} steps, not {args.steps}")

    if args.method == "compress_2q":
        student, key = built["student"]
        torch.save(_split_fc(key.state_dict())[0], "key_final.pth")
    else:
        student = built["student"]
    backbone, fc = _split_fc(student.state_dict())
    torch.save(backbone, "student_final.pth")
    np.savez("head_final.npz", **fc)
    np.savez("banks_final.npz", **_banks(built["loss"]))
    teacher = built["teacher"]
    teacher.eval()
    with torch.no_grad():
        features = [teacher.forward(torch.from_numpy(v), None).numpy() for v in views]
    side.write_results(features, losses, rates)


if __name__ == "__main__":
    main()
