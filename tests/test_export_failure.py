"""A full disk while exporting after training (issue 22): the run still writes results.json
and DONE, records and says why the export is missing, and leaves no half-written export."""

import errno
import json
import os

from kd_keras.artifacts import export
from kd_keras.training import run as train
from tests.test_resume_guard import _cfg


def test_enospc_during_export_still_finishes_the_run(tmp_path, teacher_file, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "export"))

    monkeypatch.setattr(export, "export_backbone", full_disk)
    cfg = _cfg(tmp_path / "run", teacher_file, export=True)
    results = train.run(cfg)
    assert results["export"] is None and "No space left on device" in results["export_error"]
    run = tmp_path / "run"
    assert json.loads((run / "results.json").read_text())["export_error"] == results["export_error"]
    assert (run / "DONE").exists() and not (run / "export").exists()
    assert (
        "kd_keras.train: export failed: [Errno 28] No space left on device"
        in capsys.readouterr().err
    )
    assert results["steps"] == 4 and os.path.isdir(run / "checkpoints")
