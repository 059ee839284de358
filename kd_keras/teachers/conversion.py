"""Converts a published checkpoint into a kd_keras teacher directory (`kd_keras.convert`).

    python -m kd_keras.convert --checkpoint=moco_v2_800ep_pretrain.pth.tar --arch=resnet50 \\
        --out=/teachers/moco_v2 [--layout=moco] [--norm=imagenet] [--overwrite]

The output directory holds `backbone.keras` (images [B, H, W, 3] in [0, 1] -> features
[B, m], the source's normalisation as its first layer, any H and W) and `manifest.json`: the
source file and its sha256, the layout, the architecture, every source tensor mapped (source
key -> Keras weight), every tensor or entry deliberately skipped (with the reason) and the
input normalisation. `--teacher=DIR` loads it like any teacher. For a SwAV checkpoint with its
projection head and prototypes the directory is also a clustering networks directory
(`head.keras`, `prototypes.npy`, the manifest fields of `kd_keras.methods.factory`), so
`--method=oss_offline --teacher=DIR` distils the real SwAV teacher.

Conversion is strict: every weight of the Keras network gets exactly one source tensor of the
right shape, and every source tensor is either mapped or skipped by a named layout rule, else
nothing is written and the error names the keys. Conv kernels go OIHW -> HWIO, Linear weights
are transposed, BatchNorm (weight, bias, running_mean, running_var) become (gamma, beta,
moving_mean, moving_variance) with torch's epsilon 1e-5. The directory is written under a
temporary name and renamed, so a failed conversion leaves nothing behind.
"""

import dataclasses
import datetime
import logging
import os
import time

import numpy as np

from kd_keras.nets import backbones
from kd_keras.teachers import checkpoint_io, converted_dir, layouts, strictness

log = logging.getLogger("kd_keras")

# The output directory's names and reader, re-exported (kd_keras.teachers.converted_dir).
CONVERTED_KIND = converted_dir.CONVERTED_KIND
MANIFEST = converted_dir.MANIFEST
BACKBONE_FILE = converted_dir.BACKBONE_FILE
read_manifest = converted_dir.read_manifest
is_converted_dir = converted_dir.is_converted_dir
NORMS = ("layout", *backbones.NORM_MODES)
# The default image size written to a SwAV networks manifest (SwAV's large crops).
NETWORK_IMAGE_SIZE = 224
# Sizes a SwAV checkpoint chooses itself (SwAV: 3000 prototypes, a 2048-8192-128 head); the
# bounds keep a forged file from claiming gigabytes before its shapes are checked.
MAX_PROTOTYPES = 1 << 16
MAX_HEAD_DIM = 1 << 14


class ConversionError(ValueError):
    """The checkpoint does not fit the architecture/layout; the message names the keys."""


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """One conversion: what `python -m kd_keras.convert` parses its flags into."""

    checkpoint: str
    out: str
    arch: str = "resnet50"
    layout: str | None = None  # None: detect from the keys
    norm: str | None = None  # None: the layout's
    overwrite: bool = False
    # ViTs only (kd_keras.teachers.vit_conversion): the input side the model is built for
    # (None: the checkpoint's own) and the features ("cls", "avg" or "cls_avg").
    image_size: int | None = None
    pool: str | None = None


@dataclasses.dataclass
class _Assignment:
    """One Keras weight and the source tensor it receives."""

    weight: object  # keras.Variable
    path: str  # Keras weight path, e.g. "stem_conv/kernel"
    key: str  # full source key
    transform: str  # "conv" (OIHW -> HWIO), "linear" (transpose), "none"


# --- Plans: which source key feeds which Keras weight ------------------------------------------


