"""Checkpoint layouts: where a published self-supervised checkpoint keeps its ResNet, its heads
and what else it holds, and the names its tensors have.

A `Layout` says which container of the checkpoint holds the network (`containers`), the key
prefix of the backbone (`prefixes`, the first one under which `<prefix>conv1.weight` exists),
the key style of the backbone ("torchvision" names or SimCLR's TF1 "simclr" names), the input
normalisation and max-pool padding of the network that produced it, and the rules by which
other tensors are deliberately skipped (each with the reason written to the manifest). A tensor
that is neither mapped nor matched by a rule is an error: nothing is dropped silently.

  torchvision  torchvision / timm ResNets, converted BYOL      conv1.weight, layer1.0..., fc
               torchvision RegNets                             stem.0.weight, trunk_output..., fc
  byol         converted BYOL (torchvision names)              as torchvision
  moco         MoCo v1/v2 (module.encoder_q.)                  encoder_k, queue, MLP fc skipped
  moco_v3      MoCo v3 ResNet-50 (module.base_encoder.)        momentum_encoder, predictor, fc
  swav         SwAV (module.), + projection_head.* and prototypes.weight (converted too)
  dino         DINO ResNet-50: bare (torchvision names) or the `teacher` of a full checkpoint
               (module.backbone.; DINOHead and the `student` skipped)
  dino_student the `student` of a full DINO checkpoint
  simclr       SimCLR v1/v2 TF1 checkpoints (base_model/conv2d*/kernel, ...; ema_model/,
               /Momentum, heads skipped)
"""

import dataclasses
import re

