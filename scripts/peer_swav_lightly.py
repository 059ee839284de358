"""Peer SwAV run with lightly (PyTorch) on exactly the views and settings of a kd_keras run.

    /work/venv-bench/bin/python scripts/peer_swav_lightly.py \
        --flagfile=flags/swav_imagenette_cpu.cfg --workdir=runs/peer_swav_imagenette

The same flagfile as `python -m kd_keras.train` is read (kd_keras.config parses it), so the
peer gets the same crops, crop counts and scales, colour strength, blur, batch, epochs, lr
schedule (warm-up + cosine to --final_lr, linear batch scaling), optimizer (SGD with coupled
weight decay, or LARS), prototypes, embedding sizes, queue, temperature, epsilon, Sinkhorn
iterations and prototype freezing. The training batches are made by kd_keras' own tf.data
multi-crop pipeline with the run's seed (bit for bit the views kd_keras trains on) and handed
to torch; the k-NN evaluation uses kd_keras' centre-crop eval pipeline and `kd_keras.knn`
(cosine, majority vote, k of --knn_k), for the trained and a random-init network. What is
lightly's: `SwaVProjectionHead`, `SwaVPrototypes` (re-normalised before every step, frozen for
--freeze_prototypes_steps), `SwaVLoss` (Sinkhorn + swapped prediction) and, for
--optimizer=lars, `lightly.utils.lars.LARS`. The backbone is written here to mirror kd_keras'
ResNets (`resnet_tiny`, `resnet_small`: BasicBlock [1,1,1,1], CIFAR stem at <= 64 px,
ImageNet normalisation inside the model, kaiming fan-out init); `resnet18` is torchvision's
with the same stem.

Writes <workdir>/results.json: {"knn": {"student", "random_init_student"}, "train_seconds",
"history" (loss per epoch), "settings"}. Needs torch and lightly (`bench` extra); kd_keras
itself never imports torch.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torchvision
from absl import app, flags
from torch import nn

from kd_keras import config as config_lib
from kd_keras.data import augment
from kd_keras.data import sources as data
from kd_keras.eval import knn
from kd_keras.nets import backbones

FLAGS = flags.FLAGS
SPECS = {"resnet_tiny": (8, 16, 32, 64), "resnet_small": (32, 64, 128, 256)}
MEAN = torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1)


class BasicBlock(nn.Module):
    """kd_keras' `_basic_block`: conv3x3/s-BN-ReLU-conv3x3-BN + (1x1/s-BN shortcut), ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.proj is None else self.proj(x)))


class SmallResNet(nn.Module):
    """resnet_tiny / resnet_small as kd_keras builds them at <= 64 px (CIFAR stem, GAP)."""

    def __init__(self, widths):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, cin = [], widths[0]
        for s, w in enumerate(widths):
            stages.append(BasicBlock(cin, w, 1 if s == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class Normalised(nn.Module):
    """ImageNet normalisation of [0, 1] images inside the model, as kd_keras' backbones."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x - MEAN) / STD)


def build_backbone(name, image_size):
    if name in SPECS:
        if image_size > backbones.SMALL_STEM_MAX_SIZE:
            raise SystemExit(f"peer_swav_lightly.py: {name} is mirrored for <= 64 px only.")
        return Normalised(SmallResNet(SPECS[name])), SPECS[name][-1]
    if name == "resnet18":
        net = torchvision.models.resnet18(weights=None)
        if image_size <= backbones.SMALL_STEM_MAX_SIZE:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        return Normalised(net), 512
    raise SystemExit(f"peer_swav_lightly.py: no torch mirror of --student={name}.")


def lr_at(step, cfg, steps_per_epoch):
    """kd_keras.optim.schedules.WarmupCosine with optimizers.learning_rate_schedule's arguments."""
    o = cfg.optim
    scale = o.scaled_lr() / o.lr
    peak, final = o.scaled_lr(), o.final_lr * scale
    total = o.epochs * steps_per_epoch
    warm = int(round(o.warmup_epochs * steps_per_epoch))
    n = min(max(step, 0), total)
    if n < warm:
        return peak * n / warm
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * (n - warm) / (total - warm)))


