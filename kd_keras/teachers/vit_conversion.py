"""Converts a DINO / DINOv2 / timm / Hugging Face ViT checkpoint into a kd_keras teacher directory.

Called by `kd_keras.teachers.conversion.convert` when --arch names a ViT (kd_keras.nets.vit).
Same contract as the ResNets: every Keras weight receives exactly one source tensor (or, for
Hugging Face's separate q/k/v, exactly three, concatenated into the fused qkv projection), every
source tensor is mapped or skipped by a named rule of the layout (kd_keras.teachers.vit_layouts),
a missing, unexpected or ill-shaped tensor is an error naming it, nothing is written then.

The model is built for one input size (`image_size`, default the checkpoint's own: the
positional-embedding grid x patch); for any other size the positional embeddings are resized
once, here, the way the checkpoint's own code resizes them (kd_keras.nets.pos_embed), and the
manifest records the source grid, the new grid and the method.
"""

import dataclasses
import datetime
import logging
import os
import time

import numpy as np

from kd_keras.nets import backbones, pos_embed, vit
from kd_keras.teachers import checkpoint_io, converted_dir, strictness, vit_layouts

log = logging.getLogger("kd_keras")

MANIFEST = converted_dir.MANIFEST
BACKBONE_FILE = converted_dir.BACKBONE_FILE


class ViTConversionError(ValueError):
    """The checkpoint does not fit the ViT architecture/layout; the message names the keys."""


@dataclasses.dataclass
class _Item:
    """One Keras weight and the source tensor(s) it is made of."""

    weight: object  # keras.Variable
    path: str  # "block0_attn/qkv_kernel"
    keys: tuple  # full source keys
    transform: str  # "conv", "linear", "qkv_kernel", "concat", "pos", "none"


def convert_vit(cfg):
    """Converts the ViT checkpoint of `cfg` (a conversion.ConvertConfig); returns the manifest.

    Raises:
      FileNotFoundError: naming --checkpoint.
      ValueError: naming the flag, file or keys at fault.
    """
    started = time.perf_counter()
    out, spec, pool = _check_flags(cfg)
    try:
        source = checkpoint_io.read_checkpoint(cfg.checkpoint)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--checkpoint: {err}") from err
    layout = vit_layouts.VIT_LAYOUTS[cfg.layout or vit_layouts.detect_vit_layout(source)]
    container, state = vit_layouts.choose_container(source, layout)
    prefix = vit_layouts.choose_vit_prefix(state, layout)
    spec = dataclasses.replace(spec, epsilon=layout.epsilon)
    grid = _source_grid(state, prefix, layout, spec, cfg)
    image_size = int(getattr(cfg, "image_size", None) or grid["side"] * spec.patch)
    try:
        vit.check_image_size(image_size, spec.patch)
    except ValueError as err:
        raise ValueError(f"--image_size: {err}") from err
    norm = cfg.norm or layout.norm
    model = vit.build_vit(
        spec, image_size, norm, pool, class_pos=grid["class_pos"], name=f"converted_{cfg.arch}"
    )
    plan = _plan(model, spec, layout, prefix, _registers_key(state, prefix))
    skipped = _check(plan, state, layout, cfg.arch, source.path)
    target = image_size // spec.patch
    for item in plan:
        item.weight.assign(_value(item, state, layout, target, grid["class_pos"]))
    manifest = _manifest(cfg, source, layout, container, spec, norm, pool, plan, skipped)
    manifest["pos_embed"] = {
        "source_grid": grid["side"],
        "grid": target,
        "class_token_row": grid["class_pos"],
        "method": layout.resize,
        "resized": target != grid["side"],
    }
    manifest["image_size"] = image_size
    _write(out, model, manifest, cfg.overwrite)
    log.info(
        "converted %s (ViT, layout %s): %d weights, %d skipped, %.1f s -> %s",
        source.path,
        layout.name,
        len(plan),
        len(skipped),
        time.perf_counter() - started,
        out,
    )
    return manifest


def _check_flags(cfg):
    """(absolute --out, ViTSpec, pool) after checking the flags that need no file."""
    out = os.path.abspath(os.path.expanduser(cfg.out))
    converted_dir.check_out(out, cfg.overwrite)
    try:
        spec = vit.parse_vit_arch(cfg.arch)
    except ValueError as err:
        raise ValueError(f"--arch: {err}") from err
    if cfg.layout is not None and cfg.layout not in vit_layouts.VIT_LAYOUTS:
        raise ValueError(
            f"--layout={cfg.layout}: not a ViT layout; choose one of {vit_layouts.VIT_LAYOUT_NAMES}."
        )
    pool = getattr(cfg, "pool", None) or "cls"
    if pool not in vit.POOLS:
        raise ValueError(f"--pool={pool}: choose one of {vit.POOLS}.")
    if cfg.norm is not None and cfg.norm not in backbones.NORM_MODES:
        raise ValueError(f"--norm={cfg.norm}: choose one of {backbones.NORM_MODES}.")
    return out, spec, pool