def _backbone_plan(model, spec, layout, prefix):
    simclr = layout.key_style == "simclr"
    names = layouts.simclr_keys(spec) if simclr else None
    regnet = isinstance(spec, backbones.RegNetSpec)
    torch_key = layouts.torchvision_regnet_key if regnet else layouts.torchvision_key
    plan = []
    for layer in model.layers:
        if not layer.weights:
            continue
        for weight in layer.weights:
            wname = weight.path.split("/")[-1]
            if simclr:
                key, transform = names[(layer.name, wname)], "none"
            else:
                key = torch_key(layer.name, wname)
                transform = "conv" if wname == "kernel" else "none"
            plan.append(_Assignment(weight, weight.path, prefix + key, transform))
    return plan


def _swav_head_plan(head, prefix):
    plan = [
        _Assignment(
            head.linear1.kernel,
            "projection_head/linear1/kernel",
            f"{prefix}projection_head.0.weight",
            "linear",
        ),
        _Assignment(
            head.linear1.bias,
            "projection_head/linear1/bias",
            f"{prefix}projection_head.0.bias",
            "none",
        ),
        _Assignment(
            head.linear2.kernel,
            "projection_head/linear2/kernel",
            f"{prefix}projection_head.3.weight",
            "linear",
        ),
        _Assignment(
            head.linear2.bias,
            "projection_head/linear2/bias",
            f"{prefix}projection_head.3.bias",
            "none",
        ),
    ]
    for wname, suffix in (
        ("gamma", "weight"),
        ("beta", "bias"),
        ("moving_mean", "running_mean"),
        ("moving_variance", "running_var"),
    ):
        plan.append(
            _Assignment(
                getattr(head.bn, wname),
                f"projection_head/bn1/{wname}",
                f"{prefix}projection_head.1.{suffix}",
                "none",
            )
        )
    return plan


def _transformed(array, transform):
    array = np.asarray(array, dtype=np.float32)
    if transform == "conv":
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    if transform == "linear":
        return array.T if array.ndim == 2 else array
    if transform == "prototypes":
        # SwAV l2-normalises each prototype (row of the [K, E] weight) before every forward
        # pass; the stored weights are those after the last update, so they are normalised
        # here as SwAV would use them. kd_keras keeps them as the columns of an [E, K] kernel.
        return (array / np.linalg.norm(array, axis=1, keepdims=True)).T
    return array


def _shape_error(item, array):
    return f"{item.key} {list(np.shape(array))} -> {item.path} expects {list(_source_shape(item))}"


def _source_shape(item):
    shape = tuple(item.weight.shape)
    if item.transform == "conv" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if item.transform in ("linear", "prototypes") and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _check_plan(plan, state, layout, arch, source_path):
    """Raises ConversionError for missing, ill-shaped and unexpected keys; returns skipped."""
    missing = [item.key for item in plan if item.key not in state]
    bad_shape = [
        _shape_error(item, state[item.key])
        for item in plan
        if item.key in state and tuple(np.shape(state[item.key])) != _source_shape(item)
    ]
    problems, skipped = strictness.problems_of(
        state, [item.key for item in plan], missing, bad_shape,
        lambda key: layouts.skip_reason(key, layout),
    )
    if problems:
        raise ConversionError(
            f"--checkpoint={source_path} does not fit --arch={arch} with layout "
            f"{layout.name}: " + "; ".join(problems) + "."
        )
    return skipped


def _assign(plan, state):
    for item in plan:
        item.weight.assign(_transformed(state[item.key], item.transform))


# --- The conversion ------------------------------------------------------------------------------


