"""--strategy=multi_worker: TF_CONFIG checks, data sharding, and 2 local worker processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from kd_keras import data, distributed
from kd_keras.launch import free_ports
from tests.helpers import h5_arrays

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tf_config(workers, index, job="worker"):
    return json.dumps({"cluster": {job: workers}, "task": {"type": job, "index": index}})


def test_tf_config_is_parsed_with_the_chief_first():
    raw = json.dumps(
        {
            "cluster": {"chief": ["h0:1"], "worker": ["h1:2", "h2:3"]},
            "task": {"type": "worker", "index": 1},
        }
    )
    info = distributed.parse_tf_config(raw)
    assert info.addresses == ("h0:1", "h1:2", "h2:3")
    assert info.worker_id == 2 and not info.is_chief and info.num_workers == 3


@pytest.mark.parametrize(
    "raw, message",
    [
        (None, "needs the TF_CONFIG environment variable"),
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', '"cluster" object'),
        (_tf_config(["a:1", "b"], 0), 'cluster["worker"][1] must be "host:port"'),
        (_tf_config(["a:1", "a:99999"], 0), "port in 1-65535"),
        (_tf_config(["a:1", "a:1"], 0), "appears twice"),
        (_tf_config(["a:1", "b:2"], 2), "task index 2 is outside"),
        (json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:2"]}}), "'ps'"),
    ],
)
def test_malformed_tf_config_is_a_value_error_naming_it(raw, message):
    with pytest.raises(ValueError, match="TF_CONFIG") as err:
        distributed.parse_tf_config(raw)
    assert message in str(err.value)


def test_worker_shards_are_disjoint_and_form_the_global_batch():
    examples, _ = data.load_split("digits", "train", image_size_hint=8)

    def view_fn(image, seed):
        return {"student": image}

    def batches(**kwargs):
        ds = data.make_train_dataset(examples, view_fn, 32, seed=3, num_epochs=2, **kwargs)
        return [b["index"].numpy() for b in ds]

    whole = batches()
    shards = [batches(num_shards=2, shard_index=i) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole) == 2 * (1437 // 32)
    for step, batch in enumerate(whole):
        a, b = shards[0][step], shards[1][step]
        assert len(a) == len(b) == 16 and not set(a) & set(b)
        assert sorted(np.concatenate([a, b])) == sorted(batch)
    # Resuming a shard mid-epoch continues with the same batches.
    resumed = batches(num_shards=2, shard_index=1, skip_batches=5)
    np.testing.assert_array_equal(resumed[0], shards[1][5])


def _env(tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    return env


def _train(args, env, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "kd_keras.train", "--strategy=multi_worker", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bad_tf_config_and_a_missing_worker_end_with_one_line(tmp_path):
    common = [f"--workdir={tmp_path}/run", "--method=supervised", "--image_size=8"]
    bad = _train(common, _env("{oops"))
    assert bad.returncode == 2, bad.stderr
    assert "kd_keras.train: error: TF_CONFIG is not valid JSON" in bad.stderr
    assert "Traceback" not in bad.stderr
    # Worker 1 is never started: worker 0 gives up after --multi_worker_timeout, no hang.
    ports = free_ports("127.0.0.1", 2)
    workers = [f"127.0.0.1:{p}" for p in ports]
    alone = _train([*common, "--multi_worker_timeout=3"], _env(_tf_config(workers, 0)))
    assert alone.returncode == 2
    assert "did not form within --multi_worker_timeout=3 s" in alone.stderr
    assert f"no answer from worker 1 ({workers[1]})" in alone.stderr
    assert "Traceback" not in alone.stderr


def test_two_local_workers_train_simreg_to_identical_weights(tmp_path, teacher_file):
    workdir = tmp_path / "run"
    launch = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_keras.launch",
            "--num_workers=2",
            "--max_restarts=0",
            "--",
            f"--workdir={workdir}",
            f"--teacher={teacher_file}",
            "--student=convnet_tiny",
            "--head=mlp2",
            "--image_size=8",
            "--batch_size=32",
            "--epochs=2",
            "--steps_per_epoch=3",
            "--shuffle_buffer=256",
            "--knn_max_train=200",
            "--export=true",
            "--log_images=0",
            "--verbose=2",
            "--multi_worker_timeout=120",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert launch.returncode == 0, launch.stdout[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 6 and 0.0 <= results["knn"]["student"]["knn_top1_k1"] <= 1.0
    # The loss printed by both workers is the same global value (Keras reduces it across them).
    losses = [
        [
            line.split(" loss: ")[1].split()[0]
            for line in launch.stdout.splitlines()
            if line.startswith(f"[worker {i}]") and " loss: " in line
        ]
        for i in range(2)
    ]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    # Only the chief wrote logs, results and the export; each worker kept checkpoints.
    assert sorted(os.listdir(workdir)) == [
        "DONE",
        "checkpoints",
        "config.json",
        "export",
        "logs",
        "results.json",
        "run.lock",
        "worker_1",
    ]
    assert sorted(os.listdir(workdir / "worker_1")) == ["checkpoints", "run.lock"]
    chief = h5_arrays(workdir / "checkpoints" / "ckpt-000000006.weights.h5")
    other = h5_arrays(workdir / "worker_1" / "checkpoints" / "ckpt-000000006.weights.h5")
    assert chief.keys() == other.keys()
    trained = [k for k in chief if "student" in k or "head" in k]
    assert trained
    for key in chief:
        np.testing.assert_array_equal(chief[key], other[key], err_msg=key)
    assert tf.io.gfile.exists(str(workdir / "export" / "saved_model"))