def _registers_key(state, prefix):
    return "reg_token" if f"{prefix}reg_token" in state else "register_tokens"


def _source_grid(state, prefix, layout, spec, cfg):
    """{"side": M, "class_pos": bool} of the checkpoint's positional embeddings."""
    key = prefix + vit_layouts.vit_keys("tokens", "pos_embed", layout)[0]
    if key not in state:
        raise ViTConversionError(f"--checkpoint={cfg.checkpoint}: missing key {key}.")
    shape = tuple(np.shape(state[key]))
    if len(shape) != 3 or shape[0] != 1 or shape[2] != spec.width:
        raise ViTConversionError(
            f"{key} {list(shape)} does not fit --arch={cfg.arch}: expects [1, positions, "
            f"{spec.width}]."
        )
    for class_pos in (True, False):
        try:
            return {"side": vit.grid_side(shape[1] - int(class_pos)), "class_pos": class_pos}
        except ValueError:
            continue
    raise ViTConversionError(f"{key} has {shape[1]} positions: neither g*g nor g*g + 1.")


def _plan(model, spec, layout, prefix, registers_key):
    swiglu = spec.ffn == "swiglu"
    plan = []
    for layer in model.layers:
        for weight in layer.weights:
            wname = weight.path.split("/")[-1]
            keys = vit_layouts.vit_keys(layer.name, wname, layout, swiglu, registers_key)
            plan.append(
                _Item(weight, weight.path, tuple(prefix + k for k in keys), _kind(wname, keys))
            )
    return plan


def _kind(wname, keys):
    if wname == "pos_embed":
        return "pos"
    if len(keys) == 3:
        return "qkv_kernel" if wname == "qkv_kernel" else "concat"
    if wname == "kernel":
        return "conv"
    if wname.endswith("_kernel"):
        return "linear"
    return "none"


def _expected_source_shape(item):
    """The shape each source tensor of `item` must have (pos_embed: checked in _source_grid)."""
    shape = tuple(item.weight.shape)
    if item.transform == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if item.transform == "linear":
        return (shape[1], shape[0])
    if item.transform == "qkv_kernel":
        return (shape[1] // 3, shape[0])
    if item.transform == "concat":
        return (shape[0] // 3,)
    return shape


def _check(plan, state, layout, arch, source_path):
    """Raises ViTConversionError for missing, ill-shaped or unexpected tensors; returns the
    skipped ones {key: reason}."""
    missing = [k for item in plan for k in item.keys if k not in state]
    bad = [
        f"{k} {list(np.shape(state[k]))} -> {item.path} expects {list(_expected_source_shape(item))}"
        for item in plan
        if item.transform != "pos"
        for k in item.keys
        if k in state and tuple(np.shape(state[k])) != _expected_source_shape(item)
    ]
    problems, skipped = strictness.problems_of(
        state, [k for item in plan for k in item.keys], missing, bad,
        lambda key: vit_layouts.skip_reason(key, layout),
    )
    if problems:
        raise ViTConversionError(
            f"--checkpoint={source_path} does not fit --arch={arch} with layout {layout.name}: "
            + "; ".join(problems)
            + "."
        )
    return skipped


def _value(item, state, layout, grid, class_pos):
    arrays = [np.asarray(state[k], np.float32) for k in item.keys]
    if item.transform == "pos":
        return pos_embed.resize_pos_embed(arrays[0], grid, layout.resize, class_pos)
    if item.transform == "conv":
        return arrays[0].transpose(2, 3, 1, 0)
    if item.transform == "linear":
        return arrays[0].T
    if item.transform == "qkv_kernel":
        return np.concatenate(arrays, axis=0).T
    if item.transform == "concat":
        return np.concatenate(arrays, axis=0)
    return arrays[0]


def _manifest(cfg, source, layout, container, spec, norm, pool, plan, skipped):
    skipped_entries = {name: f"not a tensor container: {d}" for name, d in source.other.items()}
    for name, tensors in source.containers.items():
        if name != container:
            why = (
                "the other network of the checkpoint"
                if name in layout.skip_containers
                else (f"another state dict of the file, not layout {layout.name}'s network")
            )
            skipped_entries[name] = f"{why} ({len(tensors)} tensors)"
    mean_std = norm == "imagenet"
    return {
        "kind": converted_dir.CONVERTED_KIND,
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
        "vit": dataclasses.asdict(spec),
        "pool": pool,
        "feature_dim": spec.feature_dim(pool),
        "normalization": {
            "mode": norm,
            "mean": list(backbones.IMAGENET_MEAN) if mean_std else None,
            "std": list(backbones.IMAGENET_STD) if mean_std else None,
            "input": "float32 RGB images in [0, 1]; normalised by the model's first layer",
        },
        "layer_norm_epsilon": spec.epsilon,
        "mapping": {"+".join(item.keys): item.path for item in plan},
        "skipped": skipped,
        "skipped_entries": skipped_entries,
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _write(out, model, manifest, overwrite):
    converted_dir.write(
        out, lambda directory: model.save(os.path.join(directory, BACKBONE_FILE)), manifest,
        overwrite,
    )
