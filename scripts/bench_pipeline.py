"""Input-pipeline throughput, side by side: kd_keras' tf.data views vs a torchvision DataLoader.

Workloads (same augmentations on both sides, images/s counts source images):

  weak       SimReg's weak view (B.2): RandomResizedCrop(224, scale 0.2-1) + flip, batch 64
  multicrop  SwAV / OSS multi-crop: 2 x 224 (scale 0.14-1) + 6 x 96 (scale 0.05-0.14), each
             with flip, colour jitter (0.8, 0.8, 0.8, 0.2; p 0.8), greyscale (p 0.2) and
             Gaussian blur (sigma 0.1-2, p 0.5, kernel ~10 % of the side), batch 64
  decode     the floor: JPEG decode alone (tf.io.decode_jpeg in tf.data / PIL in the loader)

kd_keras runs `kd_keras.data.sources.make_train_dataset` on the folder (shuffled file names, AUTOTUNE
parallelism) with the training default `--view_resize=auto`; side kd_keras_antialias is the
same code with `--view_resize=antialias` (every crop through the antialiased kernel, the
bits of earlier versions); torchvision runs `ImageFolder` + `DataLoader(num_workers=--workers,
shuffle=True)`. Every measurement runs in its own process (no thread pool or page cache state
of one side helps the other beyond what the OS shares), rounds are interleaved (A B A B ...),
each child warms up for `--warmup` batches and then counts batches for `--seconds`. Ratios are
kd_keras / torchvision per round, median over rounds. The machine (CPU model, flags, cores) and
the load average before every child go into the JSON.

  python scripts/bench_pipeline.py --torch_python=/work/venv-bench/bin/python \
      --before_repo=/tmp/before --out_json=docs/bench/pipeline.json
  (--torch_python: an interpreter with torch + torchvision, default this one; --before_repo:
  optional, an older checkout measured alongside)
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("weak", "multicrop", "decode")
SIDES = ("kd_keras", "kd_keras_antialias", "torchvision")


def machine():
    model, flags = platform.processor(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model.strip():
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    keep = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
    return {
        "cpu": model or platform.machine(),
        "cores": os.cpu_count(),
        "flags": [f for f in keep if f in flags],
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# Children: one side, one workload, timed


def _time_batches(iterator, count_fn, warmup, seconds):
    for _ in range(warmup):
        next(iterator)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += count_fn(next(iterator))
    return images / (time.perf_counter() - start)


def run_kd_keras(args):
    import tensorflow as tf

    from kd_keras.data import augment
    from kd_keras.data import sources as data

    root = os.path.join(args.data, "train")
    if args.workload == "decode":
        files = tf.io.gfile.glob(os.path.join(root, "*", "*"))
        ds = (
            tf.data.Dataset.from_tensor_slices(files)
            .shuffle(len(files), seed=0)
            .repeat()
            .map(
                lambda p: tf.io.decode_jpeg(tf.io.read_file(p), channels=3),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            .ragged_batch(args.batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
    else:
        examples, _ = data.load_split(f"folder:{args.data}", "train")
        resize = {"resize": "antialias" if args.side == "kd_keras_antialias" else "auto"}
        if args.side == "kd_keras_before":
            resize = {}
        if args.workload == "weak":
            try:
                views = augment.make_view_fn("weak", 224, "same", keys=("student",), **resize)
            except TypeError:  # kd_keras before the staged views (--before_repo)
                base = augment.make_view_fn("weak", 224, "same")

                def views(image, seed):
                    return {"student": base(image, seed)["student"]}
        else:
            views = augment.make_multicrop_fn(sizes=(224, 96), counts=(2, 6), **resize)
        ds = data.make_train_dataset(examples, views, args.batch_size, seed=0)
    return _time_batches(iter(ds), lambda b: args.batch_size, args.warmup, args.seconds)


def _torch_transforms(workload):
    from torchvision import transforms as T

    if workload == "weak":
        return T.Compose(
            [T.RandomResizedCrop(224, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()]
        )

    def swav(size, scale):
        kernel = 2 * max(1, (size // 10) // 2) + 1  # kd_keras' kernel: ~10 % of the side
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=scale),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
                T.ToTensor(),
            ]
        )

    crops = [swav(224, (0.14, 1.0))] * 2 + [swav(96, (0.05, 0.14))] * 6
    return lambda image: [c(image) for c in crops]


def _pil_array(image):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image))


def run_torchvision(args):
    import torch
    from torchvision import datasets

    torch.set_num_threads(1)
    root = os.path.join(args.data, "train")
    transform = _pil_array if args.workload == "decode" else _torch_transforms(args.workload)
    dataset = datasets.ImageFolder(root, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=True,
        collate_fn=list if args.workload == "decode" else None,
    )

    def forever():
        while True:
            yield from loader

    return _time_batches(forever(), lambda b: args.batch_size, args.warmup, args.seconds)


def child_main(args):
    run = run_torchvision if args.side == "torchvision" else run_kd_keras
    print(json.dumps({"images_per_s": run(args)}))


# ---------------------------------------------------------------------------------------------
# Driver


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _child(args, side, workload):
    python = args.torch_python if side == "torchvision" else sys.executable
    repo = args.before_repo if side == "kd_keras_before" else REPO
    cmd = [
        python,
        os.path.abspath(__file__),
        f"--child={side}:{workload}",
        f"--data={args.data}",
        f"--batch_size={args.batch_size}",
        f"--workers={args.workers}",
        f"--warmup={args.warmup}",
        f"--seconds={args.seconds}",
    ]
    env = {**os.environ, "PYTHONPATH": repo, "TF_CPP_MIN_LOG_LEVEL": "2"}
    load = _load()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{side}/{workload} failed:\n{out.stderr[-3000:]}")
    value = json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]
    return {"side": side, "workload": workload, "images_per_s": value, "load_before": load}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/imagenette")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="torchvision DataLoader workers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="batches not timed")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per child")
    parser.add_argument("--torch_python", default=sys.executable)
    parser.add_argument(
        "--before_repo",
        default=None,
        help="a checkout of older kd_keras (e.g. `git worktree add /tmp/before e707edf`): "
        "measured too, as side kd_keras_before, interleaved with the others",
    )
    parser.add_argument("--out_json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side, args.workload = args.child.split(":")
        return child_main(args)

    workloads = [w for w in args.workloads.split(",") if w]
    sides = SIDES + (("kd_keras_before",) if args.before_repo else ())
    report = {"machine": machine(), "command": " ".join(sys.argv), "args": vars(args)}
    print(json.dumps(report["machine"]))
    runs = []
    for r in range(args.rounds):
        for workload in workloads:
            for side in sides if r % 2 == 0 else sides[::-1]:
                if side in ("kd_keras_before", "kd_keras_antialias") and workload == "decode":
                    continue  # the same tf.io decode on all
                result = {**_child(args, side, workload), "round": r}
                runs.append(result)
                print(json.dumps(result), flush=True)
    summary = {}
    for workload in workloads:
        per_side = {
            s: [x["images_per_s"] for x in runs if x["side"] == s and x["workload"] == workload]
            for s in sides
        }
        per_side = {s: v for s, v in per_side.items() if v}
        row = {f"{s}_images_per_s": statistics.median(v) for s, v in per_side.items()}
        for s in per_side:
            if s != "torchvision":
                ratios = [a / b for a, b in zip(per_side[s], per_side["torchvision"], strict=True)]
                row[f"ratio_{s}_over_torchvision"] = statistics.median(ratios)
        for other in ("kd_keras_before", "kd_keras_antialias"):
            if other in per_side:
                ratios = [a / b for a, b in zip(per_side["kd_keras"], per_side[other], strict=True)]
                row[f"ratio_kd_keras_over_{other.removeprefix('kd_keras_')}"] = statistics.median(
                    ratios
                )
        summary[workload] = row
    if "decode" in summary:
        floor = summary["decode"]["kd_keras_images_per_s"]
        for workload in ("weak", "multicrop"):
            if workload in summary:
                summary[workload]["fraction_of_tf_decode_floor"] = (
                    summary[workload]["kd_keras_images_per_s"] / floor
                )
    report.update(runs=runs, summary=summary, load_after=_load())
    for workload, row in summary.items():
        print(workload, json.dumps({k: round(v, 3) for k, v in row.items()}))
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