COMMON_RULES = (
    (r"(^|[./])num_batches_tracked$", "BatchNorm update counter (not used at inference)"),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one family of checkpoints stores its network (see the module docstring)."""

    name: str
    description: str
    containers: tuple = ("state_dict", "model", "")
    prefixes: tuple = ("module.", "")
    key_style: str = "torchvision"
    norm: str = "imagenet"
    max_pool: str = "torch"
    skip_rules: tuple = ()
    skip_containers: tuple = ()
    swav_heads: bool = False

    def rules(self):
        return COMMON_RULES + self.skip_rules


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            "torchvision",
            "torchvision/timm ResNet (conv1, bn1, layer1..4, fc) or torchvision RegNet "
            "(stem, trunk_output, fc)",
            skip_rules=((r"^(module\.)?fc\.(weight|bias)$", "ImageNet classifier (fc)"),),
        ),
        Layout(
            "byol",
            "BYOL converted to torchvision names",
            skip_rules=((r"^(module\.)?fc\.(weight|bias)$", "classifier (fc)"),),
        ),
        Layout(
            "moco",
            "MoCo v1/v2 (module.encoder_q.)",
            prefixes=("module.encoder_q.", "encoder_q."),
            skip_rules=(
                (r"^(module\.)?encoder_k\.", "MoCo key (momentum) encoder"),
                (r"^(module\.)?queue(_ptr)?$", "MoCo queue of negative keys"),
                (r"^(module\.)?encoder_q\.fc\.", "MoCo projection head (v1 linear, v2 MLP)"),
            ),
        ),
        Layout(
            "moco_v3",
            "MoCo v3 ResNet (module.base_encoder.)",
            prefixes=("module.base_encoder.", "base_encoder."),
            skip_rules=(
                (r"^(module\.)?momentum_encoder\.", "MoCo v3 momentum encoder"),
                (r"^(module\.)?predictor\.", "MoCo v3 predictor"),
                (r"^(module\.)?base_encoder\.fc\.", "MoCo v3 projector (fc MLP)"),
            ),
        ),
        Layout(
            "swav",
            "SwAV (module., projection_head, prototypes)",
            swav_heads=True,
        ),
        Layout(
            "dino",
            "DINO ResNet (bare, or the teacher of a full checkpoint)",
            containers=("teacher", "state_dict", "model", ""),
            prefixes=("module.backbone.", "backbone.", "module.", ""),
            skip_rules=(
                (r"^(module\.)?head\.", "DINO projection head (DINOHead)"),
                (r"^(module\.)?fc\.(weight|bias)$", "classifier (fc)"),
            ),
            skip_containers=("student",),
        ),
        Layout(
            "dino_student",
            "the student of a full DINO checkpoint",
            containers=("student",),
            prefixes=("module.backbone.", "backbone."),
            skip_rules=((r"^(module\.)?head\.", "DINO projection head (DINOHead)"),),
            skip_containers=("teacher",),
        ),
        Layout(
            "simclr",
            "SimCLR v1/v2 TF1 checkpoint (base_model/...)",
            containers=("",),
            prefixes=("base_model/",),
            key_style="simclr",
            norm="unit",
            max_pool="tf_same",
            skip_rules=(
                (r"/Momentum$", "optimizer slot (momentum / LARS)"),
                (r"^ema_model/", "exponential moving average copy"),
                (r"^head_contrastive/", "SimCLR projection head"),
                (r"^head_supervised/", "SimCLR supervised (linear) head"),
                (r"^global_step$", "training step counter"),
                (r"^_CHECKPOINTABLE_OBJECT_GRAPH$", "TF object graph metadata"),
            ),
        ),
    )
}
LAYOUT_NAMES = tuple(LAYOUTS)


def _has(keys, *names):
    return any(name in keys for name in names)


def _any_prefix(keys, prefixes):
    return any(k.startswith(prefixes) for k in keys)


def detect_layout(source):
    """The name of the layout of a `checkpoint_io.SourceCheckpoint`, from its keys.

    Raises:
      ValueError: no known layout fits, listing the first keys seen and the known layouts.
    """
    containers = source.containers
    if source.format == "tf":
        keys = containers[""]
        if "base_model/conv2d/kernel" in keys:
            return "simclr"
        raise _unknown(source, keys)
    if "teacher" in containers and "student" in containers:
        return "dino"
    name = next((c for c in ("state_dict", "model", "") if c in containers), None)
    if name is None:
        raise _unknown(source, [f"{c}/..." for c in containers])
    keys = containers[name]
    if _any_prefix(keys, ("module.encoder_q.", "encoder_q.")):
        return "moco"
    if _any_prefix(keys, ("module.base_encoder.", "base_encoder.")):
        return "moco_v3"
    if _has(keys, "module.prototypes.weight", "prototypes.weight") or _any_prefix(
        keys, ("module.projection_head.", "projection_head.")
    ):
        return "swav"
    if _has(keys, "conv1.weight", "module.conv1.weight") and _has(
        keys, "layer1.0.conv1.weight", "module.layer1.0.conv1.weight"
    ):
        return "torchvision"
    if _has(keys, "stem.0.weight", "module.stem.0.weight") and _any_prefix(
        keys, ("trunk_output.", "module.trunk_output.")
    ):
        return "torchvision"
    raise _unknown(source, keys)


def _unknown(source, keys):
    first = list(keys)[:8]
    return ValueError(
        f"{source.path}: unknown checkpoint layout (first keys {first}); known layouts are "
        f"{LAYOUT_NAMES} (give --layout=... if the keys match one after all)."
    )


def choose_container(source, layout):
    """(container name, state dict) of `layout` in `source`; ValueError naming what exists."""
    for name in layout.containers:
        if name in source.containers:
            return name, source.containers[name]
    raise ValueError(
        f"{source.path}: layout {layout.name} expects one of the containers "
        f"{[c or '<top level>' for c in layout.containers]}, the file has "
        f"{[c or '<top level>' for c in source.containers]}."
    )


# The stem conv's key in each architecture family: it locates the backbone's key prefix.
STEM_KEYS = {"resnet": "conv1.weight", "regnet": "stem.0.weight"}


def choose_prefix(state, layout, family="resnet"):
    """The backbone key prefix of `layout` present in `state` (first key probe: the stem).

    family: "resnet" or "regnet" (torchvision's RegNets name their stem `stem.0`).
    """
    probe = "conv2d/kernel" if layout.key_style == "simclr" else STEM_KEYS[family]
    for prefix in layout.prefixes:
        if f"{prefix}{probe}" in state:
            return prefix
    raise ValueError(
        f"layout {layout.name}: no backbone stem {[p + probe for p in layout.prefixes]} in the "
        f"checkpoint (first keys {list(state)[:8]})."
    )


def skip_reason(key, layout):
    """The reason `key` is deliberately skipped under `layout`, or None."""
    for pattern, reason in layout.rules():
        if re.search(pattern, key):
            return reason
    return None


# --- Keras weight <-> source key names ----------------------------------------------------

_BN_TORCH = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
_BLOCK_LAYER = re.compile(r"stage(\d)_block(\d+)_(conv\d|bn\d|proj_conv|proj_bn)$")
_BLOCK_PART = {"proj_conv": "downsample.0", "proj_bn": "downsample.1"}


def torchvision_module(layer_name):
    """torchvision module path of a kd_keras ResNet conv/BN layer, e.g.
    "stage2_block0_proj_bn" -> "layer2.0.downsample.1", "stem_conv" -> "conv1"."""
    if layer_name == "stem_conv":
        return "conv1"
    if layer_name == "stem_bn":
        return "bn1"
    match = _BLOCK_LAYER.match(layer_name)
    if not match:
        raise ValueError(f"layer {layer_name!r} has no torchvision counterpart")
    stage, block, part = match.groups()
    return f"layer{stage}.{block}.{_BLOCK_PART.get(part, part)}"


def torchvision_key(layer_name, weight_name):
    """Source key (without prefix) of one Keras weight, e.g. ("stem_bn", "moving_var...")."""
    module = torchvision_module(layer_name)
    suffix = "weight" if weight_name == "kernel" else _BN_TORCH[weight_name]
    return f"{module}.{suffix}"


_REGNET_BLOCK_LAYER = re.compile(r"stage(\d+)_block(\d+)_(a|b|c|proj)_(conv|bn)$")
_REGNET_SE_LAYER = re.compile(r"stage(\d+)_block(\d+)_se_(fc1|fc2)$")


def torchvision_regnet_module(layer_name):
    """torchvision module path of a kd_keras RegNet layer with weights, e.g.
    "stage2_block0_b_conv" -> "trunk_output.block2.block2-0.f.b.0",
    "stage1_block0_proj_bn" -> "trunk_output.block1.block1-0.proj.1",
    "stage3_block1_se_fc1" -> "trunk_output.block3.block3-1.f.se.fc1", "stem_bn" -> "stem.1".

    torchvision's Conv2dNormActivation holds the conv at index 0 and the BN at 1; its blocks
    are named block<stage>-<index from 0>.
    """
    if layer_name in ("stem_conv", "stem_bn"):
        return "stem.0" if layer_name == "stem_conv" else "stem.1"
    match = _REGNET_BLOCK_LAYER.match(layer_name)
    if match:
        stage, block, part, kind = match.groups()
        where = "proj" if part == "proj" else f"f.{part}"
        index = 0 if kind == "conv" else 1
        return f"trunk_output.block{stage}.block{stage}-{block}.{where}.{index}"
    match = _REGNET_SE_LAYER.match(layer_name)
    if match:
        stage, block, fc = match.groups()
        return f"trunk_output.block{stage}.block{stage}-{block}.f.se.{fc}"
    raise ValueError(f"layer {layer_name!r} has no torchvision RegNet counterpart")


def torchvision_regnet_key(layer_name, weight_name):
    """Source key (without prefix) of one Keras RegNet weight (conv kernel/bias or BN)."""
    module = torchvision_regnet_module(layer_name)
    if weight_name in ("kernel", "bias"):
        suffix = "weight" if weight_name == "kernel" else "bias"
    else:
        suffix = _BN_TORCH[weight_name]
    return f"{module}.{suffix}"


def simclr_layer_order(spec):
    """kd_keras conv layer names in the order SimCLR's TF1 resnet.py creates them.

    tf.layers names variables by creation order (conv2d, conv2d_1, ...; batch_normalization,
    batch_normalization_1, ...), one BN per conv, and a block creates its projection shortcut
    before its residual branch.
    """
    if spec.block != "bottleneck":
        raise ValueError(
            "SimCLR's basic-block ResNets (18/34) give every stage's first block a projection "
            "shortcut that torchvision's layout lacks; only bottleneck ResNets are supported."
        )
    names = ["stem"]
    for s, num_blocks in enumerate(spec.blocks, start=1):
        for b in range(num_blocks):
            block = f"stage{s}_block{b}"
            if b == 0:
                names.append(f"{block}_proj")
            names += [f"{block}_1", f"{block}_2", f"{block}_3"]
    return names


def simclr_keys(spec):
    """{(keras layer, keras weight): source key without prefix} for SimCLR's TF1 names."""
    mapping = {}
    for i, unit in enumerate(simclr_layer_order(spec)):
        suffix = "" if i == 0 else f"_{i}"
        if unit == "stem":
            conv, bn = "stem_conv", "stem_bn"
        elif unit.endswith("_proj"):
            conv, bn = f"{unit}_conv", f"{unit}_bn"
        else:
            block, k = unit.rsplit("_", 1)
            conv, bn = f"{block}_conv{k}", f"{block}_bn{k}"
        mapping[(conv, "kernel")] = f"conv2d{suffix}/kernel"
        for weight in ("gamma", "beta", "moving_mean", "moving_variance"):
            mapping[(bn, weight)] = f"batch_normalization{suffix}/{weight}"
    return mapping