def convert(cfg):
    """Converts `cfg.checkpoint` into the directory `cfg.out`; returns the manifest dict.

    Raises:
      FileNotFoundError: naming --checkpoint.
      ValueError: (ConversionError, torch_pickle.UnsafeCheckpointError, ...) naming the flag,
        file or keys at fault.
    """
    from kd_keras.nets import vit

    if vit.is_vit_arch(cfg.arch):
        from kd_keras.teachers import vit_conversion

        return vit_conversion.convert_vit(cfg)
    if cfg.image_size is not None or cfg.pool is not None:
        given = "--image_size" if cfg.image_size is not None else "--pool"
        raise ValueError(f"{given} is a ViT option; --arch={cfg.arch} is not a ViT.")
    started = time.perf_counter()
    out = os.path.abspath(os.path.expanduser(cfg.out))
    converted_dir.check_out(out, cfg.overwrite)
    spec = _parse_arch(cfg.arch)
    if cfg.layout is not None and cfg.layout not in layouts.LAYOUTS:
        raise ValueError(f"--layout={cfg.layout}: unknown; choose one of {layouts.LAYOUT_NAMES}.")
    if cfg.norm is not None and cfg.norm not in NORMS:
        raise ValueError(f"--norm={cfg.norm}: choose one of {NORMS}.")
    try:
        source = checkpoint_io.read_checkpoint(cfg.checkpoint)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--checkpoint: {err}") from err
    layout = layouts.LAYOUTS[cfg.layout or layouts.detect_layout(source)]
    if (layout.key_style == "simclr") != (source.format == "tf"):
        raise ValueError(
            f"--layout={layout.name} does not apply to a {source.format} checkpoint "
            f"({source.path})."
        )
    family = _family(spec)
    if family == "regnet" and layout.key_style == "simclr":
        raise ValueError(f"--arch={cfg.arch}: SimCLR checkpoints hold ResNets, not RegNets.")
    container, state = layouts.choose_container(source, layout)
    prefix = layouts.choose_prefix(state, layout, family)
    norm = layout.norm if cfg.norm in (None, "layout") else cfg.norm

    model = backbones.build_arch(
        spec, norm=norm, max_pool=layout.max_pool, any_input_size=True, name=_model_name(cfg)
    )
    plan = _backbone_plan(model, spec, layout, prefix)
    head = prototypes = None
    if layout.swav_heads and f"{prefix}prototypes.weight" in state:
        head, head_plan, prototypes = _swav_heads(state, prefix, spec.feature_dim)
        plan += head_plan
    skipped = _check_plan(plan, state, layout, cfg.arch, source.path)
    _assign(plan, state)

    manifest = _manifest(cfg, source, layout, container, spec, norm, plan, skipped)
    if head is not None:
        manifest.update(_network_fields(cfg, head, prototypes, state, prefix))
    _write(out, model, head, prototypes, manifest, cfg.overwrite)
    log.info(
        "converted %s (%s, layout %s): %d tensors mapped, %d skipped, in %.1f s -> %s",
        source.path,
        source.format,
        layout.name,
        len(plan),
        len(skipped),
        time.perf_counter() - started,
        out,
    )
    return manifest


def _parse_arch(arch):
    try:
        return backbones.parse_arch(arch)
    except ValueError as err:
        raise ValueError(f"--arch: {err}") from err


def _family(spec):
    return "regnet" if isinstance(spec, backbones.RegNetSpec) else "resnet"


def _model_name(cfg):
    return f"converted_{cfg.arch}"


def _swav_heads(state, prefix, feature_dim):
    """SwAV's projection head (Linear-BN-ReLU-Linear) and prototypes as kd_keras layers."""
    from kd_keras.nets import clustering, heads

    weight = state.get(f"{prefix}projection_head.0.weight")
    out_weight = state.get(f"{prefix}projection_head.3.weight")
    # Shapes only: nothing is read before `_check_plan` has checked every shape.
    protos_shape = tuple(np.shape(state[f"{prefix}prototypes.weight"]))
    if weight is None or out_weight is None or np.ndim(weight) != 2 or np.ndim(out_weight) != 2:
        raise ConversionError(
            f"SwAV checkpoint: prototypes without the MLP projection head "
            f"({prefix}projection_head.0.weight / .3.weight); a linear head is not supported."
        )
    hidden, proj_dim = int(np.shape(weight)[0]), int(np.shape(out_weight)[0])
    if len(protos_shape) != 2 or protos_shape[1] != proj_dim:
        raise ConversionError(
            f"{prefix}prototypes.weight has shape {list(protos_shape)}, expected "
            f"[K, {proj_dim}] after a {proj_dim}-d projection head."
        )
    # The other sizes are fixed by --arch (checked in `_check_plan`); these three come from the
    # file alone, so a forged one could claim gigabytes.
    for what, size, limit in (
        ("prototypes.weight rows (K)", protos_shape[0], MAX_PROTOTYPES),
        ("projection_head hidden size", hidden, MAX_HEAD_DIM),
        ("projection_head output size", proj_dim, MAX_HEAD_DIM),
    ):
        if not 0 < size <= limit:
            raise ConversionError(f"SwAV checkpoint: {prefix}{what} is {size}, expected 1..{limit}.")
    # The head of a --method=swav export: no dropout (OSS runs the teacher's head without).
    head = heads.ProjectionHead(hidden, proj_dim, (0.0, 0.0), name="projection_head")
    head.build((None, feature_dim))
    prototypes = clustering.Prototypes(protos_shape[0], proj_dim, name="prototypes")
    prototypes.build()
    head_plan = _swav_head_plan(head, prefix)
    head_plan.append(
        _Assignment(
            prototypes.kernel, "prototypes/prototypes", f"{prefix}prototypes.weight", "prototypes"
        )
    )
    return head, head_plan, prototypes


