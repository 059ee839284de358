"""The ViT fixtures of tests/test_vit_convert.py, written with real torch, timm and transformers.

  PYTHONPATH=$PWD /work/venv-bench/bin/python scripts/make_torch_fixtures.py --vit \\
      [--vit-out tests/data/vit]

Narrow ViTs (width 32, depth 2, 2 heads, patch 8 or 14) with every parameter randomised, saved
in the layouts kd_keras converts: DINO's bare backbone and full checkpoint, DINOv2's hub
backbone (registers, LayerScale, SwiGLU w12/w3), timm's .safetensors (a classifier head; the
reg4 model with the class token's positional embedding folded in, as timm converts DINOv2),
and Hugging Face Dinov2Model / Dinov2WithRegistersModel / ViTModel .safetensors written by
save_pretrained. `vit_features.npz` holds fixed images at each fixture's native and a resized
side and the source framework's features: the class token and the patch-token mean after the
final norm. The forwards are timm's (DINO and DINOv2 backbones are timm's VisionTransformer
with their keys; DINO's and DINOv2's positional-embedding resize is done with their own
F.interpolate call, below) and transformers' own (HF fixtures, their own interpolation).
`bicubic.npz` holds torch's F.interpolate(bicubic) on small grids for kd_keras.nets.pos_embed.
"""

import json
import math
import os

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked, resample_abs_pos_embed
from torch import nn

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
WIDTH, DEPTH, HEADS, HIDDEN = 32, 2, 2, 64


