"""Fair comparisons in kd_keras.experiment: seeds, a sweep selected on a held-out part of the
train split, and the report's mean ± 95 % interval (issue 21, item 4)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kd_keras.data import holdout
from kd_keras.experiments import report as report_lib
from kd_keras.experiments import runner as runner_lib
from kd_keras.experiments import spec as spec_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
--knn_monitor_every=0
"""

SPEC = """\
[experiment]
title = fair
base = {base}
protocols =
seeds = {seeds}
holdout = 20
select = train_knn/top1_k1

[scale cpu]
--teacher={teacher}

{sweep}
[variant lin]
--head=linear
"""

SWEEP = """\
[sweep]
--lr=0.05,0.8
--epochs=1
"""


def _spec(tmp_path, teacher="/no/teacher.keras", seeds=1, sweep=SWEEP):
    (tmp_path / "base.cfg").write_text(BASE)
    path = tmp_path / "fair.cfg"
    path.write_text(SPEC.format(base=tmp_path / "base.cfg", teacher=teacher, seeds=seeds,
                                sweep=sweep))
    return str(path)


# --- the held-out part -----------------------------------------------------------------------


def test_holdout_is_stratified_disjoint_and_stable():
    labels = np.repeat(np.arange(4), [10, 20, 3, 1])
    names = [f"class{c}/img{i}.jpg" for i, c in enumerate(labels)]
    held = holdout.select("holdout", labels, names, 20)
    rest = holdout.select("rest", labels, names, 20)
    assert sorted([*held, *rest]) == list(range(len(labels)))
    counts = np.bincount(labels[held], minlength=4)
    # round(20 % of 10, 20, 3) = 2, 4, 1 (at least one); a class of one example stays in training.
    assert counts.tolist() == [2, 4, 1, 0]
    # Names decide, not positions: the same files held out after a reorder.
    order = np.random.default_rng(0).permutation(len(labels))
    again = holdout.select("holdout", labels[order], [names[i] for i in order], 20)
    assert sorted(names[order[i]] for i in again) == sorted(names[i] for i in held)


@pytest.mark.parametrize("split", ["train@holdout0", "train@holdout91", "train@half10", "@rest5"])
def test_malformed_parts_are_one_clear_error(split):
    with pytest.raises(ValueError, match="<split>@holdout<P>"):
        holdout.parse_split(split)


def test_digits_parts_partition_the_train_split():
    from kd_keras.data import sources

    def labels(split):
        examples, info = sources.load_split("digits", split, image_size_hint=8)
        return info, np.array([e["label"] for e in examples.as_numpy_iterator()])

    full_info, full = labels("train")
    held_info, held = labels("train@holdout10")
    rest_info, rest = labels("train@rest10")
    assert held_info.num_examples + rest_info.num_examples == full_info.num_examples
    assert held_info.split == "train@holdout10"
    np.testing.assert_array_equal(np.bincount(held) + np.bincount(rest), np.bincount(full))
    assert np.bincount(held).min() >= 13  # every class, about 10 %


# --- the interval -----------------------------------------------------------------------------


def test_interval_matches_the_t_formula():
    values = [0.61, 0.65, 0.58]
    mean, std, half = report_lib.interval(values)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    # t_{0.975, 2} = 4.302652729749464 (tables); half-width = t * s / sqrt(n).
    assert half == pytest.approx(4.302652729749464 * np.std(values, ddof=1) / np.sqrt(3))
    assert report_lib.interval([0.5]) == (0.5, None, None)


# --- spec and plan ----------------------------------------------------------------------------


def test_sweep_grid_and_plan(tmp_path):
    spec = spec_lib.read_spec(_spec(tmp_path, seeds=3))
    assert (spec.seeds, spec.holdout, spec.select) == (3, 20, "train_knn/top1_k1")
    candidates, budget = spec.sweep_grid()
    assert candidates == [("--lr=0.05",), ("--lr=0.8",)] and budget == ("--epochs=1",)
    planner = runner_lib.Planner(spec, str(tmp_path / "w"), "cpu")
    sweep = planner.sweep(spec.variants["lin"])
    args = sweep[1].train.args
    # The candidate and budget win over the base (later flags win), the reported split is
    # never used: training on the rest, k-NN on the held-out part.
    assert args[-5:-1] == (
        "--epochs=1", "--lr=0.8", "--train_split=train@rest20", "--eval_split=train@holdout20")
    assert args[-1].startswith("--workdir=")
    assert sweep[1].train.out.endswith(os.path.join("runs", "lin", "sweep", "lr=0.8"))
    plans = planner.plan({"lin": ("--lr=0.8",)})
    assert [p.name for p in plans] == ["lin/seed0", "lin/seed1", "lin/seed2"]
    assert [p.train.args[-2] for p in plans] == ["--seed=0", "--seed=1", "--seed=2"]
    assert all("--lr=0.8" in p.train.args for p in plans)
    assert {p.variant for p in plans} == {"lin"} and plans[0].selected == ("--lr=0.8",)


