"""RegNetY in kd_keras.backbones: the paper's quantisation, shapes, parameter counts, grouped
convs on CPU and XLA, the torchvision-layout converter, and `--student=regnety600mf`.

No torch here: tests/data/regnet (scripts/make_regnet_fixtures.py) holds a narrow RegNetY
written by torchvision's own RegNet class, torch's features of fixed images, and the key ->
shape tables and parameter counts of torchvision's full RegNetY-400MF / 800MF and of
torchvision's RegNet built from pycls' RegNetY-600MF parameters.
"""

import functools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.nets import backbones
from kd_keras.teachers import conversion as convert
from kd_keras.teachers import layouts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "regnet")
INDEX = json.load(open(os.path.join(DATA, "index.json")))
FEATURES = dict(np.load(os.path.join(DATA, "features.npz")))
NARROW = INDEX["arch"]

# Published stage widths and depths: pycls' model zoo (RegNetY-600MF: 48/112/256/608, 1/3/7/4;
# RegNetY-800MF: 64/128/320/768, 1/3/8/2) and torchvision's regnet_y_400mf / _800mf.
PUBLISHED = {
    ("regnety600mf", "pycls"): ((48, 112, 256, 608), (1, 3, 7, 4)),
    ("regnety800mf", "pycls"): ((64, 128, 320, 768), (1, 3, 8, 2)),
    ("regnety400mf", "torchvision"): ((48, 104, 208, 440), (1, 3, 6, 6)),
    ("regnety800mf", "torchvision"): ((64, 144, 320, 784), (1, 3, 8, 2)),
}
DESIGNS = {  # depth, w0, wa, wm, group width (pycls configs / torchvision regnet_y_*)
    "regnety400mf": (16, 48, 27.89, 2.09, 8),
    "regnety600mf": (15, 48, 32.54, 2.32, 16),
    "regnety800mf": (14, 56, 38.84, 2.4, 16),
}


@functools.cache
def _model(name, image_size=32, **kwargs):
    return backbones.build_backbone(name, image_size, **kwargs)


@functools.cache
def _regnet(arch):
    return backbones.build_regnet(arch, any_input_size=True)


def _count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def _max_rel(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


# --- The design-space quantisation ------------------------------------------------------------


@pytest.mark.parametrize("name, rounding", sorted(PUBLISHED))
def test_quantisation_yields_the_published_stage_widths_and_depths(name, rounding):
    widths, depths, groups = backbones.regnet_stages(*DESIGNS[name], rounding=rounding)
    assert (widths, depths) == PUBLISHED[(name, rounding)]
    assert groups == (DESIGNS[name][-1],) * 4
    if rounding == "torchvision" or name == "regnety600mf":
        # torchvision's own BlockParams.from_init_params on the same parameters.
        assert list(widths) == INDEX["full"][name]["widths"]
        assert list(depths) == INDEX["full"][name]["depths"]


def test_quantisation_steps_by_hand():
    # u = 8, 16, 24, 32; log2(u / 8) = 0, 1, 1.58, 2 -> s = 0, 1, 2, 2 -> w = 8, 16, 32, 32.
    assert backbones.regnet_stages(4, 8, 8.0, 2.0, 8) == ((8, 16, 32), (1, 1, 2), (8, 8, 8))
    # A group width wider than a stage is capped at the stage width (then 1 group).
    assert backbones.regnet_stages(2, 8, 8.0, 2.0, 16) == ((8, 16), (1, 1), (8, 16))
    # The bottleneck is rounded to the group width, the stage width follows: 24 / 16 = 1.5.
    assert backbones.regnet_stages(1, 24, 0.0, 2.0, 16, rounding="pycls")[0] == (32,)
    assert backbones.regnet_stages(1, 24, 0.0, 2.0, 16, rounding="torchvision")[0] == (32,)
    # 136 / 16 = 8.5: pycls rounds half to even (128), torchvision up (144); 130 agrees.
    assert backbones._round_to_multiple(136, 16, "pycls") == 128
    assert backbones._round_to_multiple(136, 16, "torchvision") == 144
    assert {backbones._round_to_multiple(130, 16, r) for r in ("pycls", "torchvision")} == {128}


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 48, 32.0, 2.3, 16), "depth must be an int >= 1"),
        ((15, 44, 32.0, 2.3, 16), "w0 > 0 a multiple of 8"),
        ((15, 48, 32.0, 1.0, 16), "wm > 1"),
        ((15, 48, -1.0, 2.3, 16), "wa >= 0"),
    ],
)
def test_parameters_outside_the_design_space_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        backbones.regnet_stages(*args)