def randomise(model, seed):
    """Every parameter random (LayerNorm/LayerScale weights around 1), so a swap shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(
                ("norm1.weight", "norm2.weight", "norm.weight", "layernorm.weight")
            ) or ("layernorm_" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("gamma", "lambda1")):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def timm_vit(img, patch, reg=0, ls=False, swiglu=False, no_embed_class=False, seed=0):
    kwargs = dict(
        img_size=img,
        patch_size=patch,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=10,
        mlp_ratio=HIDDEN / WIDTH,
        reg_tokens=reg,
        no_embed_class=no_embed_class,
        init_values=1.0 if ls else None,
    )
    if swiglu:
        kwargs.update(mlp_ratio=96 / WIDTH, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return randomise(timm.models.vision_transformer.VisionTransformer(**kwargs), seed)


def timm_tokens(model, images_nhwc, mean=MEAN, std=STD):
    x = (torch.from_numpy(images_nhwc).permute(0, 3, 1, 2) - mean) / std
    with torch.no_grad():
        return model.forward_features(x)


def pooled(tokens, skip):
    return {"cls": tokens[:, 0].numpy(), "avg": tokens[:, skip:].mean(1).numpy()}


def dino_resize(pos, grid, class_pos=True):
    """DINO's / DINOv2's interpolate_pos_encoding (scale factor with +0.1, no antialias)."""
    head, patches = pos[:, : int(class_pos)], pos[:, int(class_pos) :]
    m = int(math.sqrt(patches.shape[1]))
    w0 = grid + 0.1
    patches = F.interpolate(
        patches.reshape(1, m, m, -1).permute(0, 3, 1, 2),
        scale_factor=(w0 / m, w0 / m),
        mode="bicubic",
    )
    assert patches.shape[-1] == grid
    return torch.cat([head, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def at_size(model, state, img, patch, pos, **kwargs):
    """A timm twin of `model` built for img px with positional embeddings `pos`."""
    twin = timm_vit(img, patch, **kwargs)
    state = dict(state, pos_embed=pos)
    twin.load_state_dict(state)
    return twin.eval()


def dinov2_official(timm_state, swiglu):
    """timm keys -> DINOv2 hub keys (inverse of timm's _convert_dinov2) + a mask token."""
    out = {}
    for k, v in timm_state.items():
        if k.startswith("head."):
            continue
        if swiglu:
            k = k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        out[k] = v.detach().clone()  # not a view of the live model's parameters
    out["mask_token"] = torch.zeros(1, WIDTH)
    return out


def fold_registers(official):
    """DINOv2 hub (reg) -> timm reg4 keys, as timm's _convert_dinov2 does it."""
    out = {k: v for k, v in official.items() if k not in ("mask_token", "register_tokens")}
    out["reg_token"] = official["register_tokens"]
    out["cls_token"] = official["cls_token"] + official["pos_embed"][:, :1]
    out["pos_embed"] = official["pos_embed"][:, 1:]
    return out


def main(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(1)
    # 8-bit images (stored as uint8, the tests divide by 255) keep the fixture small.
    pixels = {s: rng.integers(0, 256, (2, s, s, 3), dtype=np.uint8) for s in (32, 42, 48, 56)}
    images = {s: (v / 255.0).astype(np.float32) for s, v in pixels.items()}
    arrays = {f"images_{s}": v for s, v in pixels.items()}
    index = {}

    def record(name, file, arch, layout, sides, feats, **extra):
        index[name] = {"file": file, "arch": arch, "layout": layout, "sides": list(sides), **extra}
        for side, f in zip(sides, feats, strict=True):
            arrays[f"{name}_{side}_cls"] = f["cls"]
            arrays[f"{name}_{side}_avg"] = f["avg"]

    # DINO ViT, patch 8, 48 px (grid 6); resized to 32 px (grid 4) as DINO does.
    dino = timm_vit(48, 8, seed=1)
    dino_state = {k: v for k, v in dino.state_dict().items() if not k.startswith("head.")}
    small = at_size(dino, dict(dino.state_dict()), 32, 8, dino_resize(dino.pos_embed, 4), seed=1)
    feats = [pooled(timm_tokens(dino, images[48]), 1), pooled(timm_tokens(small, images[32]), 1)]
    torch.save(dino_state, os.path.join(out, "dino_vit.pth"))
    record("dino_vit", "dino_vit.pth", "vit-w32-d2-h2-p8-mlp64", "dino_vit", (48, 32), feats)

    # DINO full checkpoint: teacher (= dino) under backbone., student under module.backbone.
    student = timm_vit(48, 8, seed=2)
    head = {
        "head.mlp.0.weight": torch.randn(16, WIDTH),
        "head.last_layer.weight_g": torch.ones(8, 1),
    }
    full = {
        "teacher": {**{f"backbone.{k}": v for k, v in dino_state.items()}, **head},
        "student": {
            **{
                f"module.backbone.{k}": v
                for k, v in student.state_dict().items()
                if not k.startswith("head.")
            },
            **{f"module.{k}": v for k, v in head.items()},
        },
        "epoch": 100,
        "dino_loss": {"center": torch.zeros(1, 16)},
    }
    torch.save(full, os.path.join(out, "dino_vit_full.pth"))
    record(
        "dino_vit_full", "dino_vit_full.pth", "vit-w32-d2-h2-p8-mlp64", "dino_vit", (48, 32), feats
    )
    sfeats = [pooled(timm_tokens(student, images[48]), 1)]
    record(
        "dino_vit_student",
        "dino_vit_full.pth",
        "vit-w32-d2-h2-p8-mlp64",
        "dino_vit_student",
        (48,),
        sfeats,
    )

    # timm .safetensors of the same network (classifier kept): timm resizes with antialias.
    save_file(dict(dino.state_dict()), os.path.join(out, "timm_vit.safetensors"))
    pos = resample_abs_pos_embed(dino.pos_embed, (4, 4), num_prefix_tokens=1)
    small = at_size(dino, dict(dino.state_dict()), 32, 8, pos, seed=1)
    tfeats = [feats[0], pooled(timm_tokens(small, images[32]), 1)]
    record(
        "timm_vit", "timm_vit.safetensors", "vit-w32-d2-h2-p8-mlp64", "timm_vit", (48, 32), tfeats
    )

    # DINOv2 with registers and LayerScale, patch 14, 56 px (grid 4) -> 42 px (grid 3).
    v2 = timm_vit(56, 14, reg=4, ls=True, no_embed_class=True, seed=3)
    # Draw an official checkpoint (class-token positional row, registers apart) first.
    g = torch.Generator().manual_seed(33)
    official = dinov2_official(dict(v2.state_dict()), swiglu=False)
    official.pop("reg_token")
    official["register_tokens"] = 0.15 * torch.randn(1, 4, WIDTH, generator=g)
    official["pos_embed"] = 0.15 * torch.randn(1, 17, WIDTH, generator=g)
    native = fold_registers(official)
    native["head.weight"], native["head.bias"] = v2.head.weight, v2.head.bias
    v2.load_state_dict(native)
    pos = dino_resize(official["pos_embed"], 3)
    resized = fold_registers(dict(official, pos_embed=pos))
    resized["head.weight"], resized["head.bias"] = v2.head.weight, v2.head.bias
    small = timm_vit(42, 14, reg=4, ls=True, no_embed_class=True, seed=3)
    small.load_state_dict(resized)
    feats = [
        pooled(timm_tokens(v2, images[56]), 5),
        pooled(timm_tokens(small.eval(), images[42]), 5),
    ]
    torch.save(official, os.path.join(out, "dinov2_reg.pth"), _use_new_zipfile_serialization=False)
    arch = "vit-w32-d2-h2-p14-mlp64-ls-reg4"
    record("dinov2_reg", "dinov2_reg.pth", arch, "dinov2", (56, 42), feats)

    # timm's reg4 model of the same weights: class-token row folded, antialiased resize.
    save_file(
        {k: v.contiguous() for k, v in native.items()},
        os.path.join(out, "timm_dinov2_reg.safetensors"),
    )
    pos = resample_abs_pos_embed(v2.pos_embed, (3, 3), num_prefix_tokens=0)
    small = timm_vit(42, 14, reg=4, ls=True, no_embed_class=True, seed=3)
    small.load_state_dict(dict(native, pos_embed=pos))
    tfeats = [feats[0], pooled(timm_tokens(small.eval(), images[42]), 5)]
    record("timm_dinov2_reg", "timm_dinov2_reg.safetensors", arch, "timm_vit", (56, 42), tfeats)

    # DINOv2-g style SwiGLU FFN (w12 / w3), LayerScale, no registers.
    sw = timm_vit(56, 14, ls=True, swiglu=True, seed=4)
    official = dinov2_official(dict(sw.state_dict()), swiglu=True)
    torch.save(official, os.path.join(out, "dinov2_swiglu.pth"))
    feats = [pooled(timm_tokens(sw, images[56]), 1)]
    record(
        "dinov2_swiglu",
        "dinov2_swiglu.pth",
        "vit-w32-d2-h2-p14-mlp48-swiglu-ls",
        "dinov2",
        (56,),
        feats,
    )

    hf_fixtures(out, images, record)
    bicubic_fixtures(arrays)

    np.savez_compressed(os.path.join(out, "vit_features.npz"), **arrays)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(
            {"torch": torch.__version__, "timm": timm.__version__, "fixtures": index}, f, indent=2
        )
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"wrote {len(os.listdir(out))} files, {total / 1e6:.3f} MB, to {out}")


def hf_fixtures(out, images, record):
    """transformers' own models saved by save_pretrained, their own forward and resize."""
    import transformers as tf_hf

    cases = (
        (
            "hf_dinov2",
            tf_hf.Dinov2Model,
            tf_hf.Dinov2Config,
            14,
            56,
            42,
            1,
            "vit-w32-d2-h2-p14-mlp64-ls",
            {},
        ),
        (
            "hf_dinov2_reg",
            tf_hf.Dinov2WithRegistersModel,
            tf_hf.Dinov2WithRegistersConfig,
            14,
            56,
            42,
            5,
            "vit-w32-d2-h2-p14-mlp64-ls-reg4",
            {"num_register_tokens": 4},
        ),
        ("hf_vit", tf_hf.ViTModel, tf_hf.ViTConfig, 8, 48, 32, 1, "vit-w32-d2-h2-p8-mlp64", {}),
        (
            "hf_dinov2_swiglu",
            tf_hf.Dinov2Model,
            tf_hf.Dinov2Config,
            8,
            48,
            32,
            1,
            "vit-w32-d2-h2-p8-mlp48-swiglu-ls",
            {"use_swiglu_ffn": True},
        ),
    )
    for name, model_cls, config_cls, patch, native, resized, skip, arch, extra in cases:
        config = config_cls(
            hidden_size=WIDTH,
            num_hidden_layers=DEPTH,
            num_attention_heads=HEADS,
            intermediate_size=HIDDEN,
            patch_size=patch,
            image_size=native,
            **extra,
        )
        if name != "hf_vit":
            config.mlp_ratio = HIDDEN // WIDTH
        model = randomise(model_cls(config), 10 + len(name))
        directory = os.path.join("/tmp", f"kd_keras_{name}")
        model.save_pretrained(directory)
        os.replace(
            os.path.join(directory, "model.safetensors"), os.path.join(out, f"{name}.safetensors")
        )
        mean, std = (0.5, 0.5) if name == "hf_vit" else (MEAN, STD)
        feats = []
        for side in (native, resized):
            x = (torch.from_numpy(images[side]).permute(0, 3, 1, 2) - mean) / std
            kwargs = {"interpolate_pos_encoding": True} if name == "hf_vit" else {}
            with torch.no_grad():
                tokens = model(pixel_values=x, **kwargs).last_hidden_state
            feats.append(pooled(tokens, skip))
        layout = name.removesuffix("_swiglu")
        record(name, f"{name}.safetensors", arch, layout, (native, resized), feats)


def bicubic_fixtures(arrays):
    """torch's bicubic on small [C, M, M] grids: up, down, antialiased, DINO's scale factor."""
    g = torch.Generator().manual_seed(7)
    for m, n in ((4, 7), (7, 3), (37, 16)):
        x = torch.randn(1, 3, m, m, generator=g)
        arrays[f"bicubic_in_{m}_{n}"] = x[0].permute(1, 2, 0).numpy()
        for aa in (False, True):
            y = F.interpolate(x, size=(n, n), mode="bicubic", align_corners=False, antialias=aa)
            arrays[f"bicubic_{m}_{n}_{'aa' if aa else 'plain'}"] = y[0].permute(1, 2, 0).numpy()
        f = (n + 0.1) / m
        y = F.interpolate(x, scale_factor=(f, f), mode="bicubic")
        arrays[f"bicubic_{m}_{n}_dino"] = y[0].permute(1, 2, 0).numpy()
