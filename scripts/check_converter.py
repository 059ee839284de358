"""Evidence for kd_keras.convert on full-size ResNet-50s (needs torch: the `bench` extra).

  PYTHONPATH=$PWD /work/venv-bench/bin/python scripts/check_converter.py \\
      --work /tmp/convert_check [--kd_python /work/main/.venv/bin/python] [--train_steps 3]

1. A torchvision ResNet-50 (weights=None, random BatchNorm statistics so BN matters) is saved
   in the MoCo v2 layout (legacy pickle, with key encoder, queue, MLP fc and optimizer state),
   the SwAV layout (legacy pickle, projection head 2048-2048-128 and 3000 prototypes) and as a
   full DINO checkpoint (zip pickle, teacher and student).
2. Each is converted by `python -m kd_keras.convert` run under /usr/bin/time -v with
   `--kd_python` (an environment without torch), recording wall time and peak RSS.
3. The converted backbones are compared with torch's features on 4 random images at 224 px
   (max |difference| / max |torch feature|); for SwAV also the head embeddings and the prototype
   scores.
4. `kd_keras.train --method=oss_offline --teacher=<converted SwAV dir>` runs a few steps on
   digits (32 px large crops, 16 px small crops).
5. With --archs (default: the other torchvision depths and wide variants), each torchvision
   architecture (weights=None, random BN statistics) is saved as a plain state dict, converted
   with --arch=<name> and compared at --arch_side px.
Results go to <work>/check_converter.json and stdout.
"""

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torchvision
from torch import nn

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomise_bn(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model.eval()


def resnet50(seed):
    torch.manual_seed(seed)
    return randomise_bn(torchvision.models.resnet50(weights=None), seed + 100)


def backbone_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def torch_features(model, images):
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) - MEAN) / STD
    model = copy.deepcopy(model)
    model.fc = nn.Identity()
    with torch.no_grad():
        return model(x).numpy()


def sgd_state(model):
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    opt.step()
    return opt.state_dict()


def write_checkpoints(work, query):
    paths = {}
    key = resnet50(1)
    moco = prefixed(backbone_state(query), "module.encoder_q.")
    moco.update(
        prefixed(
            nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128)).state_dict(),
            "module.encoder_q.fc.",
        )
    )
    moco.update(prefixed(key.state_dict(), "module.encoder_k."))
    moco["module.queue"] = torch.randn(128, 65536)
    moco["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    paths["moco"] = os.path.join(work, "moco_v2_r50.pth.tar")
    torch.save(
        {"epoch": 200, "arch": "resnet50", "state_dict": moco, "optimizer": sgd_state(key)},
        paths["moco"],
        _use_new_zipfile_serialization=False,
    )

    torch.manual_seed(2)
    head = randomise_bn(
        nn.Sequential(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 128)),
        3,
    )
    prototypes = nn.Linear(128, 3000, bias=False)
    swav = {
        **backbone_state(query),
        **prefixed(head.state_dict(), "projection_head."),
        "prototypes.weight": prototypes.weight.detach(),
    }
    paths["swav"] = os.path.join(work, "swav_r50.pth.tar")
    torch.save(
        {"epoch": 800, "state_dict": prefixed(swav, "module.")},
        paths["swav"],
        _use_new_zipfile_serialization=False,
    )

    student = resnet50(4)
    dino_head = nn.Sequential(nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 256)).state_dict()
    dino = {
        "teacher": {
            **prefixed(backbone_state(query), "module.backbone."),
            **prefixed(dino_head, "module.head."),
        },
        "student": {
            **prefixed(backbone_state(student), "module.backbone."),
            **prefixed(dino_head, "module.head."),
        },
        "epoch": 100,
        "args": argparse.Namespace(arch="resnet50", out_dim=60000),
    }
    paths["dino"] = os.path.join(work, "dino_r50_full.pth")
    torch.save(dino, paths["dino"])
    return paths, head, prototypes


