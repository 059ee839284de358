"""ViT checkpoint layouts: where DINO, DINOv2, timm and Hugging Face keep a ViT's tensors.

  dino_vit        DINO's official .pth: a bare backbone, or the `teacher` of a full training
                  checkpoint (backbone. / module.backbone. prefixes, DINOHead and the `student`
                  skipped). Positional embeddings resized as DINO does (scale factor + 0.1).
  dino_vit_student  the `student` of a full DINO checkpoint.
  dinov2          DINOv2's official hub .pth (mask_token skipped; registers in
                  `register_tokens`; SwiGLU as mlp.w12 / mlp.w3). Resized as DINO.
  timm_vit        timm state dicts and .safetensors (ViT, DeiT, vit_*_dinov2, reg4 models with
                  `reg_token` and no class-token positional embedding). Resized as timm's
                  resample_abs_pos_embed (output size, antialias). ImageNet mean/std inside;
                  timm's augreg / original-ViT weights expect [-1, 1]: --norm=minus_one_one.
  hf_dinov2       Hugging Face Dinov2Model safetensors (q/k/v fused on conversion; SwiGLU as
                  mlp.weights_in / weights_out). Resized to the size, no antialias.
  hf_dinov2_reg   Hugging Face Dinov2WithRegistersModel (embeddings.register_tokens). Resized
                  to the size with antialias.
  hf_vit          Hugging Face ViTModel (LayerNorm eps 1e-12, [-1, 1] inputs; the pooler is
                  skipped). Resized to the size, no antialias.

Key names are given without the backbone prefix; `vit_keys` maps one kd_keras weight to the
source key(s) it is built from.
"""

import dataclasses

from kd_keras.teachers import layouts


@dataclasses.dataclass(frozen=True)
class ViTLayout:
    """How one family of ViT checkpoints stores its network (see the module docstring)."""

    name: str
    description: str
    key_style: str  # "timm" (DINO, DINOv2 and timm names) or "hf" (transformers)
    resize: str  # a kd_keras.nets.pos_embed.RESIZE_METHODS entry
    containers: tuple = ("state_dict", "model", "")
    prefixes: tuple = ("",)
    norm: str = "imagenet"
    epsilon: float = 1e-6
    hf_kind: str = "dinov2"  # "dinov2" or "vit" key names (key_style "hf" only)
    skip_rules: tuple = ()
    skip_containers: tuple = ()

    def rules(self):
        return self.skip_rules


_DINO_HEAD = (r"^(module\.)?head\.", "DINO projection head (DINOHead)")
VIT_LAYOUTS = {
    layout.name: layout
    for layout in (
        ViTLayout(
            "dino_vit",
            "DINO ViT (bare backbone, or the teacher of a full checkpoint)",
            "timm",
            "dino",
            containers=("teacher", "state_dict", "model", ""),
            prefixes=("module.backbone.", "backbone.", "module.", ""),
            skip_rules=(_DINO_HEAD,),
            skip_containers=("student",),
        ),
        ViTLayout(
            "dino_vit_student",
            "the student ViT of a full DINO checkpoint",
            "timm",
            "dino",
            containers=("student",),
            prefixes=("module.backbone.", "backbone."),
            skip_rules=(_DINO_HEAD,),
            skip_containers=("teacher",),
        ),
        ViTLayout(
            "dinov2",
            "DINOv2 official hub backbone (.pth)",
            "timm",
            "dino",
            skip_rules=((r"^mask_token$", "DINOv2 iBOT mask token (training only)"),),
        ),
        ViTLayout(
            "timm_vit",
            "timm VisionTransformer state dict or .safetensors (ViT, DeiT, *_dinov2, reg4)",
            "timm",
            "size_aa",
            prefixes=("module.", ""),
            skip_rules=((r"^(module\.)?head\.(weight|bias)$", "classifier (head)"),),
        ),
        ViTLayout(
            "hf_dinov2",
            "Hugging Face Dinov2Model safetensors",
            "hf",
            "size",
            prefixes=("dinov2.", ""),
            skip_rules=(
                (r"(^|\.)embeddings\.mask_token$", "DINOv2 iBOT mask token (training only)"),
                (r"^classifier\.", "image classification head"),
            ),
        ),
        ViTLayout(
            "hf_dinov2_reg",
            "Hugging Face Dinov2WithRegistersModel safetensors",
            "hf",
            "size_aa",
            prefixes=("dinov2_with_registers.", ""),
            skip_rules=(
                (r"(^|\.)embeddings\.mask_token$", "DINOv2 iBOT mask token (training only)"),
                (r"^classifier\.", "image classification head"),
            ),
        ),
        ViTLayout(
            "hf_vit",
            "Hugging Face ViTModel safetensors (inputs normalised to [-1, 1])",
            "hf",
            "size",
            prefixes=("vit.", ""),
            norm="minus_one_one",
            epsilon=1e-12,
            hf_kind="vit",
            skip_rules=(
                (r"^(vit\.)?pooler\.dense\.(weight|bias)$", "ViTModel pooler (tanh head)"),
                (r"^classifier\.", "image classification head"),
                (r"(^|\.)embeddings\.mask_token$", "mask token (training only)"),
            ),
        ),
    )
}
VIT_LAYOUT_NAMES = tuple(VIT_LAYOUTS)

