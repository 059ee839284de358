import json

import pytest
from absl import flags

from kd_keras import config as config_lib

config_lib.define_flags()


def _fresh(argv):
    """Parses argv with kd_keras' flags reset to defaults."""
    config_lib.FLAGS.unparse_flags()
    config_lib.FLAGS(["prog", *argv])
    return config_lib.FLAGS


def test_flagfile_includes_common_and_command_line_overrides(tmp_path):
    common = tmp_path / "common.cfg"
    common.write_text("--seed=7\n--batch_size=32\n--head=mlp2\n")
    preset = tmp_path / "preset.cfg"
    preset.write_text(f"--flagfile={common}\n--batch_size=64\n--teacher=recipe:supervised\n")
    fv = _fresh([f"--flagfile={preset}", "--batch_size=16", f"--workdir={tmp_path}/run"])
    cfg = config_lib.config_from_flags(fv)
    assert cfg.seed == 7  # from the included file
    assert cfg.model.head == "mlp2"
    assert cfg.optim.batch_size == 16  # command line wins over both files
    assert cfg.model.teachers == ("recipe:supervised",)


def test_config_round_trips_through_json(tmp_path):
    fv = _fresh(
        [
            f"--workdir={tmp_path}/run",
            "--teacher=recipe:supervised",
            "--knn_k=1,5",
            "--head_hidden_dims=8,8,8",
        ]
    )
    cfg = config_lib.config_from_flags(fv)
    path = tmp_path / "config.json"
    cfg.save(path)
    assert json.loads(path.read_text())["optim"]["lr"] == pytest.approx(0.05)
    assert config_lib.config_from_json(path) == cfg


def test_linear_lr_scaling():
    cfg = config_lib.OptimConfig(batch_size=1024, lr=0.05)
    assert cfg.scaled_lr() == pytest.approx(0.2)
    assert config_lib.OptimConfig(batch_size=1024, lr=0.05, lr_scaling="none").scaled_lr() == 0.05


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--batch_size=0"], "--batch_size"),
        (["--lr=-1"], "--lr"),
        (["--crop_scale_min=1.5"], "--crop_scale_min"),
        (["--warmup_epochs=500"], "--warmup_epochs"),
        (["--save_freq=often"], "--save_freq"),
        (["--knn_k=1,x"], "--knn_k"),
        (["--method=regress", "--head=mlp4"], "--head=linear"),
        (["--method=oss_offline", "--nofeature_classifier"], "--feature_classifier"),
        (["--method=simreg", "--nofeature_classifier"], "--feature_classifier"),
    ],
)
def test_impossible_values_name_the_flag(tmp_path, argv, flag):
    fv = _fresh([f"--workdir={tmp_path}", "--teacher=recipe:supervised", *argv])
    with pytest.raises(ValueError, match=flag):
        config_lib.config_from_flags(fv)


def test_feature_classifier_switch_is_online_oss_only(tmp_path):
    fv = _fresh(
        [f"--workdir={tmp_path}", "--method=oss", "--small_crop_size=16", "--nofeature_classifier"]
    )
    assert config_lib.config_from_flags(fv).cluster.feature_classifier is False
    fv = _fresh(
        [f"--workdir={tmp_path}", "--method=oss", "--small_crop_size=16", "--nofeature_classifier"]
        + ["--classifier_hidden=50"]
    )
    with pytest.raises(ValueError, match="--classifier_hidden is not used here"):
        config_lib.config_from_flags(fv)
    fv = _fresh(
        [f"--workdir={tmp_path}", "--method=swav", "--small_crop_size=16", "--nofeature_classifier"]
    )
    with pytest.raises(ValueError, match="--feature_classifier is not used here"):
        config_lib.config_from_flags(fv)


def test_grl_scale_reaches_the_config_for_oss_with_its_classifier_only(tmp_path):
    base = [f"--workdir={tmp_path}", "--small_crop_size=16"]
    assert config_lib.config_from_flags(_fresh([*base, "--method=oss"])).cluster.grl_scale == 1.0
    cfg = config_lib.config_from_flags(_fresh([*base, "--method=oss", "--grl_scale=0.1"]))
    assert cfg.cluster.grl_scale == 0.1
    with pytest.raises(ValueError, match="--grl_scale must be >= 0"):
        config_lib.config_from_flags(_fresh([*base, "--method=oss", "--grl_scale=-1"]))
    for argv in (["--method=oss", "--nofeature_classifier"], ["--method=swav"]):
        with pytest.raises(ValueError, match="--grl_scale is not used here"):
            config_lib.config_from_flags(_fresh([*base, *argv, "--grl_scale=0.5"]))


def test_missing_workdir_and_teacher_are_reported(tmp_path):
    with pytest.raises(ValueError, match="--workdir"):
        config_lib.config_from_flags(_fresh(["--teacher=recipe:supervised"]))
    with pytest.raises(ValueError, match="--teacher"):
        config_lib.config_from_flags(_fresh([f"--workdir={tmp_path}"]))


def test_unknown_method_is_rejected_by_flag_parsing():
    with pytest.raises(flags.IllegalFlagValueError):
        _fresh(["--method=byol"])
