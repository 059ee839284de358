"""--strategy=multi_worker: TF_CONFIG checks, data sharding, and 2 local worker processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from kd_keras.data import sources as data
from kd_keras.training import distributed
from kd_keras.training.launcher import free_ports
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


@pytest.mark.slow
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


def _launch_cmd(workdir, teacher_file, max_restarts, *extra):
    return [
        sys.executable,
        "-m",
        "kd_keras.launch",
        "--num_workers=2",
        f"--max_restarts={max_restarts}",
        "--",
        f"--workdir={workdir}",
        f"--teacher={teacher_file}",
        "--student=convnet_tiny",
        "--head=mlp2",
        "--image_size=8",
        "--batch_size=32",
        "--epochs=3",
        "--steps_per_epoch=6",
        "--save_freq=2",
        "--shuffle_buffer=256",
        "--knn_max_train=200",
        "--export=true",
        "--log_images=0",
        "--verbose=2",
        "--multi_worker_timeout=120",
        *extra,
    ]


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, teacher_file):
    """An uninterrupted 2-worker run (18 steps): (workdir, launcher output)."""
    workdir = tmp_path_factory.mktemp("mw") / "run"
    launch = subprocess.run(
        _launch_cmd(workdir, teacher_file, 0),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert launch.returncode == 0, launch.stdout[-3000:]
    return workdir, launch


@pytest.mark.slow
def test_launch_runs_a_preset_flagfile_as_a_multi_worker_run(tmp_path, teacher_file):
    """flags/simreg.cfg includes flags/common.cfg's --strategy=auto: the launcher's
    --strategy=multi_worker must still win (it comes after the user's flags)."""
    workdir = tmp_path / "preset"
    launch = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_keras.launch",
            "--num_workers=2",
            "--max_restarts=0",
            "--",
            "--flagfile=flags/simreg.cfg",
            f"--workdir={workdir}",
            f"--teacher={teacher_file}",
            "--student=convnet_tiny",
            "--head=mlp2",
            "--image_size=8",
            "--batch_size=32",
            "--epochs=1",
            "--warmup_epochs=0",
            "--steps_per_epoch=2",
            "--knn_max_train=100",
            "--evaluate=false",
            "--jit_compile=false",
            "--export=false",
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
    assert json.loads((workdir / "config.json").read_text())["strategy"] == "multi_worker"
    assert (workdir / "worker_1" / "checkpoints").is_dir()
    assert "workdir in use" not in launch.stdout


@pytest.mark.slow
def test_two_local_workers_train_simreg_to_identical_weights(two_worker_run):
    workdir, launch = two_worker_run
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 18 and 0.0 <= results["knn"]["student"]["knn_top1_k1"] <= 1.0
    # The loss printed by both workers is the same global value (Keras reduces it across them).
    losses = [
        [
            line.split(" loss: ")[1].split()[0]
            for line in launch.stdout.splitlines()
            if line.startswith(f"[worker {i}]") and " loss: " in line
        ]
        for i in range(2)
    ]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
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
    chief = h5_arrays(workdir / "checkpoints" / "ckpt-000000018.weights.h5")
    other = h5_arrays(workdir / "worker_1" / "checkpoints" / "ckpt-000000018.weights.h5")
    assert chief.keys() == other.keys()
    trained = [k for k in chief if "student" in k or "head" in k]
    assert trained
    for key in chief:
        np.testing.assert_array_equal(chief[key], other[key], err_msg=key)
    assert tf.io.gfile.exists(str(workdir / "export" / "saved_model"))


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(
    tmp_path, teacher_file, two_worker_run
):
    """kill -9 of worker 1 mid-run: the launcher restarts it, the survivor restarts itself, both
    resume from the newest step they both hold, and the run ends with the uninterrupted run's
    steps and weights; each worker's checkpoints stay in its own directory."""
    import re
    import signal
    import threading
    import time

    straight_dir, _ = two_worker_run
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _launch_cmd(workdir, teacher_file, 2),
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines, pids = [], {}

    def pump():
        for line in proc.stdout:
            lines.append(line)
            match = re.match(r"\[launch\] worker (\d) pid (\d+)", line)
            if match:
                pids[int(match.group(1))] = int(match.group(2))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    own = workdir / "worker_1" / "checkpoints"
    try:
        deadline = time.time() + 300
        while not (1 in pids and os.path.isdir(own) and checkpointing_steps(own)):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.time() < deadline, "worker 1 wrote no checkpoint"
            time.sleep(0.05)
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(timeout=400) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    output = "".join(lines)
    assert "worker 1 exited with -9; restarting it" in output, output[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 18
    for sub in ("checkpoints", os.path.join("worker_1", "checkpoints")):
        names = os.listdir(workdir / sub)
        assert "ckpt-000000018.weights.h5" in names
        assert not [n for n in names if ".tmp" in n or n.startswith("tmp")], names
        a = h5_arrays(straight_dir / sub / "ckpt-000000018.weights.h5")
        b = h5_arrays(workdir / sub / "ckpt-000000018.weights.h5")
        assert a.keys() == b.keys() and a
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


def checkpointing_steps(directory):
    from kd_keras.artifacts import checkpointing

    return checkpointing.available_steps(str(directory))


@pytest.mark.slow
def test_sigterm_to_the_launcher_makes_every_worker_save_the_same_step(tmp_path, teacher_file):
    import signal
    import time

    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _launch_cmd(workdir, teacher_file, 0, "--epochs=40", "--export=false"),
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 300
        while not checkpointing_steps(workdir / "worker_1" / "checkpoints"):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output[-3000:]
    chief = checkpointing_steps(workdir / "checkpoints")[0]
    other = checkpointing_steps(workdir / "worker_1" / "checkpoints")[0]
    assert chief == other < 240, output[-3000:]
    assert f"after step {chief}" in output and "run the same command again" in output
    assert not (workdir / "results.json").exists()