def test_presets_are_the_quantised_designs():
    for name, spec in backbones.REGNET_ARCHS.items():
        assert (spec.stem, spec.se_ratio, spec.bottleneck_ratio) == (32, 0.25, 1.0)
        full = INDEX["full"][name]
        assert [list(spec.widths), list(spec.depths)] == [full["widths"], full["depths"]]


# --- The network --------------------------------------------------------------------------------


def test_regnety600mf_layer_shapes_at_224_px():
    model = _model("regnety600mf", 224)
    shapes = {
        "stem": (112, 32),
        "stage1": (56, 48),
        "stage2": (28, 112),
        "stage3": (14, 256),
        "stage4": (7, 608),
    }
    for name, (side, width) in shapes.items():
        assert tuple(model.get_layer(name).output.shape) == (None, side, side, width), name
    assert model.output_shape == (None, 608)
    blocks = [len([la for la in model.layers if la.name.startswith(f"stage{s}_block")
                   and la.name.endswith("_add")]) for s in range(1, 5)]  # fmt: skip
    assert blocks == [1, 3, 7, 4]
    grouped = model.get_layer("stage4_block0_b_conv")
    assert grouped.groups == 608 // 16 and tuple(grouped.kernel.shape) == (3, 3, 16, 608)
    assert grouped.strides == (2, 2)
    # SE squeezes to a quarter of the block's *input* width (pycls / torchvision).
    assert model.get_layer("stage2_block0_se_fc1").filters == 12  # 48 / 4
    assert model.get_layer("stage2_block1_se_fc1").filters == 28  # 112 / 4
    assert model.get_layer("stage2_block0_proj_conv").strides == (2, 2)
    names = {la.name for la in model.layers}
    assert "stage2_block1_proj_conv" not in names  # identity shortcut inside a stage
    assert not [la for la in model.layers if isinstance(la, keras.layers.MaxPooling2D)]


def test_small_stem_keeps_32_px_images_at_2x2_in_the_last_stage():
    auto = _model("regnety600mf", 32)  # small_stem auto: on at <= 64 px
    assert tuple(auto.get_layer("stem").output.shape) == (None, 32, 32, 32)
    assert tuple(auto.get_layer("stage4").output.shape) == (None, 2, 2, 608)
    imagenet = _model("regnety600mf", 32, small_stem=False)
    assert tuple(imagenet.get_layer("stage4").output.shape) == (None, 1, 1, 608)
    assert _count(auto.weights) == _count(imagenet.weights)  # the stem's stride only
    out = auto(np.random.default_rng(0).random((2, 32, 32, 3), np.float32), training=False)
    assert out.shape == (2, 608) and np.all(np.isfinite(out))


def test_any_input_size_takes_crops_of_several_sides():
    model = _model("regnety600mf", 32, any_input_size=True)
    assert model.input_shape == (None, None, None, 3)
    for side in (16, 37):
        images = np.random.default_rng(side).random((2, side, side, 3), np.float32)
        assert model(images, training=False).shape == (2, 608)


def test_parameter_count_matches_the_reference():
    model = _model("regnety600mf", 224)
    reference = INDEX["full"]["regnety600mf"]  # torchvision's RegNet on pycls' parameters
    assert _count(model.trainable_weights) == 5_446_160 == reference["params"] - 609_000
    # With a 1000-class ImageNet classifier (608 * 1000 + 1000): pycls reports 6.06M.
    assert _count(model.trainable_weights) + 609_000 == 6_055_160 == reference["params"]
    bn_channels = sum(
        la.gamma.shape[0] for la in model.layers if isinstance(la, keras.layers.BatchNormalization)
    )
    assert _count(model.non_trainable_weights) == 2 * bn_channels  # moving mean and variance


