"""Mixed precision (--precision): the Keras dtype policy of the student, heads and method.

Under "mixed_float16" / "mixed_bfloat16" layers compute in 16 bits and keep float32 variables.
What stays float32, and where that is done:

* BatchNorm statistics: Keras' BatchNormalization computes its moments in float32.
* Losses, l2 normalisation, softmax / cross-entropy and Sinkhorn: the methods cast the network
  outputs to float32 first (`losses.l2_normalize`, `losses.sinkhorn`, `Supervised._loss`).
* Loss scaling (float16 only): `keras.Model.compile` wraps the optimizer in a
  `LossScaleOptimizer` when the model's policy is mixed_float16; `Method.scale_loss` multiplies
  by its dynamic scale and `apply_gradients` unscales and skips non-finite steps.

The policy is set only while the networks are built (`policy_scope`): layers remember the
policy they were created under, and the process-wide default is restored afterwards.

Devices without native support: kd_keras runs the precision that was asked for (the results
are correct, the arithmetic emulated) and logs a warning saying why it will probably be slower;
see `support_warning`. It never switches precision silently.
"""

import contextlib
import logging

import keras
import tensorflow as tf

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

log = logging.getLogger("kd_keras")


@contextlib.contextmanager
def policy_scope(precision):
    """Sets the global Keras dtype policy to `precision` inside the block, restoring it after.

    Args:
      precision: one of PRECISIONS.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}.")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def machine_cpu_flags():
    """This machine's /proc/cpuinfo flags (an empty set where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_cpu_model():
    """This machine's CPU model name (/proc/cpuinfo), or what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_gpu_capabilities():
    """(major, minor) compute capability of each visible GPU."""
    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        caps.append(tuple(details.get("compute_capability", (0, 0))))
    return caps


def support_warning(precision, gpu_capabilities=None, cpu_flags=None):
    """Why `precision` is likely to be slow on this machine, or None when it is supported.

    float16 needs a GPU of compute capability >= 7.0 (tensor cores); bfloat16 a GPU of
    capability >= 8.0, or a CPU with AVX512_BF16 or AMX-BF16 (oneDNN kernels).

    Args:
      precision: one of PRECISIONS.
      gpu_capabilities: list of (major, minor); default: this machine's GPUs.
      cpu_flags: set of /proc/cpuinfo flags; default: this machine's.
    Returns:
      str or None.
    """
    if precision == "float32":
        return None
    caps = machine_gpu_capabilities() if gpu_capabilities is None else list(gpu_capabilities)
    flags = machine_cpu_flags() if cpu_flags is None else set(cpu_flags)
    if precision == "mixed_float16":
        if not caps:
            return (
                "--precision=mixed_float16 on a machine without a GPU: the CPU has no fast "
                "float16 kernels, so training runs correctly but usually slower than float32."
            )
        if min(caps) < (7, 0):
            return (
                f"--precision=mixed_float16: GPU compute capability {min(caps)} < 7.0 has no "
                "tensor cores; expect little or no speed-up."
            )
        return None
    if caps:
        if min(caps) < (8, 0):
            return (
                f"--precision=mixed_bfloat16: GPU compute capability {min(caps)} < 8.0 has no "
                "bfloat16 tensor cores; expect it to be slower than float32."
            )
        return None
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return (
            "--precision=mixed_bfloat16 on a CPU without AVX512_BF16 / AMX-BF16: bfloat16 is "
            "emulated, so training runs correctly but usually slower than float32."
        )
    return None


def warn_if_unsupported(precision):
    """Logs `support_warning(precision)` when there is one; returns it."""
    message = support_warning(precision)
    if message:
        log.warning(message)
    return message


# Below this input side XLA did not pay on CPU (0.90x for a 32 px step); at 112 px it did (1.59x).
XLA_CPU_MIN_IMAGE_SIZE = 64


def choose_jit_compile(
    requested=None,
    image_size=None,
    multi_crop=False,
    gpu_capabilities=None,
    cpu_flags=None,
    grouped_convs=False,
):
    """Whether the train step is XLA-compiled (--jit_compile), and why, for the log.

    Unset (None) picks XLA on GPUs (it fuses the many small ops of BatchNorm, the heads and the
    losses). On a CPU it picks XLA for inputs of at least ``XLA_CPU_MIN_IMAGE_SIZE`` px: on the
    AVX-512 / BF16 EPYC of docs/benchmarks.md, SimReg ResNet-50 -> ResNet-18 at 112 px ran
    1.59x faster with XLA (the issue measured 1.33x on an AVX2 CPU), while a 32 px
    student-only step ran 0.90x, and tiny runs would mostly pay XLA's compile time. Multi-crop
    methods (SwAV, OSS: crops of two sizes through the same networks) stay without XLA on a
    CPU: the OSS step at 2 x 112 + 6 x 48 px ran 0.16x with it there. Students with grouped
    convolutions (the RegNets) also stay without XLA on a CPU: XLA's CPU grouped convolution is
    slow, and `backbones.GroupedConv2D` falls back to a dense block-diagonal kernel under XLA,
    which made a RegNetY-600MF step at 32 px 13x slower (4.4 s vs 0.33 s, docs/regnet.md). An explicit
    ``--jit_compile`` / ``--nojit_compile`` always wins. Where this rule says XLA on a CPU,
    a long enough single-replica run times the step both ways instead
    (`kd_keras.xla_choice`): the same setup measured 0.71-0.83x with XLA in a later session.

    Args:
      requested: the flag's value, True / False / None.
      image_size: training input side in pixels (None: unknown, treated as large).
      multi_crop: whether the method takes multi-crop batches (swav, oss).
      grouped_convs: whether the student has grouped convolutions (RegNets).
      gpu_capabilities, cpu_flags: for tests; default the visible GPUs and /proc/cpuinfo.

    Returns:
      ``(jit_compile: bool, reason: str)``.
    """
    if requested is not None:
        return bool(requested), "as asked by --jit_compile" if requested else "--nojit_compile"
    gpus = machine_gpu_capabilities() if gpu_capabilities is None else gpu_capabilities
    if gpus:
        return True, "auto: GPU found"
    flags = machine_cpu_flags() if cpu_flags is None else set(cpu_flags)
    kind = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "other")
    if multi_crop:
        return False, f"auto: {kind} CPU, multi-crop method (XLA measured slower)"
    if grouped_convs:
        return False, f"auto: {kind} CPU, grouped convolutions (XLA measured slower)"
    if image_size is not None and image_size < XLA_CPU_MIN_IMAGE_SIZE:
        return False, f"auto: {kind} CPU, {image_size} px < {XLA_CPU_MIN_IMAGE_SIZE} px"
    return True, f"auto: {kind} CPU, images >= {XLA_CPU_MIN_IMAGE_SIZE} px"
