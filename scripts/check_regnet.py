"""Evidence for the RegNet converter on full-size torchvision RegNetYs (needs torch: `bench`).

  PYTHONPATH=$PWD /work/venv-bench/bin/python scripts/check_regnet.py \\
      --work /tmp/regnet_check [--kd_python /work/main/.venv/bin/python] [--side 224]

torchvision's `regnet_y_400mf` and `regnet_y_800mf` (weights=None) and torchvision's `RegNet`
built from pycls' RegNetY-600MF parameters, each with random BatchNorm statistics, are saved as
plain state dicts (fc included), converted by `python -m kd_keras.convert --arch=<name>` under
/usr/bin/time -v in an environment without torch (`--kd_python`), and the converted backbones'
features on 4 random images are compared with torch's (max |difference| / max |torch|).
Results go to <work>/check_regnet.json and stdout.
"""

import argparse
import json
import os

import numpy as np
import torch
import torchvision
from check_converter import compare, randomise_bn, timed_convert, torch_features
from torchvision.models import regnet as tv_regnet

PYCLS_600MF = dict(depth=15, w_0=48, w_a=32.54, w_m=2.32, group_width=16, se_ratio=0.25)
NETS = {
    "regnety400mf": lambda: tv_regnet.regnet_y_400mf(weights=None),
    "regnety600mf": lambda: tv_regnet.RegNet(
        tv_regnet.BlockParams.from_init_params(**PYCLS_600MF)
    ),
    "regnety800mf": lambda: tv_regnet.regnet_y_800mf(weights=None),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/regnet_check")
    parser.add_argument("--kd_python", default="/work/main/.venv/bin/python")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--archs", default=",".join(NETS))
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    images = np.random.default_rng(0).random((4, args.side, args.side, 3), dtype=np.float32)
    report = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "load_before": os.getloadavg(),
        "side": args.side,
        "archs": {},
    }
    for arch in filter(None, args.archs.split(",")):
        torch.manual_seed(0)
        model = randomise_bn(NETS[arch](), 7)
        path = os.path.join(args.work, f"{arch}.pth")
        torch.save(model.state_dict(), path)
        out = os.path.join(args.work, f"converted_{arch}")
        entry = {
            "params": sum(p.numel() for p in model.parameters()),
            "size_mb": round(os.path.getsize(path) / 1e6, 1),
        }
        entry.update(timed_convert(args.kd_python, path, out, arch=arch))
        entry.update(compare(out, images, torch_features(model, images)))
        report["archs"][arch] = entry
        print(arch, json.dumps(entry), flush=True)
        os.remove(path)
    report["load_after"] = os.getloadavg()
    with open(os.path.join(args.work, "check_regnet.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