# The key that locates the backbone prefix (and tells the styles apart).
CLS_KEYS = {"timm": "cls_token", "hf": "embeddings.cls_token"}


def detect_vit_layout(source):
    """The ViT layout of a `checkpoint_io.SourceCheckpoint`, from its keys.

    timm and DINO's bare backbones share their key names: a file with a classifier
    (`head.weight`) or a .safetensors file is taken as timm's, any other as DINO's (they
    differ only in how positional embeddings are resized); --layout overrides.

    Raises:
      ValueError: no ViT layout fits, listing the first keys and the known layouts.
    """
    containers = source.containers
    if "teacher" in containers and "student" in containers:
        return "dino_vit"
    name = next((c for c in ("state_dict", "model", "") if c in containers), None)
    keys = containers.get(name, {}) if name is not None else {}
    if any(k.endswith("embeddings.cls_token") for k in keys):
        if any(k.endswith("embeddings.register_tokens") for k in keys):
            return "hf_dinov2_reg"
        return "hf_vit" if any(".layernorm_before." in k for k in keys) else "hf_dinov2"
    prefixed = [
        p for p in ("module.backbone.", "backbone.", "module.", "") if f"{p}cls_token" in keys
    ]
    if prefixed:
        bare = {k[len(prefixed[0]) :] for k in keys if k.startswith(prefixed[0])}
        if "mask_token" in bare or "register_tokens" in bare:
            return "dinov2"
        if "reg_token" in bare or "head.weight" in bare or source.format == "safetensors":
            return "timm_vit"
        if prefixed[0] in ("module.backbone.", "backbone."):
            return "dino_vit"
        if any(k.endswith(".ls1.gamma") for k in bare):
            return "timm_vit"
        return "dino_vit"
    first = list(keys)[:8]
    raise ValueError(
        f"{source.path}: no ViT checkpoint layout fits (first keys {first}); known ViT layouts "
        f"are {VIT_LAYOUT_NAMES} (give --layout=... if the keys match one after all)."
    )


def choose_vit_prefix(state, layout):
    """The backbone key prefix of `layout` present in `state` (probe: the class token)."""
    probe = CLS_KEYS[layout.key_style]
    for prefix in layout.prefixes:
        if f"{prefix}{probe}" in state:
            return prefix
    raise ValueError(
        f"layout {layout.name}: no class token {[p + probe for p in layout.prefixes]} in the "
        f"checkpoint (first keys {list(state)[:8]})."
    )


def choose_container(source, layout):
    """(container name, state dict) of `layout` in `source` (as the ResNet layouts')."""
    return layouts.choose_container(source, layout)


def skip_reason(key, layout):
    """The reason `key` is deliberately skipped under `layout`, or None."""
    return layouts.skip_reason(key, layout)