def to_torch(x):
    """[N, H, W, 3] float tf/np -> [N, 3, H, W] torch."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def knn_eval(model, train_eval, test_eval, ks):
    model.eval()

    def feats(ds):
        xs, ys = [], []
        with torch.no_grad():
            for b in ds:
                xs.append(model(to_torch(b["image"])).numpy())
                ys.append(np.asarray(b["label"]))
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = feats(train_eval)
    xte, yte = feats(test_eval)
    return knn.knn_accuracy(xtr, ytr, xte, yte, ks=ks, vote="majority")


class PeerSwaV(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        c = cfg.cluster
        self.backbone, dim = build_backbone(cfg.model.student, cfg.data.image_size)
        self.head = SwaVProjectionHead(dim, c.proj_hidden_dim, c.proj_dim)
        self.prototypes = SwaVPrototypes(
            c.proj_dim, c.num_prototypes, n_steps_frozen_prototypes=c.freeze_prototypes_steps
        )

    def embed(self, crops):
        """List of [B, 3, s, s] per resolution group -> l2-normalised embeddings per group."""
        feats = torch.cat([self.backbone(g) for g in crops])
        return nn.functional.normalize(self.head(feats), dim=1)


def train(cfg):
    from lightly.loss import SwaVLoss
    from lightly.models.modules.memory_bank import MemoryBankModule
    from lightly.utils.lars import LARS

    c, o = cfg.cluster, cfg.optim
    torch.manual_seed(cfg.seed)
    threads = int(os.environ.get("PEER_THREADS", "1"))
    torch.set_num_threads(threads)
    train_examples, train_info = data.load_split(
        cfg.data.dataset, cfg.data.train_split, image_size_hint=cfg.data.image_size
    )
    eval_split = cfg.data.eval_split or "val"
    eval_examples, _ = data.load_split(
        cfg.data.dataset, eval_split, image_size_hint=cfg.data.image_size
    )
    steps_per_epoch = o.steps_per_epoch or train_info.num_examples // o.batch_size
    view_fn = augment.make_multicrop_fn(
        sizes=(cfg.data.image_size, c.small_crop_size),
        counts=(c.num_large_crops, c.num_small_crops),
        scales=(c.large_crop_scale, c.small_crop_scale),
        color_strength=c.color_strength,
        blur_p=c.blur_prob,
    )
    train_ds = data.make_train_dataset(
        train_examples,
        view_fn,
        o.batch_size,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        cache_decoded=cfg.data.cache_decoded,
    )

    def centre(image):
        return augment.center_crop(image, cfg.data.image_size)

    train_eval = data.make_eval_dataset(train_examples, centre, cfg.eval.eval_batch_size)
    test_eval = data.make_eval_dataset(eval_examples, centre, cfg.eval.eval_batch_size)

    model = PeerSwaV(cfg)
    criterion = SwaVLoss(
        temperature=c.temperature,
        sinkhorn_iterations=c.sinkhorn_iters,
        sinkhorn_epsilon=c.sinkhorn_epsilon,
    )
    queues = None
    if c.queue_length:
        queues = nn.ModuleList(
            [MemoryBankModule(size=(c.queue_length, c.proj_dim)) for _ in range(2)]
        )
    if o.optimizer == "lars":
        optimizer = LARS(
            model.parameters(),
            lr=0.0,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            trust_coefficient=o.lars_trust,
        )
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay
        )
    queue_start = c.queue_start_epoch * steps_per_epoch
    total = o.epochs * steps_per_epoch
    history, step, t0 = [], 0, time.time()
    batches = iter(train_ds)
    for epoch in range(o.epochs):
        model.train()
        losses = []
        for _ in range(steps_per_epoch):
            batch = next(batches)
            large = np.asarray(batch["large"])  # [B, 2, S, S, 3]
            crops = [to_torch(large[:, v]) for v in range(large.shape[1])]
            n_large = len(crops)
            if "small" in batch and batch["small"].shape[1]:
                small = np.asarray(batch["small"])
                crops += [to_torch(small[:, v]) for v in range(small.shape[1])]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg, steps_per_epoch)
            model.prototypes.normalize()
            b = crops[0].shape[0]
            # One backbone pass per resolution, one head pass over all views (BN over all
            # crops), as kd_keras' SwAV and SwAV's own code do.
            groups = [torch.cat(crops[:n_large])]
            if len(crops) > n_large:
                groups.append(torch.cat(crops[n_large:]))
            z = list(torch.split(model.embed(groups), b))
            scores = [model.prototypes(x, step) for x in z]
            queue_scores = None
            if queues is not None:
                banks = [q(z[i].detach(), update=True)[1].T for i, q in enumerate(queues)]
                if step >= queue_start:
                    queue_scores = [model.prototypes(bank, step) for bank in banks]
            loss = criterion(scores[:n_large], scores[n_large:], queue_scores)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
        print(
            f"epoch {epoch + 1}/{o.epochs} loss {history[-1]['loss']:.4f} "
            f"lr {lr_at(step, cfg, steps_per_epoch):.4g} {time.time() - t0:.0f}s",
            flush=True,
        )
    train_seconds = time.time() - t0
    ks = cfg.eval.knn_k
    result = {
        "peer": "lightly==" + __import__("lightly").__version__,
        "steps": step,
        "total_steps": total,
        "train_seconds": round(train_seconds, 1),
        "torch_threads": threads,
        "history": history,
        "knn": {"student": knn_eval(model.backbone, train_eval, test_eval, ks)},
    }
    torch.manual_seed(cfg.seed + 1)
    random_net, _ = build_backbone(cfg.model.student, cfg.data.image_size)
    result["knn"]["random_init_student"] = knn_eval(random_net, train_eval, test_eval, ks)
    result["settings"] = json.loads(cfg.to_json())
    os.makedirs(cfg.workdir, exist_ok=True)
    with open(os.path.join(cfg.workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["knn"], indent=2))
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cfg = config_lib.config_from_flags(FLAGS)
    if cfg.method != "swav":
        raise SystemExit(
            f"peer_swav_lightly.py: the flagfile must have --method=swav, got {cfg.method}."
        )
    train(cfg)


if __name__ == "__main__":
    config_lib.define_flags()
    app.run(
        main,
        flags_parser=lambda argv: config_lib.parse_command_line(argv, prog="peer_swav_lightly.py"),
    )
    sys.exit(0)
