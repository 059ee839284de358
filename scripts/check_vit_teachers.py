"""Evidence for the ViT teachers: full-size random-weight networks converted and compared with
timm, conversion time and peak memory, forward speed against timm on the same CPU and batch.

  PYTHONPATH=$PWD /work/venv/bin/python scripts/check_vit_teachers.py --work /tmp/vit_check \\
      [--giant] [--batch 8] [--repeats 10] [--torch-threads N]

One invocation: the torch part runs first in the `bench` env (/work/venv-bench, torch + timm;
`--torch-python`), writing random-weight checkpoints (timm init, every 1-d tensor and token
re-drawn so a swapped mapping shows), fixed 224 px images and timm's features and forward
times; then this (TF) env converts each checkpoint in a child process (wall time and the
child's peak RSS), runs the converted model and prints one JSON line per check:

  dino_vits16        DINO ViT-S/16, official .pth layout, 224 px grid (no resize)
  dinov2_vits14_reg  timm vit_small_patch14_reg4_dinov2 .safetensors with 518 px positional
                     embeddings, converted for 224 px (timm's antialiased resize), compared
                     with timm's dynamic-size forward at 224 px; forward-time ratio
  dinov2_vitb14      DINOv2 ViT-B/14 official .pth: conversion time and peak memory
  dinov2_vitg14      (--giant) DINOv2 ViT-g/14 official .pth (SwiGLU): the same
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


# --- torch part (bench env) ---------------------------------------------------------------------


def _redraw(model, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(
                    0.5 * torch.rand(p.shape, generator=g) + (0.5 if "gamma" in name else -0.25)
                )
            elif "token" in name or "pos_embed" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _timm_official(state, swiglu):
    """timm DINOv2 keys -> the official hub keys (mask token added, SwiGLU as w12/w3)."""
    import torch

    out = {}
    for k, v in state.items():
        if swiglu:
            k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        out[k] = v
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return out


def torch_part(work, batch, repeats, giant, threads):
    import timm
    import torch
    from safetensors.torch import save_file

    if threads:
        # On a shared 2-core machine torch's 2 OpenMP threads slow down badly when other
        # processes hold the cores (measured 2.3 s at 1 thread vs 4.9 s at 2, load ~4.7).
        torch.set_num_threads(threads)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images / 255.0).float().permute(0, 3, 1, 2) - mean) / std
    out = {"images": images}
    info = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
    }

    dino = _redraw(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0), 1)
    torch.save(dino.state_dict(), os.path.join(work, "dino_vits16.pth"))
    with torch.no_grad():
        out["dino_vits16"] = dino.forward_features(x)[:, 0].numpy()

    reg = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True
    )
    reg = _redraw(reg, 2)
    save_file(
        {k: v.contiguous() for k, v in reg.state_dict().items()},
        os.path.join(work, "dinov2_vits14_reg.safetensors"),
    )
    times = []
    with torch.no_grad():
        out["dinov2_vits14_reg"] = reg.forward_features(x)[:, 0].numpy()
        for _ in range(repeats + 2):
            start = time.perf_counter()
            reg.forward_features(x)
            times.append(time.perf_counter() - start)
    info["timm_forward_s"] = float(np.median(times[2:]))
    info["timm_forward_load"] = os.getloadavg()

    models = [("dinov2_vitb14", "vit_base_patch14_dinov2", False)]
    if giant:
        models.append(("dinov2_vitg14", "vit_giant_patch14_dinov2", True))
    for name, timm_name, swiglu in models:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
        torch.save(_timm_official(model.state_dict(), swiglu), os.path.join(work, f"{name}.pth"))
        info[f"{name}_bytes"] = os.path.getsize(os.path.join(work, f"{name}.pth"))
        del model
    np.savez(os.path.join(work, "torch_features.npz"), **out)
    with open(os.path.join(work, "torch_info.json"), "w") as f:
        json.dump(info, f)


# --- TF part ----------------------------------------------------------------------------------


def convert_child(checkpoint, arch, out, image_size):
    """Runs in a child process, so that its peak RSS is the conversion's alone."""
    from kd_keras.teachers import conversion

    start = time.perf_counter()
    conversion.convert(
        conversion.ConvertConfig(
            checkpoint=checkpoint, out=out, arch=arch, image_size=image_size, overwrite=True
        )
    )
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak_kb / 1024.0}))


def _convert(work, file, arch, image_size):
    out = os.path.join(work, f"converted_{arch}")
    args = (os.path.join(work, file), arch, out, image_size)
    code = (
        f"import sys; sys.path[:0] = [{REPO!r}, {HERE!r}]; import check_vit_teachers as c; "
        f"c.convert_child(*{args!r})"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    # The child's own peak RSS (the whole process: Python, TF and the conversion).
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return out, report["seconds"], report["peak_mb"]


def tf_part(work, repeats):
    import keras
    import tensorflow as tf

    from kd_keras.nets import vit  # noqa: F401  (registers the ViT layers for load_model)

    feats = dict(np.load(os.path.join(work, "torch_features.npz")))
    info = json.load(open(os.path.join(work, "torch_info.json")))
    images = (feats["images"] / 255.0).astype(np.float32)
    checks = [
        ("dino_vits16", "dino_vits16.pth", "vit_small_patch16", 224),
        ("dinov2_vits14_reg", "dinov2_vits14_reg.safetensors", "dinov2_vits14_reg", 224),
        ("dinov2_vitb14", "dinov2_vitb14.pth", "dinov2_vitb14", None),
        ("dinov2_vitg14", "dinov2_vitg14.pth", "dinov2_vitg14", None),
    ]
    for name, file, arch, size in checks:
        if not os.path.exists(os.path.join(work, file)):
            continue
        out, seconds, peak_mb = _convert(work, file, arch, size)
        row = {"check": name, "convert_s": round(seconds, 1), "peak_rss_mb": round(peak_mb)}
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        row["layout"] = manifest["layout"]
        row["pos_embed"] = manifest["pos_embed"]
        if name in feats:
            model = keras.models.load_model(os.path.join(out, "backbone.keras"), compile=False)
            forward = tf.function(lambda x, m=model: m(x, training=False))
            got = forward(images).numpy()
            want = feats[name]
            row["max_rel_diff"] = float(np.abs(got - want).max() / np.abs(want).max())
            if name == "dinov2_vits14_reg":
                times = []
                for _ in range(repeats + 2):
                    start = time.perf_counter()
                    forward(images).numpy()
                    times.append(time.perf_counter() - start)
                row["keras_forward_s"] = float(np.median(times[2:]))
                row["timm_forward_s"] = info["timm_forward_s"]
                row["timm_forward_load"] = info["timm_forward_load"]
                row["keras_over_timm"] = row["keras_forward_s"] / info["timm_forward_s"]
        row["load"] = os.getloadavg()
        print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/vit_check")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--giant", action="store_true")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--torch-part", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torch-python", default="/work/venv-bench/bin/python")
    parser.add_argument("--skip-torch", action="store_true", help="reuse the torch part's files")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.torch_part:
        torch_part(args.work, args.batch, args.repeats, args.giant, args.torch_threads)
        return
    if not args.skip_torch:
        cmd = [args.torch_python, __file__, "--torch-part", "--work", args.work]
        cmd += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
        cmd += ["--giant"] if args.giant else []
        cmd += ["--torch-threads", str(args.torch_threads)]
        subprocess.run(cmd, check=True)
    print(json.dumps({"load_before_tf": os.getloadavg()}))
    tf_part(args.work, args.repeats)


if __name__ == "__main__":
    main()
