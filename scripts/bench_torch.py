"""PyTorch eager reference steps for scripts/benchmark.py (SimReg and OSS), same nets and sizes.

Run by benchmark.py for `--configs=torch_simreg,torch_oss` with `--torch_python` (an interpreter
that has `torch` and `torchvision`: `pip install -e ".[bench]"`). kd_keras never imports torch;
this file does not import kd_keras.

The networks follow kd_keras' definitions: torchvision ResNets (3x3 stem without max-pool at
<= 64 px, as kd_keras' `small_stem="auto"`), RegNetY-600MF (torchvision's RegNet on pycls'
parameters; stem conv at stride 1 at <= 64 px), ImageNet normalisation inside the model, SimReg's
mlp4 head (Linear 2m, BN, ReLU, Linear m, Linear 2m, BN, ReLU, Linear d), OSS' projection heads
(Linear 2048, BN, ReLU, Linear 128 with a second dropout pass), 3000 prototypes, Sinkhorn
(3 iterations, epsilon 0.05), swapped prediction over 2 large + V small crops with the dropout
twins, and the gradient-reversed feature classifier. SGD with momentum 0.9 and weight decay
1e-4. Each step gets the same fixed batch (`benchmark.py --input=fixed` is the like-for-like
Keras setting). Timing: as benchmark.py (warm-up steps, then the median over windows).
"""

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "regnety600mf": 608}
# pycls' RegNetY-600MF through torchvision's RegNet (torchvision publishes no 600MF).
PYCLS_600MF = dict(depth=15, w_0=48, w_a=32.54, w_m=2.32, group_width=16, se_ratio=0.25)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def backbone(name, image_size):
    if name not in FEATURE_DIMS:
        raise SystemExit(f"bench_torch.py: no PyTorch equivalent of {name!r}")
    if name == "regnety600mf":
        regnet = torchvision.models.regnet
        net = regnet.RegNet(regnet.BlockParams.from_init_params(**PYCLS_600MF))
        if image_size <= 64:  # kd_keras' small stem: the stem conv at stride 1
            net.stem[0] = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
    else:
        net = getattr(torchvision.models, name)(weights=None)
        if image_size <= 64:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
    net.fc = nn.Identity()

    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net((x - MEAN) / STD)

    return Normalised()


def mlp4(m, d):
    return nn.Sequential(
        nn.Linear(m, 2 * m), nn.BatchNorm1d(2 * m), nn.ReLU(),
        nn.Linear(2 * m, m), nn.Linear(m, 2 * m), nn.BatchNorm1d(2 * m), nn.ReLU(),
        nn.Linear(2 * m, d),
    )  # fmt: skip


class ProjectionHead(nn.Module):
    def __init__(self, m, hidden=2048, out=128, dropout=(0.1, 0.05)):
        super().__init__()
        self.l1, self.bn, self.l2 = (
            nn.Linear(m, hidden),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, out),
        )
        self.p = dropout

    def forward(self, x, dropout=False):
        h = F.relu(self.bn(self.l1(x)))
        if dropout:
            h = F.dropout(h, self.p[0])
        out = self.l2(h)
        return F.dropout(out, self.p[1]) if dropout else out


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.alpha * g, None


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iters=3):
    q = torch.exp((scores - scores.max()) / epsilon).t()
    q /= q.sum()
    k, n = q.shape
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


def simreg_step(args):
    teacher = backbone(args.teacher, args.image_size).eval()
    student = backbone(args.student, args.image_size)
    head = mlp4(FEATURE_DIMS[args.student], FEATURE_DIMS[args.teacher])
    params = [*student.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)

    def step():
        with torch.no_grad():
            target = teacher(x)
        pred = head(student(x))
        loss = (F.normalize(pred, dim=1) - F.normalize(target, dim=1)).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def oss_step(args, num_small=6, prototypes=3000, temperature=0.1):
    teacher = backbone(args.teacher, args.image_size)
    student = backbone(args.student, args.image_size)
    head_t = ProjectionHead(FEATURE_DIMS[args.teacher])
    head_s = ProjectionHead(FEATURE_DIMS[args.student])
    protos = nn.Linear(128, prototypes, bias=False)
    classifier = nn.Sequential(
        nn.Linear(128, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 2)
    )
    modules = [teacher, student, head_t, head_s, protos, classifier]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    b, big, small = args.batch_size, args.image_size, args.small_crop_size
    large_crops = torch.rand(2 * b, 3, big, big)
    small_crops = torch.rand(num_small * b, 3, small, small)
    n_views = 2 + num_small

    def embed(net, head):
        feats = torch.cat([net(large_crops), net(small_crops)])
        z = F.normalize(head(feats), dim=1)
        z_drop = F.normalize(head(feats, dropout=True), dim=1)
        return z, z_drop

    def swapped(scores_z, scores_all):
        loss = 0.0
        for i in range(2):
            q = sinkhorn(scores_z[i * b : (i + 1) * b])
            for v in range(2 * n_views):
                if v == i:
                    continue
                logp = F.log_softmax(scores_all[v * b : (v + 1) * b] / temperature, dim=1)
                loss = loss - (q * logp).sum(1).mean()
        return loss / (2 * n_views - 2) / 2

    def step():
        with torch.no_grad():
            protos.weight.copy_(F.normalize(protos.weight, dim=1))
        z, z_drop = embed(teacher, head_t)
        w, w_drop = embed(student, head_s)
        sz, szd, sw, swd = protos(z), protos(z_drop), protos(w), protos(w_drop)
        loss_t = swapped(sz, torch.cat([sz, szd]))
        loss_s = swapped(sz, torch.cat([sw, swd]))
        zz, ww = torch.cat([z, z_drop]), torch.cat([w, w_drop])
        logits = classifier(GradReverse.apply(torch.cat([zz, ww]), 1.0))
        labels = torch.cat([torch.zeros(len(zz)), torch.ones(len(ww))]).long()
        loss = loss_t + loss_s + F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--step", choices=("simreg", "oss"), required=True)
    for name in ("student", "teacher", "head", "input", "threads", "knn_train", "knn_test"):
        p.add_argument(f"--{name}")
    for name in ("image_size", "batch_size", "small_crop_size", "warmup_steps", "windows"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--window_steps", type=int)
    args = p.parse_args()
    if args.threads and int(args.threads):
        torch.set_num_threads(int(args.threads))
    torch.manual_seed(0)
    step = simreg_step(args) if args.step == "simreg" else oss_step(args)
    times = []
    start = time.perf_counter()
    for _ in range(args.warmup_steps + args.windows * args.window_steps):
        float(step().detach())
        times.append(time.perf_counter())
    w0 = args.warmup_steps - 1
    rates = []
    for i in range(args.windows):
        a, b = w0 + i * args.window_steps, w0 + (i + 1) * args.window_steps
        rates.append(args.window_steps * args.batch_size / (times[b] - times[a]))
    result = {
        "images_per_s": round(statistics.median(rates), 2),
        "images_per_s_min": round(min(rates), 2),
        "images_per_s_max": round(max(rates), 2),
        "warmup_s": round(times[w0] - start, 2),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": f"CPU ({os.cpu_count()} cores)",
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