def _manifest(cfg, source, layout, container, spec, norm, plan, skipped):
    skipped_entries = {
        name: f"not a tensor container: {desc}" for name, desc in source.other.items()
    }
    for name, tensors in source.containers.items():
        if name != container:
            why = (
                f"the other network of the checkpoint ({len(tensors)} tensors)"
                if name in layout.skip_containers
                else f"another state dict of the file, not layout {layout.name}'s network "
                f"({len(tensors)} tensors)"
            )
            skipped_entries[name] = why
    return {
        "kind": CONVERTED_KIND,
        "format_version": 1,
        "source": {
            "path": source.path,
            "sha256": source.sha256,
            "format": source.format,
            "container": container,
        },
        "layout": layout.name,
        "layout_description": layout.description,
        "arch": cfg.arch,
        _family(spec): {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()
        },
        "feature_dim": spec.feature_dim,
        "normalization": {
            "mode": norm,
            "mean": list(backbones.IMAGENET_MEAN) if norm == "imagenet" else None,
            "std": list(backbones.IMAGENET_STD) if norm == "imagenet" else None,
            "input": "float32 RGB images in [0, 1]; normalised by the model's first layer",
        },
        # RegNets have no max-pool.
        "max_pool": layout.max_pool if _family(spec) == "resnet" else None,
        "bn_epsilon": backbones.BN_EPSILON,
        "mapping": {item.key: item.path for item in plan},
        "skipped": skipped,
        "skipped_entries": skipped_entries,
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _network_fields(cfg, head, prototypes, state, prefix):
    from kd_keras.artifacts import layout as run_layout

    raw = np.asarray(state[f"{prefix}prototypes.weight"], np.float32)
    norms = np.linalg.norm(raw, axis=1)
    return {
        "kind": run_layout.NETWORK_KIND,
        "method": "swav",
        "role": "network",
        "backbone": cfg.arch,
        "proj_dim": head.output_dim,
        "proj_hidden_dim": head.hidden_dim,
        "num_prototypes": prototypes.num_prototypes,
        "image_size": NETWORK_IMAGE_SIZE,
        "prototypes_normalised": {
            "note": "each prototype l2-normalised, as SwAV does before every forward pass",
            "max_abs_norm_deviation_before": float(np.max(np.abs(norms - 1.0))),
        },
    }


def _write(out, model, head, prototypes, manifest, overwrite):
    def save_files(directory):
        import keras

        model.save(os.path.join(directory, BACKBONE_FILE))
        if head is not None:
            inputs = keras.Input((model.output_shape[-1],))
            head_model = keras.Model(inputs, head(inputs), name="network_head")
            head_model.save(os.path.join(directory, "head.keras"))
            np.save(os.path.join(directory, "prototypes.npy"), prototypes.kernel.numpy())

    converted_dir.write(out, save_files, manifest, overwrite)


# --- Command line ---------------------------------------------------------------------------------
