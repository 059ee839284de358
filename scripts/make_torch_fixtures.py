"""Writes the checkpoint fixtures of tests/test_convert.py with real torch (the `bench` extra).

  PYTHONPATH=$PWD /work/venv-bench/bin/python scripts/make_torch_fixtures.py [--out tests/data/convert]

Small torchvision ResNets (torchvision's own BasicBlock / Bottleneck and ResNet._make_layer,
narrow widths) with random weights and random BatchNorm statistics, saved in the layouts of the
published self-supervised checkpoints and in both torch pickle formats, plus one .safetensors
file; next to them `features.npz` holds fixed input images (NHWC, [0, 1]) at an even and an odd
side and torch's features of every network (eval mode, ImageNet-normalised input), and for the
SwAV fixture its projection-head embeddings and prototype scores. The whole set stays far below
2 MB. kd_keras' tests read these files without torch.
"""

import argparse
import copy
import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn
from torchvision.models import resnet as tv_resnet

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SIDES = (32, 37)  # an even and an odd input side


class NarrowResNet(tv_resnet.ResNet):
    """torchvision's ResNet with stage widths w, 2w, 4w, 8w (torchvision fixes w = 64).

    Only the constructor differs: blocks, `_make_layer`, parameter names and `forward` are
    torchvision's. width_factor widens the bottleneck's inner convs (wide_resnet: 2).
    """

    def __init__(self, block, layers, width, width_factor=1, num_classes=10):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64 * width_factor
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)


NETS = {
    # name: (kd_keras --arch, torchvision block, blocks, width, width_factor)
    "basic": ("resnet-basic-2.1.1.1-3", tv_resnet.BasicBlock, (2, 1, 1, 1), 3, 1),
    "bottleneck": ("resnet-bottleneck-1.2.1.1-2", tv_resnet.Bottleneck, (1, 2, 1, 1), 2, 1),
    "wide": ("resnet-bottleneck-1.1.1.1-2-wide2", tv_resnet.Bottleneck, (1, 1, 1, 1), 2, 2),
}


def randomise_bn(model, generator):
    """Random BN affine parameters and running statistics, so a swapped mapping shows."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = module.num_features
            with torch.no_grad():
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.num_batches_tracked.fill_(7)


def make_net(name, seed):
    _, block, blocks, width, factor = NETS[name]
    torch.manual_seed(seed)
    model = NarrowResNet(block, blocks, width, factor)
    randomise_bn(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def features(model, images):
    """torch's pooled features [B, m] of NHWC [0, 1] images (the fc is bypassed)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = (x - MEAN) / STD
    fc, model.fc = model.fc, nn.Identity()
    try:
        with torch.no_grad():
            return model(x).numpy()
    finally:
        model.fc = fc


def prefixed(state, prefix):
    return {f"{prefix}{k}": v for k, v in state.items()}


