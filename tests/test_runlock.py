"""One run per workdir (kd_keras.runlock): the lock, its holder in the message, stale locks,
and workdirs that are files or not writable (issue 11)."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from kd_keras.training import runlock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Loads runlock.py by path: importing the kd_keras package would import TensorFlow (seconds).
HOLDER = (
    "import importlib.util, sys, time\n"
    "spec = importlib.util.spec_from_file_location('runlock', sys.argv[2])\n"
    "runlock = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(runlock)\n"
    "with runlock.hold(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def _env():
    return dict(os.environ, PYTHONPATH=REPO)


@pytest.fixture
def holder(tmp_path):
    """A process that holds the lock of tmp_path/run until killed."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir), runlock.__file__],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc, str(workdir)
    proc.kill()
    proc.wait()


def test_second_run_fails_at_once_naming_the_holder(holder):
    proc, workdir = holder
    with pytest.raises(runlock.WorkdirError, match=rf"in use by another run \(pid {proc.pid} on "):
        with runlock.hold(workdir):
            pass


@pytest.mark.slow
def test_train_command_line_reports_the_holder_in_one_line(holder):
    proc, workdir = holder
    cmd = [
        sys.executable,
        "-m",
        "kd_keras.train",
        f"--workdir={workdir}",
        "--method=supervised",
        "--student=resnet_tiny",
        "--epochs=1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("kd_keras.train: error: --workdir=") and f"pid {proc.pid}" in last
    assert not os.path.exists(os.path.join(workdir, "config.json"))  # nothing written


def test_lock_of_a_killed_process_is_taken_over(holder):
    proc, workdir = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    path = os.path.join(workdir, runlock.LOCK_FILE)
    assert runlock.read_holder(path)["pid"] == proc.pid  # the dead holder's record is still there
    with runlock.hold(workdir):
        assert runlock.read_holder(path)["pid"] == os.getpid()


def test_lock_is_released_after_the_run(tmp_path):
    with runlock.hold(str(tmp_path)) as path:
        assert runlock.read_holder(path)["pid"] == os.getpid()
    assert runlock.read_holder(path) == {}
    with runlock.hold(str(tmp_path)):  # the same process may run again in the same workdir
        pass


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "run"
    path.write_text("x")
    with pytest.raises(runlock.WorkdirError, match="is a file"):
        runlock.prepare_workdir(str(path))
    with pytest.raises(runlock.WorkdirError, match="cannot be created"):
        runlock.prepare_workdir(str(path / "sub"))


def test_workdir_without_write_permission_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root ignores chmod
    with pytest.raises(runlock.WorkdirError, match="is not writable"):
        runlock.prepare_workdir(str(tmp_path))


def test_workdir_on_a_read_only_mount_is_refused(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a read-only tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mount is not permitted here")
    try:
        with pytest.raises(runlock.WorkdirError, match="cannot be created: Read-only"):
            runlock.prepare_workdir(str(mount / "run"))
        with pytest.raises(runlock.WorkdirError, match="is not writable"):
            with runlock.hold(str(mount)):
                pass
    finally:
        subprocess.run(["umount", str(mount)], check=True)
