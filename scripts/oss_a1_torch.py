"""A minimal PyTorch port of the OSS paper's appendix A.1 loop, run on tiny networks, whose
inputs and results become the fixture of tests/test_oss_lockstep_golden.py.

Written from the paper's pseudo-code (teacher f + h_T, student g + h_S, shared prototypes C,
feature classifier D behind a gradient reversal layer that multiplies the gradient by
alpha = -2 / (1 + exp(-10 n / N)) + 1), SwAV's `distributed_sinkhorn` (exp domain, one
device) and torch.optim.SGD; it imports nothing from kd_keras and needs no TensorFlow.

Where A.1 leaves a choice, this port takes SwAV's code: the backbone runs once per crop
resolution (A.1 writes f(cat(all crops)), which only works for one size) and once per step
(the plain and dropout heads share its features); dropout acts on each linear layer's output
of the projection head (Linear1 -> Dropout -> BN -> ReLU -> Linear2 -> Dropout). The dropout
masks are drawn here with NumPy and saved, so the Keras side can replay them.

Tiny setup: batch 8, 2 x 8 px + 2 x 4 px crops, backbone = 1x1 conv -> BN -> ReLU -> global
average pool (teacher 12 channels, student 8), heads 16 -> 8, K = 10 prototypes, classifier
6 hidden, a queue of 16 rows per large crop from step 2, SGD momentum 0.9, lr 0.05, coupled
weight decay 1e-5, 16 steps of an N = 20 step GRL schedule.

Usage (the torch venv; writes a ~100 kB npz):
  /work/venv-bench/bin/python scripts/oss_a1_torch.py --out tests/data/oss_a1_lockstep.npz
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

SETUP = dict(
    batch=8,
    large=8,
    small=4,
    n_large=2,
    n_small=2,
    teacher_channels=12,
    student_channels=8,
    hidden=16,
    embed=8,
    prototypes=10,
    classifier_hidden=6,
    rates=(0.1, 0.05),
    queue_length=16,
    queue_start=2,
    temperature=0.1,
    epsilon=0.05,
    sinkhorn_iters=3,
    lr=0.05,
    momentum=0.9,
    weight_decay=1e-5,
    steps=16,
    total_steps=20,
    seed=0,
)
BN_EPS, BN_MOMENTUM = 1e-5, 0.1  # torch's defaults, which kd_keras' heads also use


class GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies by alpha (negative in OSS: the reversal)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.alpha, None


def grl_alpha(n, big_n):
    """The paper's schedule, written as printed in A.1's text."""
    return -2.0 / (1.0 + math.exp(-10.0 * n / big_n)) + 1.0


def sinkhorn(out, epsilon, iters):
    """SwAV's distributed_sinkhorn on one device: [N, K] scores -> [N, K] codes."""
    q = torch.exp(out / epsilon).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def _linear(fan_in, fan_out):
    return torch.nn.Linear(fan_in, fan_out)


class Backbone(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, channels, 1)
        self.bn = torch.nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)

    def forward(self, x):  # x [N, 3, H, W]
        return F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