def timed_convert(kd_python, checkpoint, out, arch="resnet50"):
    cmd = [
        "/usr/bin/time",
        "-v",
        kd_python,
        "-m",
        "kd_keras.convert",
        f"--checkpoint={checkpoint}",
        f"--arch={arch}",
        f"--out={out}",
        "--overwrite",
    ]
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"conversion failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {
        "command": " ".join(cmd[2:]),
        "wall_s": round(wall, 2),
        "max_rss_mib": rss // 1024,
        "stdout": proc.stdout.strip(),
    }


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def compare(out, images, want, swav_parts=None):
    import keras

    from kd_keras.nets import backbones, heads  # noqa: F401  (registers InputNormalization, heads)

    model = keras.models.load_model(os.path.join(out, "backbone.keras"), compile=False)
    got = model(images, training=False).numpy()
    result = {"features_max_rel_diff": rel(got, want)}
    if swav_parts is not None:
        head_model = keras.models.load_model(os.path.join(out, "head.keras"), compile=False)
        head, prototypes = swav_parts
        with torch.no_grad():
            z = head(torch.from_numpy(want))
            w = nn.functional.normalize(prototypes.weight, dim=1)
            scores = nn.functional.normalize(z, dim=1) @ w.T
        z_keras = head_model(got, training=False).numpy()
        kernel = np.load(os.path.join(out, "prototypes.npy"))
        s_keras = (z_keras / np.linalg.norm(z_keras, axis=1, keepdims=True)) @ kernel
        result["embeddings_max_rel_diff"] = rel(z_keras, z.numpy())
        result["scores_max_rel_diff"] = rel(s_keras, scores.numpy())
    return result


def oss_offline(kd_python, teacher_dir, workdir, steps):
    cmd = [
        kd_python,
        "-m",
        "kd_keras.train",
        "--method=oss_offline",
        f"--teacher={teacher_dir}",
        "--dataset=digits",
        "--image_size=32",
        "--small_crop_size=16",
        "--num_small_crops=2",
        "--student=resnet18",
        "--batch_size=16",
        "--epochs=1",
        f"--steps_per_epoch={steps}",
        "--evaluate=false",
        "--log_images=0",
        "--verbose=2",
        f"--workdir={workdir}",
    ]
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resumed finished one
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    results = os.path.join(workdir, "results.json")
    ok = proc.returncode == 0 and os.path.isfile(results)
    summary = {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if ok:
        with open(results) as f:
            stored = json.load(f)
        summary["steps"] = stored.get("steps")
        summary["final_logs"] = stored.get("final_logs")
    else:
        summary["stderr_tail"] = proc.stderr[-2000:]
    return summary


def check_archs(args):
    """torchvision architectures saved as plain state dicts, converted, compared."""
    results = {}
    images = np.random.default_rng(1).random((2, args.arch_side, args.arch_side, 3), np.float32)
    for arch in filter(None, args.archs.split(",")):
        torch.manual_seed(0)
        model = randomise_bn(getattr(torchvision.models, arch)(weights=None), 7)
        path = os.path.join(args.work, f"{arch}.pth")
        torch.save(model.state_dict(), path)
        out = os.path.join(args.work, f"converted_{arch}")
        entry = timed_convert(args.kd_python, path, out, arch=arch)
        entry.update(compare(out, images, torch_features(model, images)))
        results[arch] = entry
        print(arch, json.dumps(entry), flush=True)
        os.remove(path)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/convert_check")
    parser.add_argument("--kd_python", default="/work/main/.venv/bin/python")
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument(
        "--archs",
        default="resnet18,resnet34,resnet101,resnet152,wide_resnet50_2,wide_resnet101_2",
        help="torchvision architectures to check as plain state dicts ('' to skip).",
    )
    parser.add_argument("--arch_side", type=int, default=64)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    images = np.random.default_rng(0).random((4, 224, 224, 3), dtype=np.float32)
    query = resnet50(0)
    want = torch_features(query, images)
    paths, head, prototypes = write_checkpoints(args.work, query)
    report = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "load": os.getloadavg(),
        "layouts": {},
    }
    for layout, path in paths.items():
        out = os.path.join(args.work, f"converted_{layout}")
        entry = {"checkpoint": path, "size_mb": round(os.path.getsize(path) / 1e6, 1)}
        entry.update(timed_convert(args.kd_python, path, out))
        entry.update(compare(out, images, want, (head, prototypes) if layout == "swav" else None))
        report["layouts"][layout] = entry
        print(layout, json.dumps(entry), flush=True)
    swav_dir = os.path.join(args.work, "converted_swav")
    report["oss_offline"] = oss_offline(
        args.kd_python, swav_dir, os.path.join(args.work, "oss_offline_run"), args.train_steps
    )
    print("oss_offline", json.dumps(report["oss_offline"]), flush=True)
    report["archs"] = check_archs(args)
    with open(os.path.join(args.work, "check_converter.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