def sgd_state(model):
    """An SGD state dict with momentum buffers (of a copy: `model` keeps its weights)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    model.zero_grad()
    return opt.state_dict()


def mlp(dims, bn=True):
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def save(obj, path, legacy):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "data", "convert"))
    parser.add_argument(
        "--vit", action="store_true", help="write only the ViT fixtures (scripts/torch_vit_fixtures.py)"
    )
    parser.add_argument("--vit-out", default=os.path.join("tests", "data", "vit"))
    args = parser.parse_args()
    if args.vit:
        import torch_vit_fixtures

        torch_vit_fixtures.main(args.vit_out)
        return
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    images = {side: rng.random((2, side, side, 3), dtype=np.float32) for side in SIDES}
    arrays = {f"images_{s}": images[s] for s in SIDES}
    index = {}

    def record(fixture, net, model, **extra):
        index[fixture] = {"net": net, "arch": NETS[net][0], **extra}
        for side in SIDES:
            arrays[f"{fixture}_{side}"] = features(model, images[side])

    nets = {name: make_net(name, seed) for seed, name in enumerate(NETS)}
    out = args.out

    # torchvision layout (fc kept, dropped by the converter), both pickle formats.
    for name, model in nets.items():
        for legacy in (False, True) if name != "wide" else (False,):
            fixture = f"torchvision_{name}_{'legacy' if legacy else 'zip'}"
            save(model.state_dict(), os.path.join(out, f"{fixture}.pth"), legacy)
            record(fixture, name, model, layout="torchvision", file=f"{fixture}.pth")

    # timm-style safetensors (torchvision names).
    tensors = {k: v.numpy() for k, v in nets["basic"].state_dict().items()}
    save_file(tensors, os.path.join(out, "torchvision_basic.safetensors"))
    record(
        "safetensors_basic",
        "basic",
        nets["basic"],
        layout="torchvision",
        file="torchvision_basic.safetensors",
    )

    query = nets["bottleneck"]
    fmax = 8 * NETS["bottleneck"][3] * 4
    # MoCo v2 (legacy pickle, like the 2020 files): query encoder with its MLP fc, key
    # encoder, queue, optimizer state.
    key_encoder = make_net("bottleneck", 11)
    q_state = dict(query.state_dict())
    q_state.update(prefixed(mlp((fmax, fmax, 16), bn=False).state_dict(), "fc."))
    q_state = {k: v for k, v in q_state.items() if k not in ("fc.weight", "fc.bias")}
    moco = {
        **prefixed(q_state, "module.encoder_q."),
        **prefixed(key_encoder.state_dict(), "module.encoder_k."),
        "module.queue": torch.randn(16, 32),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    save(
        {"epoch": 200, "arch": "resnet50", "state_dict": moco, "optimizer": sgd_state(key_encoder)},
        os.path.join(out, "moco_v2.pth.tar"),
        legacy=True,
    )
    record("moco_v2", "bottleneck", query, layout="moco", file="moco_v2.pth.tar")

    # MoCo v3 (zip): base encoder with a BN MLP projector in fc, momentum encoder, predictor.
    v3_base = {k: v for k, v in query.state_dict().items() if not k.startswith("fc.")}
    v3_base.update(prefixed(mlp((fmax, 32, 16)).state_dict(), "fc."))
    v3 = {
        **prefixed(v3_base, "module.base_encoder."),
        **prefixed(key_encoder.state_dict(), "module.momentum_encoder."),
        **prefixed(mlp((16, 32, 16)).state_dict(), "module.predictor."),
    }
    save(
        {"epoch": 300, "arch": "resnet50", "state_dict": v3},
        os.path.join(out, "moco_v3.pth.tar"),
        legacy=False,
    )
    record("moco_v3", "bottleneck", query, layout="moco_v3", file="moco_v3.pth.tar")

    # SwAV (legacy): backbone + projection head Linear-BN-ReLU-Linear + prototypes.
    torch.manual_seed(5)
    head = mlp((fmax, 32, 8)).eval()
    randomise_bn(head, torch.Generator().manual_seed(6))
    prototypes = nn.Linear(8, 10, bias=False)
    swav_state = {k: v for k, v in query.state_dict().items() if not k.startswith("fc.")}
    swav_state.update(prefixed(head.state_dict(), "projection_head."))
    swav_state["prototypes.weight"] = prototypes.weight.detach().clone()
    save(
        {
            "epoch": 800,
            "state_dict": prefixed(swav_state, "module."),
            "optimizer": sgd_state(query),
        },
        os.path.join(out, "swav.pth.tar"),
        legacy=True,
    )
    record("swav", "bottleneck", query, layout="swav", file="swav.pth.tar")
    with torch.no_grad():
        for side in SIDES:
            f = torch.from_numpy(arrays[f"swav_{side}"])
            z = head(f)
            arrays[f"swav_embeddings_{side}"] = z.numpy()
            w = nn.functional.normalize(prototypes.weight, dim=1)
            arrays[f"swav_scores_{side}"] = (nn.functional.normalize(z, dim=1) @ w.T).numpy()

    # DINO full checkpoint (zip): teacher and student with module.backbone. + DINOHead-like head.
    student = make_net("bottleneck", 21)
    teacher_state = {k: v for k, v in query.state_dict().items() if not k.startswith("fc.")}
    student_state = {k: v for k, v in student.state_dict().items() if not k.startswith("fc.")}
    dino_head = mlp((fmax, 32, 16), bn=False).state_dict()
    dino = {
        "teacher": {
            **prefixed(teacher_state, "module.backbone."),
            **prefixed(dino_head, "module.head."),
        },
        "student": {
            **prefixed(student_state, "module.backbone."),
            **prefixed(dino_head, "module.head."),
        },
        "optimizer": sgd_state(student),
        "epoch": 100,
        "args": argparse.Namespace(arch="resnet50", out_dim=60000, lr=0.03),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }
    save(dino, os.path.join(out, "dino_full.pth"), legacy=False)
    record("dino_full", "bottleneck", query, layout="dino", file="dino_full.pth")
    index["dino_student"] = {
        "net": "bottleneck",
        "arch": NETS["bottleneck"][0],
        "layout": "dino_student",
        "file": "dino_full.pth",
    }
    for side in SIDES:
        arrays[f"dino_student_{side}"] = features(student, images[side])

    np.savez_compressed(os.path.join(out, "features.npz"), **arrays)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"torch": torch.__version__, "sides": SIDES, "fixtures": index}, f, indent=2)
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"wrote {len(os.listdir(out))} files, {total / 1e6:.3f} MB, to {out}")


if __name__ == "__main__":
    main()