@pytest.mark.parametrize("name", ["regnety400mf", "regnety800mf", "regnety600mf"])
def test_keras_weights_map_onto_exactly_torchvisions_keys_and_shapes(name):
    model = _regnet(name)
    spec = backbones.REGNET_ARCHS[name]
    plan = convert._backbone_plan(model, spec, layouts.LAYOUTS["torchvision"], "")
    got = {item.key: list(convert._source_shape(item)) for item in plan}
    full = INDEX["full"][name]
    want = {
        k: v
        for k, v in full["shapes"].items()
        if not k.endswith("num_batches_tracked") and not k.startswith("fc.")
    }
    assert got == want
    assert _count(model.trainable_weights) == full["params"] - full["fc_params"]


@pytest.mark.parametrize("layer", [keras.layers.Conv2D, backbones.GroupedConv2D])
def test_grouped_conv_runs_on_cpu_eagerly_in_graphs_and_under_xla(layer):
    # TF's CPU kernels once refused grouped convolutions (Keras therefore XLA-compiles each one,
    # which is slow on CPUs); GroupedConv2D calls TF's kernel, and a block-diagonal dense conv
    # under XLA on CPU. Both must equal a per-group reference, with the same gradients, eagerly,
    # in graphs and under XLA, at stride 1 and 2.
    x = tf.constant(np.random.rand(2, 9, 9, 6).astype(np.float32))
    for stride in (1, 2):
        conv = layer(12, 3, strides=stride, padding="valid", groups=3, use_bias=False)
        eager = conv(x).numpy()
        kernel = conv.kernel.numpy()  # [3, 3, 2, 12]: output group j reads inputs 2j, 2j + 1
        want = np.concatenate(
            [tf.nn.conv2d(x[..., 2 * j : 2 * j + 2], kernel[..., 4 * j : 4 * j + 4], stride,
                          "VALID") for j in range(3)], axis=-1,
        )  # fmt: skip
        np.testing.assert_allclose(eager, want, rtol=1e-5, atol=1e-6)

        def loss(inputs, conv=conv):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                value = tf.reduce_sum(tf.sin(conv(inputs)))
            return value, *tape.gradient(value, [inputs, conv.kernel])

        def per_group(inputs, kernel=conv.kernel, stride=stride):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                out = tf.concat(
                    [tf.nn.conv2d(inputs[..., 2 * j : 2 * j + 2], kernel[..., 4 * j : 4 * j + 4],
                                  stride, "VALID") for j in range(3)], axis=-1,
                )  # fmt: skip
                value = tf.reduce_sum(tf.sin(out))
            return value, *tape.gradient(value, [inputs, kernel])

        want = per_group(x)
        for jit in (None, False, True):
            got = loss(x) if jit is None else tf.function(loss, jit_compile=jit)(x)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_conv_layer_round_trips_through_keras_saving(tmp_path):
    inputs = keras.Input((6, 6, 8))
    model = keras.Model(inputs, backbones.GroupedConv2D(8, 3, groups=4, name="g")(inputs))
    model.save(tmp_path / "g.keras")
    loaded = keras.models.load_model(tmp_path / "g.keras", compile=False)
    assert isinstance(loaded.get_layer("g"), backbones.GroupedConv2D)
    x = np.random.rand(1, 6, 6, 8).astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


# --- The converter ------------------------------------------------------------------------------


def _convert(tmp_path, file="regnety_narrow.pth", arch=NARROW, **kwargs):
    out = tmp_path / "converted"
    cfg = convert.ConvertConfig(
        checkpoint=os.path.join(DATA, file), out=str(out), arch=arch, **kwargs
    )
    return out, convert.convert(cfg)


