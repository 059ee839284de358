"""kd_keras.experiment: a two-variant spec on digits end to end, skip, resume, spec errors."""

import csv
import json
import os
import subprocess
import sys

import pytest

from kd_keras.experiments import runner as experiment
from kd_keras.experiments import spec as experiment_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fastest settings of tests/test_train.py: digits at 8 px, convnet_tiny, a few steps.
BASE = """\
--method=simreg
--dataset=digits
--image_size=8
--student=convnet_tiny
--batch_size=32
--epochs=2
--steps_per_epoch=2
--lr=0.4
--log_images=0
--knn_k=1
--export=false
--knn_monitor_every=1
--knn_monitor_max_train=100
--knn_monitor_max_test=50
"""

SPEC = """\
# two heads
[experiment]
title = heads on digits
base = {base}
protocols =
metric = train_knn/top1_k1

[scale cpu]
--teacher={teacher}

[variant lin]
--head=linear

[variant mlp]
--head=mlp4
--lr=0.2
"""


def _env():
    return dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")


def _experiment(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "kd_keras.experiment", *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600,
    )


def _commands(workdir):
    with open(os.path.join(workdir, experiment.COMMANDS_LOG)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_file):
    """Both variants of the spec run once; returns (spec path, workdir, first output)."""
    root = tmp_path_factory.mktemp("exp")
    (root / "base.cfg").write_text(BASE)
    spec = root / "heads.cfg"
    spec.write_text(SPEC.format(base=root / "base.cfg", teacher=teacher_file))
    workdir = root / "work"
    out = _experiment(f"--spec={spec}", f"--workdir={workdir}", cwd=root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return str(spec), str(workdir), out


@pytest.mark.slow
def test_runs_both_variants_and_writes_the_report(finished):
    spec, workdir, out = finished
    assert "variant 1/2 lin (0 done, 2 left)" in out.stdout
    assert "variant 2/2 mlp (1 done, 1 left)" in out.stdout
    trains = [c for c in _commands(workdir) if c["kind"] == "train"]
    assert [c["name"] for c in trains] == ["lin", "mlp"]
    assert all(c["exit_code"] == 0 for c in trains)
    for name in ("lin", "mlp"):
        results = json.load(open(os.path.join(workdir, "runs", name, "results.json")))
        assert results["steps"] == 4
    with open(os.path.join(workdir, "report.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["lin", "mlp"]
    # The report's numbers are the runs' own, and each row carries its exact command.
    lin = json.load(open(os.path.join(workdir, "runs", "lin", "results.json")))
    assert float(rows[0]["train_knn/top1_k1"]) == pytest.approx(lin["knn"]["student"]["knn_top1_k1"])
    assert "--head=linear" in rows[0]["command"] and "--lr=0.2" in rows[1]["command"]
    assert rows[0]["command"] == trains[0]["command"]
    report = open(os.path.join(workdir, "report.md")).read()
    assert "| lin | backbone |" in report and f"`{trains[1]['command']}`" in report
    for png in ("knn_curves.png", "metric_bars.png"):
        with open(os.path.join(workdir, "plots", png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    sessions = sorted(os.listdir(os.path.join(workdir, "hparams")))
    assert [s for s in sessions if not s.startswith("events")] == ["lin", "mlp"]
    assert _plugins(os.path.join(workdir, "hparams", "lin")) >= {"hparams", "scalars"}
    assert "hparams" in _plugins(os.path.join(workdir, "hparams"))  # the dashboard's config


def _plugins(logdir):
    """Names of the TensorBoard plugins whose summaries the event files in `logdir` hold."""
    import tensorflow as tf

    names = set()
    for name in os.listdir(logdir):
        if name.startswith("events.out"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
                for value in event.summary.value:
                    names.add(value.metadata.plugin_data.plugin_name or "scalars")
    return names


@pytest.mark.slow
def test_second_invocation_skips_finished_and_resumes_interrupted_variant(finished):
    spec, workdir, _ = finished
    run = os.path.join(workdir, "runs", "mlp")
    # mlp as if killed after its first epoch's checkpoint: no results, no DONE, no step-4
    # state; lin is finished and must not start any process.
    ckpts = os.path.join(run, "checkpoints")
    for name in ("results.json", "DONE", "checkpoints/checkpoint.json"):
        if os.path.exists(os.path.join(run, name)):
            os.remove(os.path.join(run, name))
    assert sorted(os.listdir(ckpts)) == ["ckpt-000000002.weights.h5", "ckpt-000000004.weights.h5"]
    os.remove(os.path.join(ckpts, "ckpt-000000004.weights.h5"))
    before = len(_commands(workdir))
    out = _experiment(f"--spec={spec}", f"--workdir={workdir}", cwd=os.path.dirname(spec))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train lin: finished earlier, skipped" in out.stdout
    assert "variant 2/2 mlp (1 done, 1 left)" in out.stdout
    new = _commands(workdir)[before:]
    assert [(c["kind"], c["name"]) for c in new] == [("train", "mlp")]
    assert "resumed from" in out.stderr and "(step 2)" in out.stderr
    results = json.load(open(os.path.join(run, "results.json")))
    assert results["steps"] == 4
    # The k-NN curve keeps epoch 1 from before the interruption.
    monitor = json.load(open(os.path.join(run, "knn_monitor.json")))
    assert [e["epoch"] for e in monitor] == [1, 2]
    # Now everything is finished: a third invocation starts nothing at all.
    again = _experiment(f"--spec={spec}", f"--workdir={workdir}", cwd=os.path.dirname(spec))
    assert again.returncode == 0 and len(_commands(workdir)) == before + 1
    assert again.stdout.count("finished earlier, skipped") == 2
    assert "variant 2/2 mlp (2 done, 0 left)" in again.stdout


def test_changed_variant_is_refused_not_mixed(finished, tmp_path):
    spec, workdir, _ = finished
    plans = experiment.Planner(experiment_spec.read_spec(spec), workdir, "cpu").plan()
    changed = experiment.Job(
        "train", "lin", "kd_keras.train", (*plans[0].train.args[:-1], "--lr=0.3",
                                           plans[0].train.args[-1]), plans[0].train.out
    )
    with pytest.raises(ValueError, match="started by another command"):
        experiment.check_run_command(changed)
    experiment.check_run_command(plans[0].train)  # the recorded command itself is fine


def _spec_file(tmp_path, text, base="--dataset=digits\n--method=simreg\n"):
    (tmp_path / "base.cfg").write_text(base)
    path = tmp_path / "bad.cfg"
    path.write_text(text.format(base=tmp_path / "base.cfg"))
    return str(path)


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("[experiment]\nbase = {base}\ncolour = red\n[variant a]\n", 3, "unknown key 'colour'"),
        ("[experiment]\nbase = {base}\n[variant]\n--head=linear\n", 3, "needs exactly one name"),
        ("[experiment]\nbase = {base}\n[variant a]\n--head=linear\n--hed=mlp4\n", 5,
         "kd_keras.train has no flag --hed"),
        ("[experiment]\nbase = {base}\n[variant a]\n--workdir=/x\n", 4, "set by the experiment"),
        ("[experiment]\nbase = {base}\n[variant a]\n--head=mlp3\n", 3, "--head"),
        ("[experiment]\nbase = {base}\n[variant a]\n--teacher=teacher:big\n", 3,
         "no [teacher big] section"),
        ("[experiment]\nbase = {base}\n[variant a]\n[variant a]\n", 4, "defined twice"),
        ("[experiment]\nbase = {base}\nprotocols = knn,probe\n[variant a]\n", 3, "probe"),
        ("[experiment]\nbase = {base}\nevaluate = --knn_votes=x --foo=1\n[variant a]\n", 3,
         "kd_keras.evaluate has no flag --foo"),
    ],
)
def test_spec_errors_name_file_and_line(tmp_path, text, line, message):
    path = _spec_file(tmp_path, text)
    with pytest.raises(experiment_spec.SpecError) as err:
        spec = experiment_spec.read_spec(path)
        experiment.Planner(spec, str(tmp_path / "w"), "cpu").plan()
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert message in str(err.value)


def test_cli_spec_error_is_one_line_exit_2(tmp_path):
    path = _spec_file(tmp_path, "[experiment]\nbase = {base}\n[variant a]\n--hed=mlp4\n")
    out = _experiment(f"--spec={path}", f"--workdir={tmp_path}/w", "--dry_run", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"kd_keras.experiment: error: {path}:4: [variant a]: kd_keras.train has no flag --hed."
    )


def test_variants_share_one_teacher_and_cache_per_view_setting(tmp_path):
    base = "--method=simreg\n--dataset=digits\n--teacher=recipe:supervised\n--image_size=8\n"
    text = (
        "[experiment]\nbase = {base}\ncache_epochs = 2\n"
        "[variant a]\n--head=linear\n[variant b]\n--head=mlp4\n"
        "[variant c]\n--augment=strong\n[variant d]\n--teacher_recipe_epochs=3\n"
    )
    spec = experiment_spec.read_spec(_spec_file(tmp_path, text, base))
    plans = {p.name: p for p in experiment.Planner(spec, str(tmp_path / "w"), "cpu").plan()}
    teacher = {n: [j.out for j in p.needs if j.kind == "teacher"] for n, p in plans.items()}
    cache = {n: [j.out for j in p.needs if j.kind == "cache"] for n, p in plans.items()}
    # The head and the augmentation are the student's: one teacher for a, b, c ...
    assert teacher["a"] == teacher["b"] == teacher["c"] and len(teacher["a"]) == 1
    assert teacher["d"] != teacher["a"]  # ... a recipe flag makes another teacher.
    # Caches are per teacher and views: c's strong views need their own.
    assert cache["a"] == cache["b"] and cache["c"] != cache["a"] and cache["d"] != cache["a"]
    args = plans["b"].train.args
    assert f"--teacher={teacher['a'][0]},name=recipe_supervised" in args
    assert f"--teacher_cache={cache['a'][0]}" in args
    assert len(experiment.shared_jobs(list(plans.values()))) == 2 + 3
    teacher_job = next(j for j in plans["a"].needs if j.kind == "teacher")
    assert "--method=supervised" in teacher_job.args and "--head=linear" not in teacher_job.args


def test_sigterm_to_the_runner_reaches_the_step_and_its_exit_code_returns(tmp_path):
    import signal
    import threading
    import time

    ready = tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
        f"pathlib.Path({str(ready)!r}).write_text('x')\n"
        "time.sleep(30)\n"
    )

    def terminate_when_ready():
        for _ in range(300):
            if ready.exists():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_when_ready, daemon=True).start()
    start = time.time()
    assert experiment.run_forwarding_signals([sys.executable, "-c", child]) == 75
    assert time.time() - start < 20
    assert signal.getsignal(signal.SIGTERM) == before  # the runner's own handler is back


def test_a_second_runner_on_one_workdir_is_refused_in_one_line(tmp_path):
    from kd_keras.training import runlock

    base = "--dataset=digits\n--method=supervised\n--image_size=8\n"
    path = _spec_file(tmp_path, "[experiment]\nbase = {base}\n[variant a]\n--lr=0.2\n", base)
    workdir = tmp_path / "w"
    with runlock.hold(str(workdir), lock_file=experiment.LOCK_FILE, what="experiment runner"):
        out = _experiment(f"--spec={path}", f"--workdir={workdir}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kd_keras.experiment: error: --workdir={workdir} is in use by "
                           f"another experiment runner (pid {os.getpid()} on ")  # fmt: skip
    assert sorted(os.listdir(workdir)) == [experiment.LOCK_FILE]  # no job was started


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_killed_runner_takes_its_step_with_it(tmp_path):
    import signal
    import time

    pidfile = tmp_path / "child.pid"
    step = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(pidfile)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    runner_code = (
        "import sys\nfrom kd_keras.experiments import runner\n"
        f"runner.run_forwarding_signals([sys.executable, '-c', {step!r}])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", runner_code], env=_env())
    for _ in range(600):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    child = int(pidfile.read_text())
    assert _alive(child)
    assert os.getpgid(child) == os.getpgid(proc.pid)  # the runner's process group
    proc.send_signal(signal.SIGKILL)  # nothing the runner could forward
    proc.wait()
    for _ in range(200):
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child)