@pytest.mark.parametrize(
    "sweep, message",
    [
        ("[sweep]\n--epochs=1\n", "has no line with several values"),
        ("[sweep]\n--knn_k=1,20\n", "list flag and cannot be swept"),
        ("[sweep]\n--seed=1,2\n", "set by the runner during a sweep"),
        ("[sweep]\n--no_such_flag=1,2\n", "has no flag --no_such_flag"),
    ],
)
def test_sweep_errors_name_the_line(tmp_path, sweep, message):
    with pytest.raises(spec_lib.SpecError, match=message) as err:
        spec_lib.read_spec(_spec(tmp_path, sweep=sweep))
    assert str(err.value).startswith(str(tmp_path / "fair.cfg") + ":")


def test_selection_takes_the_best_held_out_value_and_records_it(tmp_path):
    spec = spec_lib.read_spec(_spec(tmp_path))
    sweep = runner_lib.Planner(spec, str(tmp_path / "w"), "cpu").sweep(spec.variants["lin"])
    for plan, value in zip(sweep, (0.7, 0.9), strict=True):
        os.makedirs(plan.train.out)
        results = {"steps": 2, "knn": {"student": {"knn_top1_k1": value}}}
        json.dump(results, open(os.path.join(plan.train.out, "results.json"), "w"))
        open(os.path.join(plan.train.out, "DONE"), "w").close()
    chosen, record = runner_lib.select_candidate(sweep, "train_knn/top1_k1")
    assert chosen == ("--lr=0.8",) and record["value"] == 0.9
    saved = json.load(open(os.path.join(tmp_path, "w", "runs", "lin", "sweep", "selected.json")))
    assert saved["candidates"] == [{"flags": ["--lr=0.05"], "value": 0.7},
                                   {"flags": ["--lr=0.8"], "value": 0.9}]
    assert runner_lib.recorded_selection(sweep) == ("--lr=0.8",)
    # A later `--only=other` invocation chose nothing for "lin": the report still shows its lr.
    planner = runner_lib.Planner(spec, str(tmp_path / "w"), "cpu")
    assert runner_lib.report_selections(spec, planner, {})["lin"] == ("--lr=0.8",)
    assert runner_lib.report_selections(spec, planner, {"lin": ("--lr=0.05",)})["lin"] == (
        "--lr=0.05",
    )
    with pytest.raises(ValueError, match="no 'train_knn/top5_k1'"):
        runner_lib.select_candidate(sweep, "train_knn/top5_k1")


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_then_seeds_end_to_end(tmp_path, teacher_file):
    spec = _spec(tmp_path, teacher=teacher_file, seeds=2)
    workdir = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        [sys.executable, "-m", "kd_keras.experiment", f"--spec={spec}", f"--workdir={workdir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    selected = json.load(open(workdir / "runs" / "lin" / "sweep" / "selected.json"))
    assert len(selected["candidates"]) == 2
    sweep_run = json.load(open(workdir / "runs" / "lin" / "sweep" / "lr=0.05" / "results.json"))
    assert sweep_run["train_split"] == "train@rest20" and sweep_run["eval_split"] == "train@holdout20"
    assert sweep_run["steps"] == 2  # the sweep's own budget: one epoch
    for i in (0, 1):
        run = json.load(open(workdir / "runs" / "lin" / f"seed{i}" / "results.json"))
        assert run["steps"] == 4 and run["eval_split"] != "train@holdout20"
    with open(workdir / "report_summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["n"] == "2" and row["selected"] == " ".join(selected["selected"])
    seeds = [json.load(open(workdir / "runs" / "lin" / f"seed{i}" / "results.json"))
             ["knn"]["student"]["knn_top1_k1"] for i in (0, 1)]
    assert float(row["train_knn/top1_k1"]) == pytest.approx(np.mean(seeds))
    assert "95 % interval" in open(workdir / "report.md").read()