@pytest.mark.parametrize("file", ["regnety_narrow.pth", "regnety_narrow_module_legacy.pth"])
def test_converted_regnet_reproduces_torchvisions_features(tmp_path, file):
    out, manifest = _convert(tmp_path, file)
    assert manifest["layout"] == "torchvision" and manifest["max_pool"] is None
    assert manifest["regnet"]["widths"] == [8, 16, 24, 32] and manifest["feature_dim"] == 32
    prefix = "module." if "module" in file else ""
    assert manifest["mapping"][f"{prefix}trunk_output.block3.block3-1.f.se.fc1.bias"] == (
        "stage3_block1_se_fc1/bias"
    )
    assert manifest["mapping"][f"{prefix}stem.1.running_var"] == "stem_bn/moving_variance"
    assert set(manifest["skipped"]) >= {f"{prefix}fc.weight", f"{prefix}fc.bias"}
    model = keras.models.load_model(out / "backbone.keras", compile=False)
    assert sorted(manifest["mapping"].values()) == sorted(w.path for w in model.weights)
    stage1 = keras.Model(model.input, model.get_layer("stage1").output)
    for side in INDEX["sides"]:
        images = FEATURES[f"images_{side}"]
        assert _max_rel(model(images, training=False), FEATURES[f"features_{side}"]) < 1e-4
        assert _max_rel(stage1(images, training=False), FEATURES[f"stage1_{side}"]) < 1e-4


def test_the_regnet_architecture_is_checked_against_the_checkpoint(tmp_path):
    # Group width 4 instead of 8: same keys, the grouped kernels have the wrong shape.
    shape_error = (
        r"6 ill-shaped tensors: trunk_output\.block1\.block1-0\.f\.b\.0\.weight \[8, 8, 3, 3\] "
        r"-> stage1_block0_b_conv/kernel expects \[8, 4, 3, 3\]"
    )
    with pytest.raises(convert.ConversionError, match=shape_error):
        _convert(tmp_path, arch="regnety-1.2.2.1-8.16.24.32-g4-stem8")
    with pytest.raises(
        convert.ConversionError, match=r"missing keys: trunk_output\.block2\.block2-2"
    ):
        _convert(tmp_path, arch="regnety-1.3.2.1-8.16.24.32-g8-stem8")
    assert not os.path.exists(tmp_path / "converted")


@pytest.mark.parametrize(
    "arch, message",
    [
        ("regnety-1.2-8-g8", "2 stage depths but 1 stage widths"),
        ("regnety-1-12-g8", "bottleneck width 12 is not a multiple of its group width 8"),
        ("regnety900mf", r"unknown RegNet architecture 'regnety900mf'.*regnety600mf"),
    ],
)
def test_bad_regnet_arch_strings_are_named(arch, message):
    with pytest.raises(ValueError, match=message):
        backbones.parse_arch(arch)


@pytest.mark.slow
def test_cli_accepts_the_regnet_archs_and_names_a_mismatch_in_one_line(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "kd_keras.convert", "--arch=regnety600mf",
         f"--checkpoint={os.path.join(DATA, 'regnety_narrow.pth')}", f"--out={tmp_path}/o"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kd_keras.convert")]
    assert len(errors) == 1
    assert "does not fit --arch=regnety600mf" in errors[0] and "stem.0.weight" in errors[0]


# --- The student --------------------------------------------------------------------------------


def test_student_flag_builds_regnety600mf(tmp_path):
    from kd_keras import config as config_lib
    from kd_keras.training import run as train

    config_lib.define_flags()
    fv = config_lib.FLAGS
    fv.unparse_flags()
    fv(["prog", "--student=regnety600mf", "--method=supervised", f"--workdir={tmp_path}"])
    try:
        cfg = config_lib.config_from_flags(fv)
    finally:
        fv.unparse_flags()
    assert cfg.model.student == "regnety600mf"
    student = train.build_student(cfg, 32)
    assert student.output_shape == (None, 608)
    assert tuple(student.get_layer("stage4").output.shape) == (None, 2, 2, 608)
    assert backbones.resolve_norm("regnety600mf", "native") == "imagenet"
