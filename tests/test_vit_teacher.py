"""ViT checkpoints as teachers: the torch:ARCH=PATH spec with pool= and the run's size, the
convert command line (fixtures of scripts/torch_vit_fixtures.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kd_keras.teachers import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "vit")
FIXTURES = json.load(open(os.path.join(DATA, "index.json")))["fixtures"]
ARRAYS = dict(np.load(os.path.join(DATA, "vit_features.npz")))


def _max_rel(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def test_torch_vit_teacher_is_converted_for_the_runs_size_with_its_pool(tmp_path):
    fixture = FIXTURES["dinov2_reg"]
    spec = f"torch:{fixture['arch']}={os.path.join(DATA, fixture['file'])},pool=cls_avg"
    teacher = loading.load_teacher(spec, image_size=42, workdir=str(tmp_path))
    assert teacher.feature_dim == 64
    got = np.asarray(teacher(ARRAYS["images_42"].astype(np.float32) / 255.0))
    assert _max_rel(got[:, :32], ARRAYS["dinov2_reg_42_cls"]) < 1e-4
    assert _max_rel(got[:, 32:], ARRAYS["dinov2_reg_42_avg"]) < 1e-4
    (converted,) = (tmp_path / "converted_teachers").iterdir()
    assert converted.name.endswith("-s42-cls_avg")
    manifest = json.load(open(converted / "manifest.json"))
    assert manifest["pos_embed"]["grid"] == 3 and manifest["pos_embed"]["source_grid"] == 4


@pytest.mark.parametrize(
    "spec, message",
    [
        ("torch:resnet50={ckpt},pool=cls", "pool=cls applies to torch: ViT teachers only"),
        ("torch:dinov2_vits14={ckpt},layout=moco", "layout must be one of .*'dinov2'"),
        ("torch:vit_huge={ckpt}", "unknown architecture 'vit_huge'"),
    ],
)
def test_bad_vit_teacher_specs_are_one_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        loading.parse_teacher_spec(spec.format(ckpt=os.path.join(DATA, "dinov2_reg.pth")))


def _run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "kd_keras.convert", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_refuses_a_size_off_the_patch_grid_in_one_line_with_exit_code_2(tmp_path):
    fixture = FIXTURES["timm_vit"]
    out = tmp_path / "vit"
    bad = _run_cli(
        f"--checkpoint={os.path.join(DATA, fixture['file'])}",
        f"--arch={fixture['arch']}",
        f"--out={out}",
        "--image_size=50",
    )
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.startswith("kd_keras.convert")]
    assert len(lines) == 1 and "--image_size: image size 50 is not a multiple" in lines[0]
    assert "Traceback" not in bad.stderr and not out.exists()


@pytest.mark.slow
def test_a_converted_vit_directory_refuses_another_image_size(tmp_path):
    from kd_keras.teachers import conversion

    fixture = FIXTURES["timm_vit"]
    out = tmp_path / "vit"
    conversion.convert(
        conversion.ConvertConfig(
            checkpoint=os.path.join(DATA, fixture["file"]), out=str(out), arch=fixture["arch"]
        )
    )
    with pytest.raises(ValueError, match="a ViT converted for 48 px images cannot take 32 px"):
        loading.load_teacher(str(out), image_size=32)
    # A fresh process: the ViT layers must be registered by the loader itself.
    code = (
        "from kd_keras.teachers import loading; "
        f"print(loading.load_teacher('{out},size=48', image_size=32).feature_dim)"
    )
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "32"
