"""Training throughput, peak memory and k-NN evaluation time of kd_keras' methods.

Every configuration runs in its own Python process (so peak memory is per configuration and no
dtype policy, XLA cache or thread pool carries over) and is timed the same way: `keras.Model.fit`
for `--warmup_steps` steps that are not counted (tracing, XLA compilation, allocator warm-up),
then `--windows` windows of `--window_steps` steps each; the reported images/s is the median
over windows (min and max are kept in the JSON). Images/s counts source images per step, i.e.
`--batch_size`, whatever the number of crops a method takes from each image.

Configurations (`--configs`, comma-separated; each may be run at several `--precisions` and
`--xla` settings):

  simreg          SimReg, live teacher (`--teacher`, randomly initialised: speed only)
  simreg_cached   SimReg reading the same teacher's features from a teacher cache written first
                  (the cache write time is reported separately)
  supervised      the supervised baseline (cross-entropy) on the student
  oss             OSS online distillation (teacher `--teacher` trained with the student)
  swav            SwAV on the student alone
  knn             student feature extraction + FAISS k-NN (`--knn_train` x `--knn_test`)
  torch_simreg, torch_oss
                  the same step in PyTorch eager (scripts/bench_torch.py, run by
                  `--torch_python`, default this interpreter; needs `pip install -e .[bench]`)

Input (`--input`): "pipeline" feeds the real tf.data pipeline (random images of side
1.15 x `--image_size` in memory, augmentation, cache look-up) and is what training sees;
"fixed" repeats one prepared batch, which times the model step alone (used for the PyTorch
comparison, whose step gets a fixed batch too).

Results: `--out_json` (all numbers, machine, load average, command) and `--out_md` (a markdown
table; docs/benchmarks.md in the repository).

Examples (repository root):
  python scripts/benchmark.py --configs=simreg,simreg_cached --student=resnet18 \
      --teacher=resnet50 --image_size=64 --batch_size=32
  python scripts/benchmark.py --configs=simreg --precisions=float32,mixed_bfloat16 --xla=off,on
  # GPU: the same flags, e.g. --image_size=224 --batch_size=256 --precisions=mixed_float16
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A "before" worker (--before_repo) runs this script against another checkout's kd_keras.
sys.path.insert(0, os.environ.get("KD_KERAS_BENCH_LIBRARY") or REPO)

KERAS_CONFIGS = ("simreg", "simreg_cached", "supervised", "oss", "swav")
TORCH_CONFIGS = ("torch_simreg", "torch_oss")
ALL_CONFIGS = (*KERAS_CONFIGS, "knn", *TORCH_CONFIGS)
NUM_IMAGES = 16  # batches of distinct source images in the in-memory dataset
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# Worker side (one configuration per process).


def _machine():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(g).get("device_name", "GPU") for g in gpus]
    return {
        "device": ", ".join(names) if names else f"CPU ({os.cpu_count()} cores)",
        "gpu": bool(gpus),
    }


def _peak_memory(gpu):
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if gpu:
        import tensorflow as tf

        out["peak_gpu_mb"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20)
    return out


def _examples(args, n):
    import numpy as np
    import tensorflow as tf

    side = int(round(args.image_size * 1.15))
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(n, side, side, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": images, "label": labels, "index": np.arange(n, dtype=np.int64)}
    )
    return ds, side


def _cfg(args, method, precision, xla):
    from kd_keras import config

    cluster_fields = {f for f in config.ClusterConfig.__dataclass_fields__}
    cluster = {"online_teacher": args.teacher, "small_crop_size": args.small_crop_size}
    cluster = {k: v for k, v in cluster.items() if k in cluster_fields}
    return config.Config(
        workdir=tempfile.mkdtemp(prefix="kd_bench_"),
        method=method,
        sync_bn=False,
        precision=precision,
        jit_compile=xla,
        data=config.DataConfig(image_size=args.image_size, augment="weak"),
        model=config.ModelConfig(student=args.student, head=args.head),
        optim=config.OptimConfig(batch_size=args.batch_size, epochs=100),
        cluster=config.ClusterConfig(**cluster),
    )


def _live_teacher(args):
    from kd_keras.nets import backbones
    from kd_keras.teachers.loading import Teacher, TeacherSpec

    model = backbones.build_backbone(args.teacher, args.image_size)
    return Teacher(TeacherSpec("keras", "", "teacher", "unit"), model, args.image_size)


class _StepTimes:
    """Keras callback: wall-clock time after every training step (host-synchronised)."""

    def __init__(self):
        import keras

        outer = self

        class _Cb(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                float(logs["loss"])  # wait for the step to finish
                outer.times.append(time.perf_counter())

        self.times = []
        self.callback = _Cb()


def _time_fit(method, ds, args):
    timer = _StepTimes()
    steps = args.warmup_steps + args.windows * args.window_steps
    start = time.perf_counter()
    method.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer.callback])
    t = timer.times
    w0 = args.warmup_steps - 1  # window i spans steps (w0 + i*n, w0 + (i+1)*n]
    rates = []
    for i in range(args.windows):
        a, b = w0 + i * args.window_steps, w0 + (i + 1) * args.window_steps
        rates.append(args.window_steps * args.batch_size / (t[b] - t[a]))
    return {
        "images_per_s": round(statistics.median(rates), 2),
        "images_per_s_min": round(min(rates), 2),
        "images_per_s_max": round(max(rates), 2),
        "warmup_s": round(t[w0] - start, 2),
        "steps": steps,
    }


def run_keras_config(args, name, precision, xla):
    """Builds and times one Keras configuration; returns its result dict."""
    import keras
    import tensorflow as tf

    from kd_keras import config
    from kd_keras.data import augment, teacher_cache
    from kd_keras.data import sources as data
    from kd_keras.optim import optimizers
    from kd_keras.training import precision as precision_lib
    from kd_keras.training import run as train

    method_name = "simreg" if name == "simreg_cached" else name
    cfg = _cfg(args, method_name, precision, xla)
    n = NUM_IMAGES * args.batch_size
    examples, _ = _examples(args, n)
    info = data.SplitInfo(
        n, NUM_CLASSES, tuple(map(str, range(NUM_CLASSES))), "bench", "train", True
    )
    result = {"warning": precision_lib.support_warning(precision)}
    keras.utils.set_random_seed(0)
    teachers, caches = [], []
    view_epochs = None
    if name in ("simreg", "simreg_cached"):
        teachers = [_live_teacher(args)]
    if name == "simreg_cached":
        cache_dir = os.path.join(cfg.workdir, "cache", "teacher")
        start = time.perf_counter()
        teacher_cache.write_caches(
            [cache_dir], teachers, examples, info, cfg.data, cfg.seed, epochs=1,
            batch_size=args.batch_size, shard_size=n, log=lambda _: None,
        )  # fmt: skip
        result["cache_write_s"] = round(time.perf_counter() - start, 2)
        caches = [teacher_cache.TeacherCache(cache_dir)]
        view_epochs = 1
    if method_name in config.CLUSTERING_METHODS:
        from kd_keras.methods import factory

        view_fn = factory.multicrop_view_fn(cfg)
    else:
        view_fn = augment.make_view_fn("weak", args.image_size, "same", keys=("student",))

    ds = data.make_train_dataset(
        examples, view_fn, args.batch_size, seed=0, shuffle_buffer=n, view_epochs=view_epochs,
        deterministic=False,
    )  # fmt: skip
    if caches:
        ds = teacher_cache.attach_features(ds, caches)
    if args.input == "fixed":
        ds = tf.data.Dataset.from_tensors(next(iter(ds))).repeat()
    with precision_lib.policy_scope(precision):
        student = train.build_student(cfg, args.image_size)
        method = train.build_method(cfg, student, teachers, NUM_CLASSES, steps_per_epoch=NUM_IMAGES)
        # What training builds (`--optimizer=sgd`, momentum 0.9, weight decay 1e-4), as the
        # PyTorch side's SGD.
        optimizer = optimizers.make_optimizer(cfg.optim, NUM_IMAGES)
        jit, result["jit_choice"] = precision_lib.choose_jit_compile(
            xla, args.image_size, method_name in config.CLUSTERING_METHODS
        )
        method.compile(optimizer=optimizer, jit_compile=jit)
        method.build((None, args.image_size, args.image_size, 3))
    result["jit_compile_effective"] = bool(method.jit_compile)
    result.update(_time_fit(method, ds, args))
    return result


def run_knn(args):
    """Times student feature extraction and FAISS k-NN on synthetic labelled images."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kd_keras.eval import features, knn
    from kd_keras.training import run as train

    cfg = _cfg(args, "simreg", "float32", False)
    keras.utils.set_random_seed(0)
    student = train.build_student(cfg, args.image_size)
    rng = np.random.default_rng(1)
    out = {}

    def batches(n):
        images = rng.uniform(size=(n, args.image_size, args.image_size, 3)).astype(np.float32)
        labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        return ds.batch(256)

    features.extract_features(student, batches(256))  # trace once
    start = time.perf_counter()
    xtr, ytr = features.extract_features(student, batches(args.knn_train))
    xte, yte = features.extract_features(student, batches(args.knn_test))
    out["extract_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    knn.knn_accuracy(xtr, ytr, xte, yte, ks=(1, 20), vote="majority")
    out["knn_s"] = round(time.perf_counter() - start, 3)
    out["knn_eval_s"] = round(out["extract_s"] + out["knn_s"], 2)
    out["images_per_s_extract"] = round((args.knn_train + args.knn_test) / out["extract_s"], 1)
    return out


def worker_main(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    spec = json.loads(args.worker)
    result = dict(spec)
    try:
        if spec["config"] == "knn":
            result.update(run_knn(args))
        else:
            result.update(run_keras_config(args, spec["config"], spec["precision"], spec["xla"]))
        result.update(_machine())
        result.update(_peak_memory(result["gpu"]))
    except Exception as err:  # reported in the table, the other configurations go on
        result["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver side.


def _common_argv(args):
    keys = (
        "student", "teacher", "head", "image_size", "batch_size", "small_crop_size",
        "warmup_steps", "windows", "window_steps", "input", "knn_train", "knn_test", "threads",
    )  # fmt: skip
    return [f"--{k}={getattr(args, k)}" for k in keys]


def _run_child(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)[:400]}"}


def _specs(args):
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in ALL_CONFIGS]
    if unknown:
        raise SystemExit(f"benchmark.py: unknown --configs {unknown}; known: {ALL_CONFIGS}")
    precisions = [p for p in args.precisions.split(",") if p]
    xlas = [{"on": True, "off": False, "auto": None}[x] for x in args.xla.split(",") if x]
    for name in configs:
        if name in KERAS_CONFIGS:
            for p in precisions:
                for x in xlas:
                    yield {"config": name, "precision": p, "xla": x}
        else:
            yield {"config": name, "precision": "float32", "xla": False}
    if args.before_repo:
        for name in configs:
            if name in KERAS_CONFIGS:
                for p in precisions:
                    for x in xlas:
                        yield {"config": name, "precision": p, "xla": x, "before": True}


def _env(args):
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.threads:
        env["TF_NUM_INTRAOP_THREADS"] = str(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def _markdown(report):
    a = report["args"]
    lines = [
        f"Student `{a['student']}`, teacher `{a['teacher']}`, {a['image_size']} px, batch "
        f"{a['batch_size']}, input `{a['input']}`; median of {a['windows']} windows of "
        f"{a['window_steps']} steps after {a['warmup_steps']} warm-up steps, median over "
        f"{a['rounds']} round(s) run in turn. Machine: "
        f"{report['device']}; load average before/after: {report['load_before']} / "
        f"{report['load_after']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| config | precision | XLA | images/s (median) | min-max over windows | peak RSS MB | note |",
        "|---|---|---|---|---|---|---|",
    ]
    if all(r["config"] == "knn" for r in report["results"]):
        lines = lines[:-2]  # no training rows: no table
    for r in report["results"]:
        if r["config"] == "knn":
            continue
        if "error" in r:
            note = r["error"]
        else:
            note = "; ".join(
                s
                for s in (
                    f"cache write {r['cache_write_s']} s" if "cache_write_s" in r else "",
                    "XLA refused by Keras" if r.get("xla") and not r.get("jit_compile_effective", True) else "",
                    r.get("warning") or "",
                )
                if s
            )  # fmt: skip
        lines.append(
            f"| {r['config']}{' (before)' if r.get('before') else ''} | {r.get('precision', '')} | {_xla_name(r.get('xla'))} | "
            f"{r.get('images_per_s', '-')} | {r.get('images_per_s_min', '-')}-"
            f"{r.get('images_per_s_max', '-')} | {r.get('peak_rss_mb', '-')} | {note} |"
        )
    for r in report["results"]:
        if r["config"] == "knn" and "error" not in r:
            lines += [
                "",
                f"k-NN evaluation ({a['knn_train']} train x {a['knn_test']} test images): feature "
                f"extraction {r['extract_s']} s ({r['images_per_s_extract']} images/s), FAISS "
                f"k-NN (k = 1, 20) {r['knn_s']} s, total {r['knn_eval_s']} s.",
            ]
    if report.get("ratios"):
        lines += ["", "Ratios within this run:", ""]
        lines += [f"- {k}: {v}" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def _combine(rounds):
    """One result from the rounds of a configuration: medians of the per-round figures."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[-1]
    out = dict(ok[-1])
    for key in ("images_per_s", "knn_eval_s", "extract_s", "knn_s"):
        if key in out:
            out[key] = round(statistics.median(r[key] for r in ok), 3)
    if "images_per_s" in out:
        out["images_per_s_min"] = min(r["images_per_s_min"] for r in ok)
        out["images_per_s_max"] = max(r["images_per_s_max"] for r in ok)
        out["images_per_s_rounds"] = [r["images_per_s"] for r in ok]
    out["peak_rss_mb"] = max(r.get("peak_rss_mb", 0) for r in ok)
    return out


def _xla_name(x):
    return "auto" if x is None else ("on" if x else "off")


def _ratios(results):
    """Speed ratios between configurations of this run (same machine, same process setup)."""
    by = {
        (r["config"], r.get("precision"), r.get("xla")): r["images_per_s"]
        for r in results
        if "images_per_s" in r and not r.get("before")
    }
    out = {}
    for r in results:
        key = (r["config"], r.get("precision"), r.get("xla"))
        if r.get("before") and "images_per_s" in r and key in by:
            label = f"{r['config']} ({key[1]}, XLA {_xla_name(key[2])})"
            out[f"{label} after / before"] = round(by[key] / r["images_per_s"], 2)
            torch_key = (f"torch_{r['config']}", key[1], False)
            if torch_key in by:
                out[f"{label} before / PyTorch eager"] = round(r["images_per_s"] / by[torch_key], 2)
    for (name, p, x), v in by.items():
        if name == "simreg_cached" and ("simreg", p, x) in by:
            out[f"simreg cached / live teacher ({p}, XLA {_xla_name(x)})"] = round(
                v / by[("simreg", p, x)], 2
            )
        if (
            name in KERAS_CONFIGS
            and (p, x) != ("float32", False)
            and (name, "float32", False) in by
        ):
            out[f"{name} {p} XLA {_xla_name(x)} / float32 XLA off"] = round(
                v / by[(name, "float32", False)], 2
            )
        if name in ("simreg", "oss") and p == "float32" and (f"torch_{name}", p, False) in by:
            out[f"{name} Keras XLA {_xla_name(x)} / PyTorch eager (float32)"] = round(
                v / by[(f"torch_{name}", p, False)], 2
            )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="simreg,simreg_cached,supervised,oss,knn")
    parser.add_argument("--precisions", default="float32")
    parser.add_argument(
        "--xla",
        default="auto",
        help="comma-separated subset of off,on,auto (auto: what "
        "--jit_compile unset picks, kd_keras.training.precision.choose_jit_compile)",
    )
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--head", default="mlp4")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--small_crop_size", type=int, default=None, help="default 3/7 of size")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window_steps", type=int, default=5)
    parser.add_argument("--input", choices=("pipeline", "fixed"), default="pipeline")
    parser.add_argument("--knn_train", type=int, default=5000)
    parser.add_argument("--knn_test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = default)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per configuration, in turn")
    parser.add_argument("--torch_python", default=sys.executable)
    parser.add_argument(
        "--before_repo",
        default=None,
        help="another kd_keras checkout (e.g. `git worktree add /tmp/before REV`): every Keras "
        "configuration is run again with its library, in the same rounds",
    )
    parser.add_argument("--out_json", default=None)
    parser.add_argument("--out_md", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small_crop_size is None:
        args.small_crop_size = max(8, args.image_size * 3 // 7)
    if args.worker:
        return worker_main(args)

    env = _env(args)
    load_before = os.getloadavg()
    specs = list(_specs(args))
    runs = {i: [] for i in range(len(specs))}
    # Rounds run the configurations in turn (A B C A B C ...) so that a change of machine load
    # during the run affects every configuration alike.
    for round_index in range(args.rounds):
        for i, spec in enumerate(specs):
            if spec["config"] in TORCH_CONFIGS:
                cmd = [args.torch_python, os.path.join(REPO, "scripts", "bench_torch.py"),
                       f"--step={spec['config'][len('torch_'):]}", *_common_argv(args)]  # fmt: skip
            else:
                cmd = [sys.executable, os.path.abspath(__file__), *_common_argv(args),
                       f"--worker={json.dumps(spec)}"]  # fmt: skip
            child_env = (
                {**env, "KD_KERAS_BENCH_LIBRARY": args.before_repo} if spec.get("before") else env
            )
            result = {**spec, **_run_child(cmd, child_env)}
            runs[i].append(result)
            shown = result.get("images_per_s", result.get("knn_eval_s", result.get("error")))
            print(
                f"round {round_index} {spec['config'] + ('@before' if spec.get('before') else ''):>14} "
                f"{spec['precision']:>15} "
                f"xla={spec['xla']!s:5} -> {shown}",
                flush=True,
            )
    results = [_combine(runs[i]) for i in range(len(specs))]
    device = next((r["device"] for r in results if "device" in r), platform.processor())
    report = {
        "command": " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]]),
        "args": vars(args),
        "device": device,
        "platform": platform.platform(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "results": results,
        "ratios": _ratios(results),
    }
    for k, v in report["ratios"].items():
        print(f"{k}: {v}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=2)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(_markdown(report))


if __name__ == "__main__":
    main()
