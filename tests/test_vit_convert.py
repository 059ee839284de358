"""ViT teachers converted from DINO, DINOv2, timm and Hugging Face files against the sources'
own features (fixtures of scripts/torch_vit_fixtures.py; no torch here)."""

import json
import os

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kd_keras.nets import pos_embed, vit
from kd_keras.teachers import conversion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "vit")
FIXTURES = json.load(open(os.path.join(DATA, "index.json")))["fixtures"]
ARRAYS = dict(np.load(os.path.join(DATA, "vit_features.npz")))


def _images(side):
    return ARRAYS[f"images_{side}"].astype(np.float32) / 255.0


def _max_rel(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _convert(tmp_path, name, side=None, **kwargs):
    fixture = FIXTURES[name]
    kwargs.setdefault("layout", fixture["layout"] if name == "dino_vit_student" else None)
    out = tmp_path / f"{name}_{side}"
    cfg = conversion.ConvertConfig(
        checkpoint=kwargs.pop("checkpoint", os.path.join(DATA, fixture["file"])),
        out=str(out),
        arch=kwargs.pop("arch", fixture["arch"]),
        image_size=side,
        **kwargs,
    )
    return out, conversion.convert(cfg)


def _features(out, side):
    model = keras.models.load_model(out / "backbone.keras", compile=False)
    return np.asarray(model(_images(side), training=False))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_converted_vit_computes_the_sources_features_at_every_size(tmp_path, name):
    fixture = FIXTURES[name]
    for i, side in enumerate(fixture["sides"]):
        out, manifest = _convert(tmp_path, name, side=side if i else None)
        assert manifest["layout"] == fixture["layout"]
        assert manifest["image_size"] == side
        assert manifest["pos_embed"]["resized"] == bool(i)
        got = _features(out, side)
        assert _max_rel(got, ARRAYS[f"{name}_{side}_cls"]) < 1e-4, (name, side)


def test_pool_avg_and_cls_avg_are_the_normed_patch_token_mean(tmp_path):
    name = "dinov2_reg"  # registers must be left out of the mean
    want_cls, want_avg = ARRAYS[f"{name}_56_cls"], ARRAYS[f"{name}_56_avg"]
    out, manifest = _convert(tmp_path, name, pool="avg")
    assert manifest["feature_dim"] == 32
    assert _max_rel(_features(out, 56), want_avg) < 1e-4
    out, manifest = _convert(tmp_path / "b", name, pool="cls_avg")
    assert manifest["feature_dim"] == 64
    got = _features(out, 56)
    assert _max_rel(got[:, :32], want_cls) < 1e-4
    assert _max_rel(got[:, 32:], want_avg) < 1e-4


@pytest.mark.parametrize(
    "case",
    [
        "4_7_plain",
        "4_7_aa",
        "7_3_plain",
        "7_3_aa",
        "37_16_aa",
        "37_16_plain",
        "4_7_dino",
        "7_3_dino",
        "37_16_dino",
    ],
)
def test_numpy_bicubic_is_torchs(case):
    m, n, mode = case.split("_")
    grid = ARRAYS[f"bicubic_in_{m}_{n}"]
    n = int(n)
    if mode == "dino":
        factor = (n + 0.1) / int(m)
        got = pos_embed.torch_bicubic(grid, (n, n), scale_factor=(factor, factor))
    else:
        got = pos_embed.torch_bicubic(grid, (n, n), antialias=mode == "aa")
    np.testing.assert_allclose(got, ARRAYS[f"bicubic_{case}"], atol=3e-5)


def test_the_three_resize_methods_differ_when_shrinking():
    grid = ARRAYS["bicubic_in_37_16"][None].reshape(1, 37 * 37, 3)
    results = [
        pos_embed.resize_pos_embed(grid, 16, m, class_pos=False) for m in pos_embed.RESIZE_METHODS
    ]
    assert all(r.shape == (1, 256, 3) for r in results)
    assert np.abs(results[0] - results[1]).max() > 1e-3  # offset 0.1
    assert np.abs(results[1] - results[2]).max() > 1e-2  # antialias


def test_manifest_records_skips_and_the_resize(tmp_path):
    _, manifest = _convert(tmp_path, "dino_vit_full", side=32)
    assert manifest["source"]["container"] == "teacher"
    assert set(manifest["skipped"]) == {"head.mlp.0.weight", "head.last_layer.weight_g"}
    assert "student" in manifest["skipped_entries"]
    assert manifest["pos_embed"] == {
        "source_grid": 6,
        "grid": 4,
        "class_token_row": True,
        "method": "dino",
        "resized": True,
    }
    _, manifest = _convert(tmp_path, "hf_dinov2")
    fused = [k for k in manifest["mapping"] if "attention.attention.query" in k]
    assert len(fused) == 4  # weight and bias of 2 blocks, each fused from query+key+value
    assert all("+" in k for k in fused)


def _edited(tmp_path, edit):
    state = load_file(os.path.join(DATA, "timm_vit.safetensors"))
    edit(state)
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path))
    return str(path)


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            lambda s: s.update({"blocks.1.mlp.fc3.weight": s.pop("blocks.1.mlp.fc2.weight")}),
            "blocks.1.mlp.fc3.weight",
        ),
        (
            lambda s: s.pop("blocks.0.ls9.gamma", s.pop("blocks.0.attn.proj.bias")),
            "blocks.0.attn.proj.bias",
        ),
        (
            lambda s: s.update({"blocks.0.attn.qkv.weight": s["blocks.0.attn.qkv.weight"][:64]}),
            "blocks.0.attn.qkv.weight [64, 32]",
        ),
        (lambda s: s.update({"fc_norm.weight": s["norm.weight"]}), "fc_norm.weight"),
    ],
    ids=["renamed", "missing", "reshaped", "unexpected"],
)
def test_bad_keys_are_errors_naming_them_and_nothing_is_written(tmp_path, edit, named):
    path = _edited(tmp_path, edit)
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        _convert(tmp_path, "timm_vit", checkpoint=path)
    assert not os.path.exists(tmp_path / "timm_vit_None")


