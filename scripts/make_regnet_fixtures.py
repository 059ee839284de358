"""Writes the RegNet fixtures of tests/test_regnet.py with real torch (the `bench` extra).

  PYTHONPATH=$PWD /work/venv-bench/bin/python scripts/make_regnet_fixtures.py [--out tests/data/regnet]

1. A narrow RegNetY built by torchvision's own `RegNet` and `BlockParams` classes (its stem,
   Y blocks, squeeze-excitation and parameter names; only the widths are small): stage depths
   1/2/2/1, widths 8/16/24/32, group width 8 (so 1, 2, 3 and 4 groups), SE ratio 0.25, stem 8.
   Random weights and random BatchNorm statistics, saved as a plain state dict (its 10-class fc
   included, which the converter skips) in torch's zip format, and once under `module.` in the
   legacy format.
2. `features.npz`: fixed images (NHWC, [0, 1]) at an even and an odd side and torch's pooled
   features (eval mode, ImageNet-normalised input), plus torch's output of the first stage.
3. `index.json`: key -> shape of the state dicts of torchvision's full `regnet_y_400mf` and
   `regnet_y_800mf` (weights=None; no tensors) and of torchvision's `RegNet` built from pycls'
   RegNetY-600MF parameters, with their stage widths, depths and parameter counts, so the
   tests check the names and shapes of the real architectures without weights.
Everything stays far below 1 MB. The tests read these files without torch.
"""

import argparse
import json
import os

import numpy as np
import torch
from torch import nn
from torchvision.models import regnet as tv_regnet

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SIDES = (32, 37)
ARCH = "regnety-1.2.2.1-8.16.24.32-g8-stem8"  # the kd_keras --arch of the narrow net
FULL = {"regnety400mf": tv_regnet.regnet_y_400mf, "regnety800mf": tv_regnet.regnet_y_800mf}
# RegNetY-600MF is pycls' (torchvision publishes no 600MF): its design parameters through
# torchvision's BlockParams.from_init_params, for stage widths/depths and parameter count.
PYCLS_600MF = dict(depth=15, w_0=48, w_a=32.54, w_m=2.32, group_width=16, se_ratio=0.25)


def narrow_regnety(seed):
    widths = [8, 16, 24, 32]
    params = tv_regnet.BlockParams(
        depths=[1, 2, 2, 1],
        widths=widths,
        group_widths=[min(8, w) for w in widths],
        bottleneck_multipliers=[1.0] * 4,
        strides=[2] * 4,
        se_ratio=0.25,
    )
    torch.manual_seed(seed)
    model = tv_regnet.RegNet(params, num_classes=10, stem_width=8)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            module.num_batches_tracked.fill_(3)
    return model.eval()


def forward(model, images):
    """(pooled features [B, 32], stage-1 output NHWC) of NHWC [0, 1] images."""
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) - MEAN) / STD
    with torch.no_grad():
        stage1 = model.trunk_output.block1(model.stem(x))
        features = model.avgpool(model.trunk_output(model.stem(x))).flatten(1)
    return features.numpy(), stage1.permute(0, 2, 3, 1).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "data", "regnet"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = narrow_regnety(0)
    state = model.state_dict()
    torch.save(state, os.path.join(args.out, "regnety_narrow.pth"))
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 5},
        os.path.join(args.out, "regnety_narrow_module_legacy.pth"),
        _use_new_zipfile_serialization=False,
    )
    rng = np.random.default_rng(0)
    arrays = {}
    for side in SIDES:
        images = rng.random((2, side, side, 3), dtype=np.float32)
        arrays[f"images_{side}"] = images
        arrays[f"features_{side}"], arrays[f"stage1_{side}"] = forward(model, images)
    np.savez_compressed(os.path.join(args.out, "features.npz"), **arrays)

    full = {}
    nets = {name: build(weights=None) for name, build in FULL.items()}
    nets["regnety600mf"] = tv_regnet.RegNet(tv_regnet.BlockParams.from_init_params(**PYCLS_600MF))
    for name, net in nets.items():
        stages = list(net.trunk_output.children())
        full[name] = {
            "params": sum(p.numel() for p in net.parameters()),
            "fc_params": sum(p.numel() for p in net.fc.parameters()),
            "widths": [stage[-1].f.c[0].out_channels for stage in stages],
            "depths": [len(stage) for stage in stages],
            "shapes": {k: list(v.shape) for k, v in net.state_dict().items()},
        }
    index = {
        "torch": torch.__version__,
        "arch": ARCH,
        "sides": SIDES,
        "narrow_params": sum(p.numel() for p in model.parameters()),
        "narrow_fc_params": sum(p.numel() for p in model.fc.parameters()),
        "full": full,
    }
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {len(os.listdir(args.out))} files, {total / 1e6:.3f} MB, to {args.out}")


if __name__ == "__main__":
    main()