# --- kd_keras weight -> source key(s) -----------------------------------------------------------

_TIMM_BLOCK = {
    ("norm1", "gamma"): "norm1.weight",
    ("norm1", "beta"): "norm1.bias",
    ("attn", "qkv_kernel"): "attn.qkv.weight",
    ("attn", "qkv_bias"): "attn.qkv.bias",
    ("attn", "proj_kernel"): "attn.proj.weight",
    ("attn", "proj_bias"): "attn.proj.bias",
    ("ls1", "gamma"): "ls1.gamma",
    ("norm2", "gamma"): "norm2.weight",
    ("norm2", "beta"): "norm2.bias",
    ("ffn", "fc1_kernel"): "mlp.fc1.weight",
    ("ffn", "fc1_bias"): "mlp.fc1.bias",
    ("ffn", "fc2_kernel"): "mlp.fc2.weight",
    ("ffn", "fc2_bias"): "mlp.fc2.bias",
    ("ls2", "gamma"): "ls2.gamma",
}
_HF_BLOCK = {
    ("norm1", "gamma"): "norm1.weight",
    ("norm1", "beta"): "norm1.bias",
    ("attn", "proj_kernel"): "attention.output.dense.weight",
    ("attn", "proj_bias"): "attention.output.dense.bias",
    ("ls1", "gamma"): "layer_scale1.lambda1",
    ("norm2", "gamma"): "norm2.weight",
    ("norm2", "beta"): "norm2.bias",
    ("ffn", "fc1_kernel"): "mlp.fc1.weight",
    ("ffn", "fc1_bias"): "mlp.fc1.bias",
    ("ffn", "fc2_kernel"): "mlp.fc2.weight",
    ("ffn", "fc2_bias"): "mlp.fc2.bias",
    ("ls2", "gamma"): "layer_scale2.lambda1",
}
_HF_VIT_RENAMES = {
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}
_TOKENS = {
    "timm": {"cls_token": "cls_token", "pos_embed": "pos_embed", "reg_tokens": None},
    "hf": {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "reg_tokens": "embeddings.register_tokens",
    },
}
_STEM = {
    "timm": "patch_embed.proj",
    "hf": "embeddings.patch_embeddings.projection",
}
_FINAL_NORM = {"timm": "norm", "hf": "layernorm"}


def vit_keys(layer_name, weight_name, layout, swiglu=False, registers_key="register_tokens"):
    """The source keys (without prefix) of one kd_keras ViT weight, a tuple.

    One key, except for Hugging Face's separate q/k/v projections (three keys fused into
    qkv_kernel / qkv_bias). registers_key: timm's "reg_token" or DINOv2's "register_tokens".
    """
    style = layout.key_style
    if layer_name == "patch_embed":
        return (f"{_STEM[style]}.{'weight' if weight_name == 'kernel' else 'bias'}",)
    if layer_name == "tokens":
        key = _TOKENS[style][weight_name] or registers_key
        return (key,)
    if layer_name == "norm":
        return (f"{_FINAL_NORM[style]}.{'weight' if weight_name == 'gamma' else 'bias'}",)
    block, _, part = layer_name.partition("_")
    index = int(block.removeprefix("block"))
    if style == "timm":
        key = _TIMM_BLOCK[(part, weight_name)]
        if swiglu and layout.name == "dinov2":
            key = key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        return (f"blocks.{index}.{key}",)
    base = f"encoder.layer.{index}."
    if part == "attn" and weight_name.startswith("qkv"):
        suffix = "weight" if weight_name == "qkv_kernel" else "bias"
        return tuple(f"{base}attention.attention.{p}.{suffix}" for p in ("query", "key", "value"))
    key = _HF_BLOCK[(part, weight_name)]
    if swiglu:
        key = key.replace("mlp.fc1.", "mlp.weights_in.").replace("mlp.fc2.", "mlp.weights_out.")
    if layout.hf_kind == "vit":
        for old, new in _HF_VIT_RENAMES.items():
            key = key.replace(old, new)
    return (f"{base}{key}",)