def test_sizes_not_a_multiple_of_the_patch_and_wrong_arch_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--image_size: image size 50 is not a multiple"):
        _convert(tmp_path, "timm_vit", side=50)
    with pytest.raises(ValueError, match="12 unexpected tensors .*: blocks.1.attn.proj.bias"):
        _convert(tmp_path, "timm_vit", arch="vit-w32-d1-h2-p8-mlp64")
    with pytest.raises(ValueError, match="not a ViT layout"):
        _convert(tmp_path, "timm_vit", layout="moco")


def test_named_archs_have_the_published_shapes():
    g = vit.parse_vit_arch("dinov2_vitg14_reg")
    assert (g.width, g.depth, g.heads, g.hidden, g.ffn, g.registers) == (
        1536,
        40,
        24,
        4096,
        "swiglu",
        4,
    )
    s = vit.parse_vit_arch("vit_small_patch16")
    assert (s.width, s.depth, s.heads, s.patch, s.layer_scale) == (384, 12, 6, 16, False)
    with pytest.raises(ValueError, match="unknown ViT architecture 'vit_huge'"):
        vit.parse_vit_arch("vit_huge")


def test_overwrite_replaces_a_converted_vit_but_never_another_directory(tmp_path):
    # The ViT path shares the ResNets' --overwrite guard: it deletes only what convert wrote.
    name = "dino_vit"
    out, _ = _convert(tmp_path, name)
    _convert(tmp_path, name, overwrite=True)  # a converted teacher: replaced
    assert (out / "backbone.keras").is_file()
    precious = tmp_path / f"{name}_None"
    for path in precious.iterdir():
        path.unlink()
    (precious / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="not a kd_keras converted teacher"):
        _convert(tmp_path, name, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "mine"
    with pytest.raises(ValueError, match="exists; remove it or pass --overwrite"):
        _convert(tmp_path, name)
