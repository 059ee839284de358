"""--jit_compile unset on a CPU: time the train step with and without XLA, keep the faster.

Whether XLA pays on a CPU depends on the machine, the networks and the input size, and it
does not hold still: the SimReg step ResNet-50 -> ResNet-18 at 112 px ran 1.59x faster with
XLA in one session on the 2-core EPYC VM of docs/benchmarks.md and 0.71-0.83x in a later one
(the same flags, another day's host and a refactored optimizer set-up). A fixed rule is wrong somewhere, so for the cases the rule
in `kd_keras.training.precision.choose_jit_compile` would hand to XLA (single-crop methods, inputs of
at least 64 px, no GPU) a long enough run measures instead:

  1. snapshot every variable of the model, its optimizer and its metrics;
  2. for XLA off, then on: compile the train step, run `WARMUP_STEPS` steps on one real
     batch, then time `TIMED_STEPS` more, each ended by reading the loss (host sync);
  3. restore the snapshot (the run starts exactly as it would have), keep the faster setting;
  4. remember the result in `$KD_KERAS_CACHE_DIR/xla_choice.json` (default
     `~/.cache/kd_keras/`), keyed by CPU model and flags, TensorFlow version, method, networks,
     input size, batch size and precision, so the next run on this machine skips the timing.

The log line `XLA jit_compile=... (...)` gives both step times and where they came from.
"""

import hashlib
import json
import os
import time

import numpy as np
import tensorflow as tf

from kd_keras.training import precision

# Runs shorter than this (steps left) would mostly pay for the timing and XLA's compile.
MIN_STEPS_TO_MEASURE = 300
WARMUP_STEPS = 2
TIMED_STEPS = 4
CACHE_FILE = "xla_choice.json"


def cache_path():
    from kd_keras.data import sources as data

    return os.path.join(data.cache_root(), CACHE_FILE)


def choice_key(cfg, cpu_flags):
    """The settings the step time depends on, hashed (the readable form is stored too).

    Args:
      cfg: `config.Config`.
      cpu_flags: set of /proc/cpuinfo flags.
    Returns:
      (key str, description dict).
    """
    described = {
        "cpu": precision.machine_cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": sorted(f for f in cpu_flags if f.startswith(("avx", "amx", "fma"))),
        "tensorflow": tf.__version__,
        "method": cfg.method,
        "student": cfg.model.student,
        "teachers": list(cfg.model.teachers),
        "teacher_caches": bool(cfg.model.teacher_caches),
        "head": cfg.model.head,
        "image_size": cfg.data.image_size,
        "batch_size": cfg.optim.batch_size,
        "precision": cfg.precision,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    return digest, described


def read_cached(key):
    """The stored record for `key`, or None (missing or unreadable file)."""
    try:
        with open(cache_path()) as f:
            return json.load(f).get(key)
    except (OSError, ValueError):
        return None


def store(key, record):
    """Adds `record` under `key`. Returns the OSError that kept it from being written, or
    None: a failure costs the next run of the setup only a re-timing."""
    path = cache_path()
    try:
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        table[key] = record
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        return err
    return None


def _state_variables(model):
    seen, out = set(), []
    groups = [model.variables, getattr(model, "metrics_variables", [])]
    if model.optimizer is not None:
        groups.append(model.optimizer.variables)
    for group in groups:
        for v in group:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def seconds_per_step(model, batch, jit_compile, strategy):
    """Median wall time of one train step of `model` on `batch` (changes the variables).

    Args:
      model: a compiled `keras.Model` with its optimizer built.
      batch: one training batch (a structure of tensors).
      jit_compile: XLA or not.
      strategy: the run's `tf.distribute.Strategy` (one replica).
    """

    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def one_step(data):
        return model.train_step(data)

    def run():
        logs = strategy.run(one_step, args=(batch,))
        # Reading a value ends the step on the host, as Keras' progress bar does.
        np.asarray(tf.nest.flatten(logs)[0])

    for _ in range(WARMUP_STEPS):
        run()
    times = []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(model, batch, strategy):
    """Times the step without and with XLA and restores the model's state.

    Returns:
      {"jit_compile": bool, "seconds_per_step": {"off": s, "on": s}}.
    """
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    state = _state_variables(model)
    snapshot = [v.numpy() for v in state]
    times = {}
    try:
        for name, jit in (("off", False), ("on", True)):
            times[name] = seconds_per_step(model, batch, jit, strategy)
    finally:
        for v, value in zip(state, snapshot, strict=True):
            v.assign(value)
    return {"jit_compile": times["on"] < times["off"], "seconds_per_step": times}


def describe(record, source):
    t = record["seconds_per_step"]
    return (
        f"auto: measured {t['off']:.3f} s/step without XLA, {t['on']:.3f} s/step with XLA"
        f" ({source})"
    )


def choose_by_measurement(cfg, model, first_batch, strategy, cpu_flags, log=None):
    """The XLA setting for this run from the cache or a measurement.

    Args:
      cfg: `config.Config`.
      model: the compiled method (restored to the resumed step).
      first_batch: callable returning one training batch (only called when timing).
      strategy: the run's strategy.
      cpu_flags: set of CPU flags.
      log: callable for a progress line, or None.
    Returns:
      (jit_compile: bool, reason: str).
    """
    key, described = choice_key(cfg, cpu_flags)
    record = read_cached(key)
    if record is not None and "seconds_per_step" in record:
        return bool(record["jit_compile"]), describe(record, f"cached in {cache_path()}")
    if log:
        log("Timing the train step without and with XLA (--jit_compile unset; once per setup).")
    record = measure(model, first_batch(), strategy)
    failed = store(key, {**record, "settings": described, "measured_at": time.strftime("%Y-%m-%d")})
    where = f"this run; not stored: {failed}" if failed else "this run"
    return record["jit_compile"], describe(record, where)