class Head(torch.nn.Module):
    def __init__(self, fan_in, hidden, embed, rates):
        super().__init__()
        self.l1 = _linear(fan_in, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.l2 = _linear(hidden, embed)
        self.rates = rates

    def forward(self, x, masks=None):
        """masks: (keep1 [N, hidden], keep2 [N, embed]) bool for the dropout pass, or None."""
        x = self.l1(x)
        if masks is not None:
            x = x * masks[0] / (1.0 - self.rates[0])
        x = F.relu(self.bn(x))
        x = self.l2(x)
        if masks is not None:
            x = x * masks[1] / (1.0 - self.rates[1])
        return x


class Classifier(torch.nn.Module):
    def __init__(self, embed, hidden):
        super().__init__()
        self.l1 = _linear(embed, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.l2 = _linear(hidden, 2)

    def forward(self, x):
        return self.l2(F.relu(self.bn(self.l1(x))))


def build(s):
    torch.manual_seed(s["seed"])
    nets = dict(
        f=Backbone(s["teacher_channels"]),
        h_T=Head(s["teacher_channels"], s["hidden"], s["embed"], s["rates"]),
        g=Backbone(s["student_channels"]),
        h_S=Head(s["student_channels"], s["hidden"], s["embed"], s["rates"]),
        D=Classifier(s["embed"], s["classifier_hidden"]),
    )
    # Prototypes C [E, K]: nn.Linear(E, K, bias=False)'s draw, transposed, columns unit norm.
    c = _linear(s["embed"], s["prototypes"]).weight.detach().t().contiguous()
    nets["C"] = torch.nn.Parameter(F.normalize(c, dim=0, p=2))
    return nets


def parameters(nets):
    """{name: tensor} of every trainable parameter, in torch layout."""
    out = {}
    for key in ("f", "h_T", "g", "h_S", "D"):
        for name, p in nets[key].named_parameters():
            out[f"{key}.{name}"] = p
    out["C"] = nets["C"]
    return out


def make_inputs(s):
    rng = np.random.default_rng(s["seed"])
    b, steps = s["batch"], s["steps"]
    rows = (s["n_large"] + s["n_small"]) * b
    large = rng.integers(0, 256, (steps, b, s["n_large"], s["large"], s["large"], 3), np.uint8)
    small = rng.integers(0, 256, (steps, b, s["n_small"], s["small"], s["small"], 3), np.uint8)
    # keep masks [step, network (0 teacher, 1 student), rows, width] for the dropout pass.
    keep1 = rng.uniform(size=(steps, 2, rows, s["hidden"])) >= s["rates"][0]
    keep2 = rng.uniform(size=(steps, 2, rows, s["embed"])) >= s["rates"][1]
    return dict(large=large, small=small, keep1=keep1, keep2=keep2)


def _groups(large, small):
    """uint8 [B, n, S, S, 3] crops -> float NCHW stacks, crop-major rows (cat(x1, x2, ...))."""
    out = []
    for crops in (large, small):
        x = torch.from_numpy(crops.astype(np.float32) / 255.0)
        x = x.transpose(0, 1).reshape(-1, *crops.shape[2:])  # [n * B, S, S, 3]
        out.append(x.permute(0, 3, 1, 2).contiguous())
    return out


def a1_step(nets, queue, step, inputs, s):
    """One iteration of A.1 (losses only; the caller does backward and the update)."""
    b, n_large, n_small = s["batch"], s["n_large"], s["n_small"]
    groups = _groups(inputs["large"][step], inputs["small"][step])
    masks = {
        net: (
            torch.from_numpy(inputs["keep1"][step, net].astype(np.float32)),
            torch.from_numpy(inputs["keep2"][step, net].astype(np.float32)),
        )
        for net in (0, 1)
    }
    feats_t = torch.cat([nets["f"](x) for x in groups])
    feats_s = torch.cat([nets["g"](x) for x in groups])
    z = F.normalize(nets["h_T"](feats_t), dim=1)
    w = F.normalize(nets["h_S"](feats_s), dim=1)
    z_d = F.normalize(nets["h_T"](feats_t, masks[0]), dim=1)
    w_d = F.normalize(nets["h_S"](feats_s, masks[1]), dim=1)
    c = nets["C"]
    scores_z, scores_zd = z @ c, z_d @ c
    scores_w, scores_wd = w @ c, w_d @ c
    n_views = 2 * (n_large + n_small)
    all_z, all_w = torch.cat([scores_z, scores_zd]), torch.cat([scores_w, scores_wd])
    loss1 = loss2 = 0.0
    for i in range(2):
        with torch.no_grad():
            out = scores_z[b * i : b * (i + 1)]
            if step >= s["queue_start"]:
                out = torch.cat([queue[i] @ c, out])
            queue[i, b:] = queue[i, :-b].clone()
            queue[i, :b] = z[b * i : b * (i + 1)]
            q = sinkhorn(out, s["epsilon"], s["sinkhorn_iters"])[-b:]
        sub1 = sub2 = 0.0
        for v in range(n_views):
            if v == i:
                continue
            log_pz = F.log_softmax(all_z[b * v : b * (v + 1)] / s["temperature"], dim=1)
            log_pw = F.log_softmax(all_w[b * v : b * (v + 1)] / s["temperature"], dim=1)
            sub1 = sub1 - torch.mean(torch.sum(q * log_pz, dim=1))
            sub2 = sub2 - torch.mean(torch.sum(q * log_pw, dim=1))
        loss1 = loss1 + sub1 / (2 * (2 + n_small) - 2) / 2
        loss2 = loss2 + sub2 / (2 * (2 + n_small) - 2) / 2
    alpha = grl_alpha(step, s["total_steps"])
    d_t = nets["D"](GradReverse.apply(torch.cat([z, z_d]), alpha))
    d_s = nets["D"](GradReverse.apply(torch.cat([w, w_d]), alpha))
    ce_t = F.cross_entropy(d_t, torch.zeros(d_t.shape[0], dtype=torch.long))
    ce_s = F.cross_entropy(d_s, torch.ones(d_s.shape[0], dtype=torch.long))
    return dict(
        loss_teacher=loss1, loss_student=loss2, ce_teacher=ce_t, ce_student=ce_s, alpha=alpha
    )


def run(s):
    torch.set_num_threads(1)
    nets = build(s)
    params = parameters(nets)
    initial = {k: v.detach().numpy().copy() for k, v in params.items()}
    inputs = make_inputs(s)
    opt = torch.optim.SGD(
        list(params.values()), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"]
    )
    queue = torch.zeros(2, s["queue_length"], s["embed"])
    names = ("loss_teacher", "loss_student", "ce_teacher", "ce_student", "loss", "alpha")
    logs = {n: [] for n in names}
    trajectory = {k: [] for k in params}
    for step in range(s["steps"]):
        terms = a1_step(nets, queue, step, inputs, s)
        loss = terms["loss_teacher"] + terms["loss_student"] + terms["ce_teacher"]
        loss = loss + terms["ce_student"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            nets["C"].copy_(F.normalize(nets["C"], dim=0, p=2))
        terms["loss"] = loss
        for n in names:
            logs[n].append(float(terms[n].detach()) if torch.is_tensor(terms[n]) else terms[n])
        for k, v in params.items():
            trajectory[k].append(v.detach().numpy().copy())
    return initial, inputs, logs, trajectory


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tests/data/oss_a1_lockstep.npz")
    args = parser.parse_args()
    s = SETUP
    initial, inputs, logs, trajectory = run(s)
    arrays = {f"setup/{k}": np.asarray(v) for k, v in s.items()}
    arrays.update({f"init/{k}": v for k, v in initial.items()})
    arrays.update({f"input/{k}": v for k, v in inputs.items()})
    arrays.update({f"log/{k}": np.asarray(v, np.float64) for k, v in logs.items()})
    arrays.update({f"weights/{k}": np.stack(v) for k, v in trajectory.items()})
    np.savez_compressed(args.out, **arrays)
    for step in range(s["steps"]):
        row = " ".join(f"{n}={logs[n][step]:.6f}" for n in logs)
        print(f"step {step}: {row}")


if __name__ == "__main__":
    main()
