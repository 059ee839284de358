"""Every script in examples/ runs, at tiny size (KD_KERAS_EXAMPLE_TINY=1)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py"))
EXPECTED = {
    "simreg_quickstart.py": "student before distillation: 1-NN accuracy",
    "keras_distiller.py": "Distiller + SimRegLoss:",
}


def test_every_example_is_checked():
    assert set(EXAMPLES) == set(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs(script, tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "KD_KERAS_EXAMPLE_TINY": "1",
        "KD_KERAS_EXAMPLE_DIR": str(tmp_path),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXPECTED[script] in result.stdout
