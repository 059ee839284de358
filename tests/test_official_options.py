"""Options that reproduce the authors' training code (issue 21): the official SimReg lr
staircase (--schedule=epoch_cosine), ResNets with a width multiplier and torch's 64-channel
stem (-stem<s>), and the flag checks around --momentum_form."""

import math

import numpy as np
import pytest

from kd_keras import config as config_lib
from kd_keras.nets import backbones
from kd_keras.optim import optimizers
from tests.helpers import parsed_flags


def test_epoch_cosine_is_the_official_simreg_staircase():
    # tools.adjust_learning_rate: lr_e = base / 2 (1 + cos(pi (e - 1) / E)), epochs from 1.
    base, epochs, steps_per_epoch = 0.05, 4, 3
    cfg = config_lib.OptimConfig(
        batch_size=128, epochs=epochs, lr=base, lr_scaling="none", schedule="epoch_cosine"
    )
    schedule = optimizers.learning_rate_schedule(cfg, steps_per_epoch)
    got = [float(schedule(step)) for step in range(epochs * steps_per_epoch)]
    expected = [
        base * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs))
        for e in range(1, epochs + 1)
        for _ in range(steps_per_epoch)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert min(got) > 0  # the staircase never reaches 0 in training


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--schedule=epoch_cosine", "--warmup_epochs=1.5"], "--warmup_epochs"),
        (["--method=swav", "--optimizer=lars", "--momentum_form=keras"], "--momentum_form"),
        (["--head_init=xavier"], "head_init"),
        (["--strong_blur=official"], "--strong_blur is the blur of --augment=strong"),
        (["--method=oss_offline", "--strong_blur=official"], "--strong_blur applies to"),
    ],
)
def test_flags_that_would_do_nothing_or_are_unknown_are_refused(tmp_path, argv, message):
    with pytest.raises(Exception, match=message):
        config_lib.config_from_flags(parsed_flags(tmp_path, *argv))


def test_epoch_cosine_flag_reaches_the_optimizer(tmp_path):
    cfg = config_lib.config_from_flags(parsed_flags(tmp_path, "--schedule=epoch_cosine", "--epochs=3"))
    assert cfg.optim.schedule == "epoch_cosine"
    opt = optimizers.make_optimizer(cfg.optim, 10)
    assert opt.momentum_form == "torch"
    rates = [float(opt._learning_rate(s)) for s in (0, 9, 10, 29)]
    assert rates[0] == rates[1] > rates[2] > rates[3] > 0


def test_resnet_arch_with_a_torch_stem():
    spec = backbones.parse_resnet_arch("resnet-basic-1.1.1.1-4-stem64")
    assert spec.stem_width == 64 and spec.widths == (4, 8, 16, 32) and spec.feature_dim == 32
    model = backbones.build_resnet(spec, 32)
    assert model.get_layer("stem_conv").kernel.shape == (7, 7, 3, 64)
    assert model.get_layer("stage1_block0_proj_conv").kernel.shape == (1, 1, 64, 4)
    assert backbones.parse_resnet_arch("resnet-basic-1.1.1.1-4").stem_width == 4


def test_strong_blur_official_is_the_authors_blur(tmp_path):
    # UCDvision/simreg dataloader: RandomApply([GaussianBlur([.1, 2.])], p=0.5).
    from kd_keras.data import augment

    cfg = config_lib.config_from_flags(
        parsed_flags(tmp_path, "--augment=strong", "--strong_blur=official", "--head=mlp2_official")
    )
    assert (cfg.data.strong_blur, cfg.model.head) == ("official", "mlp2_official")
    recipe = augment._view_recipe("strong", (16, 16), (0.2, 1.0), "auto", "official")
    assert (recipe.blur_sigma, recipe.blur_p) == ((0.1, 2.0), 0.5)
    paper = augment._view_recipe("strong", (16, 16), (0.2, 1.0), "auto")
    assert (paper.blur_sigma, paper.blur_p) == ((0.0, 1.0), 1.0)  # SimReg B.2, the default

    image = np.random.default_rng(0).uniform(size=(32, 32, 3)).astype(np.float32)
    views = {
        blur: augment.make_view_fn("strong", 16, "same", strong_blur=blur)(
            image, np.array([3, 0], np.int64)
        )["student"].numpy()
        for blur in ("paper", "official")
    }
    assert np.abs(views["paper"] - views["official"]).max() > 1e-3
    with pytest.raises(ValueError, match="strong_blur"):
        augment.make_view_fn("strong", 16, "same", strong_blur="moco")


def test_teacher_cache_refuses_another_blur_and_reads_old_manifests_as_paper():
    from kd_keras.data import teacher_cache

    views = {"augment": "strong", "aug_mode": "same", "image_size": 16, "crop_scale_min": 0.2,
             "view_resize": "auto", "seed": 0, "seed_scheme": "x", "probe": [0.0]}
    teacher = {"name": "t", "probe_features": [0.0]}
    dataset = {"source": "d"}
    old = {"teacher": teacher, "dataset": dataset, "views": views}  # no strong_blur recorded
    want = {"teacher": teacher, "dataset": dataset, "views": {**views, "strong_blur": "paper"}}
    assert teacher_cache.manifest_differences(old, want) == []
    want["views"]["strong_blur"] = "official"
    assert teacher_cache.manifest_differences(old, want) == [
        "views.strong_blur: cache 'paper', run 'official'"
    ]


def test_python_views_take_the_official_blur():
    import kd_keras

    images = np.random.default_rng(1).integers(0, 255, (2, 24, 24, 3), dtype=np.uint8)
    batch = kd_keras.views("strong", 16, strong_blur="official", seed=0)(images)
    assert batch["student"].shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="strong_blur"):
        kd_keras.views("strong", 16, strong_blur="moco")
    with pytest.raises(ValueError, match="blur of kind='strong'"):
        kd_keras.views("weak", 16, strong_blur="official")
