"""Runs the variants of an experiment spec and writes the report (`kd_keras.experiment`).

    python -m kd_keras.experiment --spec=experiments/simreg_heads.cfg --workdir=runs/heads \
        [--scale=cpu|gpu] [--only=linear,mlp4] [--dry_run] [--teachers_only] [--report_only]

A thin layer over the command lines: every step is a `python -m kd_keras.train`,
`kd_keras.cache_teacher` or `kd_keras.evaluate` subprocess (its output, Keras bar included,
passes through). In order:

1. shared teachers: each distinct recipe / `[teacher NAME]` teacher is trained once in
   `DIR/teachers/<name>-<hash>/` (the hash covers its whole command, so a changed spec gets a
   new teacher instead of a silently stale one);
2. teacher caches (spec `cache_epochs > 0`, methods that take a cache): one cache per teacher
   and view settings in `DIR/caches/<name>-<hash>/`, reused by every variant with the same
   teacher and views;
3. each variant in `DIR/runs/<variant>/`: trained unless finished (DONE marker and a
   results.json with its step count), so an interrupted variant resumes from its checkpoint
   when the runner is started again; then evaluated with the spec's protocols, once per layer,
   in `runs/<variant>/eval_<layer>/` (skipped when its results.json holds every protocol);
4. `DIR/report.md`, `report.csv`, `plots/*.png` and `hparams/` (TensorBoard HParams).

Every command started is appended to `DIR/commands.log` with its wall time and exit code.
Variants are independent processes: run `--teachers_only` once, then `--only=...` on several
machines sharing DIR, then `--report_only` anywhere.
"""

import copy
import ctypes
import dataclasses
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from absl import flags

from kd_keras import config as config_lib
from kd_keras.artifacts.layout import read_json
from kd_keras.experiments import spec as spec_lib
from kd_keras.training import runlock

# Flags that decide the views a teacher cache stores (cache_teacher's own inputs).
VIEW_FLAGS = (
    "dataset", "data_dir", "download", "train_split", "image_size", "augment", "aug_mode",
    "crop_scale_min", "strong_blur", "seed", "cache_decoded", "deterministic",
)
COMMANDS_LOG = "commands.log"
LOCK_FILE = "experiment.lock"
STATE_FILE = "experiment.json"
RUN_COMMAND = "experiment_command.json"


class StepFailed(Exception):
    """A subprocess ended with a non-zero exit code."""

    def __init__(self, job, code):
        super().__init__(f"{job.kind} {job.name} failed with exit code {code}")
        self.job, self.code = job, code


@dataclasses.dataclass(frozen=True)
class Job:
    """One subprocess: `python -m <module> <args>`, finished when `done()` says so."""

    kind: str  # teacher | cache | train | evaluate
    name: str
    module: str
    args: tuple[str, ...]
    out: str  # the directory it writes
    protocols: tuple[str, ...] = ()  # evaluate jobs: what its results.json must hold

    def command(self):
        return ["python", "-m", self.module, *self.args]

    def command_line(self):
        return shlex.join(self.command())

    def done(self):
        if self.kind == "teacher":
            return os.path.isfile(os.path.join(self.out, "DONE"))
        if self.kind == "cache":
            name = self.name.rsplit("-", 1)[0]
            return os.path.isfile(os.path.join(self.out, name, "manifest.json"))
        if self.kind == "train":
            return train_finished(self.out)
        return evaluation_finished(self.out, self.protocols)


@dataclasses.dataclass(frozen=True)
class VariantPlan:
    """What one variant needs (teachers, caches), its training job and its evaluation jobs."""

    name: str  # unique: the variant, "<variant>/seed<i>" or "<variant>/sweep/<candidate>"
    overrides: tuple[str, ...]  # the variant's own flag lines
    needs: tuple[Job, ...]
    train: Job
    evals: tuple[tuple[str, Job], ...]  # (layer, job)
    variant: str = ""  # the spec's variant this run belongs to
    seed_index: int | None = None  # i of "seed<i>" when the spec asks for several seeds
    selected: tuple[str, ...] = ()  # the sweep's flag lines this run trains with


def train_finished(run_dir):
    """True when `run_dir` holds a finished training run (DONE and a complete results.json)."""
    results = read_json(os.path.join(run_dir, "results.json"))
    return os.path.isfile(os.path.join(run_dir, "DONE")) and bool(results) and "steps" in results


def evaluation_finished(eval_dir, protocols):
    results = read_json(os.path.join(eval_dir, "results.json"))
    if not results:
        return False
    have = {rec.get("protocol") for rec in results.get("results", [])}
    return set(protocols) <= have


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _is_teacher_flag(arg):
    return spec_lib.flag_name(arg) == "teacher"


# Distillation flags of the spec's base that a teacher's own run (supervised or SwAV) does not
# read, so config rejects them there; the teacher's command drops them.
_STUDENT_ONLY_FLAGS = ("teacher", "teacher_cache", "head", "head_hidden_dims", "aug_mode")


def _teacher_run_base(base_args):
    """`base_args` with flagfiles inlined, without flags only the distilling student reads
    (--teacher, --head, ... and every method's own flags such as --bank_size)."""
    from kd_keras.methods import registry

    config_lib.define_flags()
    fv = copy.deepcopy(flags.FLAGS)
    fv.unparse_flags()
    dropped = set(_STUDENT_ONLY_FLAGS)
    dropped.update(name for spec in registry.specs() for name in spec.own_flags())
    expanded = config_lib.expand_argv(["kd_keras.train", *base_args], fv)[1:]
    return tuple(a for a in expanded if spec_lib.flag_name(a) not in dropped)


def _digest(parts):
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


# --------------------------------------------------------------------------------------------
# Planning: the spec -> jobs (no subprocess yet; --dry_run prints this plan).


class Planner:
    """Turns a spec into teacher, cache, train and evaluate jobs with shared teachers."""

    def __init__(self, spec, workdir, scale):
        self.spec, self.workdir, self.scale = spec, workdir, scale
        self.base_args = (f"--flagfile={spec.base}", *(f.text for f in spec.scale_flags(scale)))
        # The same without --teacher lines, for commands that set the teachers themselves (a
        # command-line --teacher adds to the other command-line ones).
        self.base_no_teacher = tuple(a for a in self.base_args if not _is_teacher_flag(a))
        self.teacher_base = _teacher_run_base(self.base_args)
        self.jobs = {}  # out directory -> Job, so shared teachers/caches appear once

    def plan(self, selected=None, names=None):
        """One VariantPlan per variant and seed.

        Args:
          selected: {variant: flag lines} chosen by the sweep (absent: none).
          names: the variants to plan (None: all of the spec's).
        """
        plans = []
        for section in self.spec.variants.values():
            if names is None or section.name in names:
                chosen = tuple((selected or {}).get(section.name, ()))
                plans.extend(self._seeds(section, chosen))
        return plans

    def _seeds(self, section, chosen):
        run_dir = os.path.join(self.workdir, "runs", section.name)
        if self.spec.seeds == 1:
            return [self._variant(section, chosen, run_dir, section.name)]
        where = f"{self.spec.path}:{section.line}: [variant {section.name}]"
        own = tuple(f.text for f in section.flags)
        fv, _ = spec_lib.parse_train_flags(
            [*self.base_args, *own, *chosen, f"--workdir={run_dir}"], where
        )
        return [
            self._variant(
                section, (*chosen, f"--seed={fv.seed + i}"), os.path.join(run_dir, f"seed{i}"),
                f"{section.name}/seed{i}", seed_index=i,
            )
            for i in range(self.spec.seeds)
        ]

    def sweep(self, section):
        """The variant's sweep runs: one training per candidate of the [sweep] grid, on
        `<train split>@rest<P>` with its k-NN measured on `<train split>@holdout<P>`."""
        candidates, budget = self.spec.sweep_grid()
        where = f"{self.spec.path}:{section.line}: [variant {section.name}]"
        own = tuple(f.text for f in section.flags)
        fv, _ = spec_lib.parse_train_flags(
            [*self.base_args, *own, f"--workdir={self.workdir}"], where
        )
        percent = self.spec.holdout
        splits = (f"--train_split={fv.train_split}@rest{percent}",
                  f"--eval_split={fv.train_split}@holdout{percent}")
        plans = []
        for candidate in candidates:
            label = candidate_label(candidate)
            run_dir = os.path.join(self.workdir, "runs", section.name, "sweep", label)
            plans.append(self._variant(
                section, (*budget, *candidate, *splits), run_dir,
                f"{section.name}/sweep/{label}", use_caches=False, with_evals=False,
                selected=candidate,
            ))
        return plans

    def _shared(self, job):
        return self.jobs.setdefault(job.out, job)

    def _variant(self, section, extra=(), run_dir=None, name=None, seed_index=None,
                 use_caches=True, with_evals=True, selected=None):
        """The plan of one training of `section` with the flag lines `extra` on top (sweep
        values, seed); the variant's teachers come from its own lines only, so every seed and
        sweep candidate distils the same teacher."""
        where = f"{self.spec.path}:{section.line}: [variant {section.name}]"
        own = tuple(f.text for f in section.flags)
        run_dir = run_dir or os.path.join(self.workdir, "runs", section.name)
        name = name or section.name
        fv, cfg = spec_lib.parse_train_flags(
            [*self.base_args, *own, *extra, f"--workdir={run_dir}"], where
        )
        needs, teachers = [], []
        for raw in fv.teacher if cfg.method in config_lib.TEACHER_METHODS else ():
            resolved, job = self._teacher(raw, fv, own, where)
            teachers.append(resolved)
            if job is not None:
                needs.append(job)
        caches = []
        if use_caches and self.spec.cache_epochs and cfg.method in config_lib.CACHE_METHODS:
            for resolved in teachers:
                job = self._cache(resolved, fv, (*own, *extra))
                needs.append(job)
                caches.append(f"--teacher_cache={job.out}")
        base = self.base_args
        kept = list(own)
        if teachers:
            base = self.base_no_teacher
            kept = [a for a in own if not _is_teacher_flag(a)]
            kept += [f"--teacher={t}" for t in teachers]
        args = (*base, *kept, *caches, *extra, f"--workdir={run_dir}")
        train = Job("train", name, "kd_keras.train", args, run_dir)
        evals = self._evals(name, run_dir) if with_evals else ()
        chosen = tuple(selected if selected is not None else
                       (a for a in extra if not a.startswith("--seed=")))
        return VariantPlan(name, own, tuple(needs), train, evals, variant=section.name,
                           seed_index=seed_index, selected=chosen)

    def _teacher(self, raw, fv, own, where):
        """(the --teacher value the variant gets, the Job that trains it or None).

        oss_offline reads its teacher's networks/ folder from a bare run directory, so it gets
        the directory without options.
        """
        location, _, options = raw.partition(",")
        if location.startswith(spec_lib.TEACHER_PREFIX):
            name = location[len(spec_lib.TEACHER_PREFIX):]
            if name not in self.spec.teachers:
                raise spec_lib.SpecError(
                    f"{where}: --teacher={raw}: the spec has no [teacher {name}] section."
                )
            job = self._named_teacher(self.spec.teachers[name])
        elif location.startswith("recipe:"):
            recipe = location.split(":", 1)[1]
            if recipe != "supervised":
                raise spec_lib.SpecError(f"{where}: --teacher={raw}: unknown recipe {recipe!r}.")
            name = f"recipe_{recipe}"
            job = self._recipe_teacher(fv, own, where)
        else:
            return raw, None
        if fv.method == "oss_offline":
            return job.out, job
        if "name=" not in options:
            options = ",".join(p for p in (options, f"name={name}") if p)
        return f"{job.out},{options}", job

    def _recipe_teacher(self, fv, own, where):
        """The supervised run that `recipe:supervised` means (as kd_keras.train would train it)."""
        epochs = fv.teacher_recipe_epochs
        teacher_own = [a for a in own if spec_lib.flag_name(a) in spec_lib.RECIPE_TEACHER_FLAGS]
        own_args = [
            *teacher_own,
            "--method=supervised",
            f"--student={fv.teacher_recipe_backbone}",
            f"--epochs={epochs}",
            f"--lr={fv.teacher_recipe_lr}",
            f"--warmup_epochs={min(fv.warmup_epochs, epochs - 1)}",
            "--export=true",
        ]
        return self._teacher_job("recipe_supervised", own_args, where)

    def _named_teacher(self, section):
        """A `[teacher NAME]` section: a supervised run unless it sets --method (e.g. swav)."""
        where = f"{self.spec.path}:{section.line}: [teacher {section.name}]"
        own = [f.text for f in section.flags]
        method = [] if any(spec_lib.flag_name(a) == "method" for a in own) else [
            "--method=supervised"
        ]
        return self._teacher_job(section.name, [*method, *own, "--export=true"], where)

    def _teacher_job(self, name, own_args, where):
        """The teacher's run: the base's flags a teacher reads, then `own_args`.

        Its directory is named by the digest of the base's own arguments (its flagfile name,
        not its inlined lines) and `own_args`, so teachers trained before still match."""
        key = f"{name}-{_digest([*self.base_no_teacher, *own_args])}"
        out = os.path.join(self.workdir, "teachers", key)
        args = (*self.teacher_base, *own_args, f"--workdir={out}")
        spec_lib.parse_train_flags(list(args), where)  # the teacher's own command must parse
        return self._shared(Job("teacher", key, "kd_keras.train", args, out))

    def _cache(self, teacher, fv, own):
        # The cache's views follow the run's view flags (--seed among them), so each seed of a
        # variant gets its own cache.
        name = teacher.partition("name=")[2].split(",")[0] or f"t{len(self.jobs)}"
        views = [f"--{flag}={fv[flag].value}" for flag in VIEW_FLAGS]
        key = _digest([teacher, *views, str(self.spec.cache_epochs)])
        out = os.path.join(self.workdir, "caches", f"{name}-{key}")
        view_own = [a for a in own if spec_lib.flag_name(a) in VIEW_FLAGS]
        args = (
            *self.base_no_teacher, *view_own, f"--teacher={teacher}", f"--cache_dir={out}",
            f"--cache_epochs={self.spec.cache_epochs}",
        )
        return self._shared(Job("cache", f"{name}-{key}", "kd_keras.cache_teacher", args, out))

    def _evals(self, name, run_dir):
        if not self.spec.protocols:
            return ()
        extra = [t for fl in self.spec.evaluate_flags for t in shlex.split(fl.text)]
        evals = []
        for layer in self.spec.layers:
            eval_dir = os.path.join(run_dir, f"eval_{layer.replace('/', '_')}")
            args = (
                f"--model={run_dir}",
                f"--protocols={','.join(self.spec.protocols)}",
                f"--eval_layer={layer}",
                f"--eval_dir={eval_dir}",
                *extra,
            )
            job = Job("evaluate", f"{name}/{layer}", "kd_keras.evaluate", args, eval_dir,
                      protocols=self.spec.protocols)
            evals.append((layer, job))
        return tuple(evals)


def candidate_label(candidate):
    """A directory-safe name of a sweep candidate: ("--lr=0.4", "--wd=1e-5") -> "lr=0.4_wd=1e-5"."""
    text = "_".join(a.lstrip("-") for a in candidate) or "default"
    return "".join(c if c.isalnum() or c in "=._-" else "-" for c in text)


SELECTED_FILE = "selected.json"


def select_candidate(sweep_plans, metric):
    """The sweep candidate with the highest `metric` (a report column of training's results,
    e.g. "train_knn/top1_k20": k-NN on the held-out part); the first listed wins a tie.

    Writes `<variant>/sweep/selected.json` (every candidate's value and the choice) and returns
    (the chosen flag lines, the record). Candidates that did not finish are left out.

    Raises:
      ValueError: no candidate finished, or a finished one lacks `metric`.
    """
    from kd_keras.experiments import report

    scored = []
    for plan in sweep_plans:
        if not plan.train.done():
            continue
        columns = report.train_columns(read_json(os.path.join(plan.train.out, "results.json")))
        if metric not in columns:
            raise ValueError(
                f"sweep run {plan.train.out} has no '{metric}' in its results.json; set "
                f"'select' in [experiment] to one of {sorted(columns)}."
            )
        scored.append((columns[metric], plan))
    if not scored:
        raise ValueError(f"no sweep run of variant {sweep_plans[0].variant} finished.")
    best_value, best = max(scored, key=lambda s: s[0])  # max keeps the first of equals
    record = {
        "metric": metric,
        "candidates": [{"flags": list(p.selected), "value": v} for v, p in scored],
        "selected": list(best.selected),
        "value": best_value,
    }
    write_json(os.path.join(os.path.dirname(best.train.out), SELECTED_FILE), record)
    return best.selected, record


def recorded_selection(sweep_plans):
    """The selection an earlier invocation wrote, or None."""
    if not sweep_plans:
        return None
    path = os.path.join(os.path.dirname(sweep_plans[0].train.out), SELECTED_FILE)
    record = read_json(path)
    return tuple(record["selected"]) if record else None


def report_selections(spec, planner, chosen):
    """{variant: flag lines} for the report: this invocation's choices, and for the variants it
    did not run (--only) the ones their earlier sweeps recorded, so every row shows its lr."""
    if not spec.sweep:
        return chosen
    recorded = {n: recorded_selection(planner.sweep(v)) for n, v in spec.variants.items()}
    return {**{n: s for n, s in recorded.items() if s}, **chosen}


def shared_jobs(plans):
    """Teacher jobs first, then cache jobs, each once, in the order variants need them."""
    seen, ordered = set(), []
    for kind in ("teacher", "cache"):
        for plan in plans:
            for job in plan.needs:
                if job.kind == kind and job.out not in seen:
                    seen.add(job.out)
                    ordered.append(job)
    return ordered


# --------------------------------------------------------------------------------------------
# Running.


class Runner:
    """Starts the jobs as subprocesses, logs them, reports progress."""

    def __init__(self, spec, workdir):
        self.spec, self.workdir = spec, workdir
        self.prefix = f"[experiment {spec.name}]"

    def say(self, text):
        print(f"{self.prefix} {text}", flush=True)

    def run_job(self, job):
        self.say(f"{job.kind} {job.name}: {job.command_line()}")
        start = time.time()
        code = run_forwarding_signals([sys.executable, *job.command()[1:]])
        seconds = time.time() - start
        self._log(job, seconds, code)
        if code:
            raise StepFailed(job, code)
        return seconds

    def _log(self, job, seconds, code):
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": job.kind,
            "name": job.name,
            "seconds": round(seconds, 1),
            "exit_code": code,
            "command": job.command_line(),
        }
        with open(os.path.join(self.workdir, COMMANDS_LOG), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def run_shared(self, jobs):
        for job in jobs:
            if job.done():
                self.say(f"{job.kind} {job.name}: finished earlier, reused")
            else:
                self.run_job(job)

    def run_variants(self, plans):
        """Trains and evaluates each variant; returns the names of the failed ones."""
        failed = []
        for i, plan in enumerate(plans):
            done = sum(1 for p in plans if _variant_done(p))
            self.say(
                f"variant {i + 1}/{len(plans)} {plan.name} ({done} done, "
                f"{len(plans) - done} left)"
            )
            try:
                if any(not job.done() for job in plan.needs):
                    raise StepFailed(plan.needs[0], "a shared teacher or cache is missing")
                check_run_command(plan.train)
                for job in (plan.train, *(j for _, j in plan.evals)):
                    if job.done():
                        self.say(f"{job.kind} {job.name}: finished earlier, skipped")
                    else:
                        self.run_job(job)
            except StepFailed as err:
                if err.code == 75:  # preempted: stop here, re-running resumes
                    raise
                self.say(f"variant {plan.name}: {err}; continuing with the others")
                failed.append(plan.name)
        return failed


def check_run_command(job):
    """Records the command of a run directory, or refuses one started by another command.

    train itself would resume an existing run with the new settings (warning only); for an
    experiment that silently mixes two configurations, so a changed variant is an error.
    """
    os.makedirs(job.out, exist_ok=True)
    path = os.path.join(job.out, RUN_COMMAND)
    recorded = read_json(path)
    if recorded is None:
        write_json(path, {"command": job.command_line()})
    elif recorded.get("command") != job.command_line():
        raise ValueError(
            f"{job.out} was started by another command ({path}); the variant {job.name} "
            "changed since: rename it, or delete that run directory to retrain it."
        )


def _end_with_parent():
    """In the child, before exec: SIGTERM when the runner dies, however it dies (kill -9
    included), so no train is left running that a rerun would then find holding its workdir.
    The child stays in the runner's process group, so `kill -- -<pgid>` ends both too."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: Ctrl-C / SIGTERM are still forwarded
        pass
    if os.getppid() == 1:  # the runner died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def run_forwarding_signals(cmd):
    """Runs `cmd`; returns its exit code. SIGTERM/SIGINT to the runner go to the child and the
    runner waits for it, so a preempted train can save its checkpoint and exit 75 (with
    subprocess.run, Ctrl-C would kill the child after a quarter second)."""
    child = subprocess.Popen(cmd, preexec_fn=_end_with_parent)

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _variant_done(plan):
    return plan.train.done() and all(job.done() for _, job in plan.evals)


def check_workdir_state(workdir, spec, scale):
    """Refuses a workdir that holds another spec's or scale's runs (they would be mixed)."""
    path = os.path.join(workdir, STATE_FILE)
    state = {"spec": os.path.abspath(spec.path), "scale": scale}
    previous = read_json(path)
    if previous and previous.get("scale") != scale:
        raise ValueError(
            f"--workdir={workdir} holds a --scale={previous.get('scale')} run of "
            f"{previous.get('spec')}; use another --workdir for --scale={scale}."
        )
    os.makedirs(workdir, exist_ok=True)
    write_json(path, state)


def select_variants(names, only, spec_path):
    """The variant names to run: all, or those of --only (each must exist)."""
    names = list(names)
    if not only:
        return names
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"--only: {spec_path} has no variant {unknown}; it has {names}.")
    return [n for n in names if n in only]


def _print_plan(plans):
    for job in [*shared_jobs(plans), *(j for p in plans for j in (p.train, *(e for _, e in p.evals)))]:
        print(f"{job.kind:<8} {job.name}: {job.command_line()}")


def run_sweeps(runner, sweeps, metric):
    """Trains every variant's sweep candidates and selects; returns ({variant: flag lines},
    [variants whose sweep failed])."""
    plans = [p for candidates in sweeps.values() for p in candidates]
    runner.run_shared(shared_jobs(plans))
    runner.run_variants(plans)
    selected, failed = {}, []
    for variant, candidates in sweeps.items():
        try:
            selected[variant], record = select_candidate(candidates, metric)
        except ValueError as err:
            runner.say(f"variant {variant}: {err}")
            failed.append(variant)
            continue
        runner.say(f"variant {variant}: sweep selected {' '.join(record['selected'])} "
                   f"({metric} = {record['value']:.4f} on the held-out part)")
    return selected, failed


def run_experiment(cfg):
    """The experiment CLI as a list of steps; returns the process exit code."""
    spec = spec_lib.read_spec(cfg.spec)
    planner = Planner(spec, cfg.workdir, cfg.scale)
    names = select_variants(spec.variants, cfg.only, cfg.spec)
    sweeps = {n: planner.sweep(spec.variants[n]) for n in names} if spec.sweep else {}
    # Before the sweep has run, the seeds are planned with each variant's first candidate.
    chosen = {n: recorded_selection(c) or c[0].selected for n, c in sweeps.items()}
    if cfg.dry_run:
        _print_plan([p for c in sweeps.values() for p in c])
        _print_plan(planner.plan(chosen, names))
        return 0
    # One runner per workdir: two would start the same jobs into the same directories.
    with runlock.hold(cfg.workdir, lock_file=LOCK_FILE, what="experiment runner"):
        return _run_locked(cfg, spec, planner, names, sweeps, chosen)


def _run_locked(cfg, spec, planner, names, sweeps, chosen):
    """`run_experiment` once the workdir's runner lock is held: the sweeps (when the spec has
    one), the shared teachers and caches, the variants' seeds, the report."""
    from kd_keras.experiments import report as experiment_report

    check_workdir_state(cfg.workdir, spec, cfg.scale)
    runner = Runner(spec, cfg.workdir)
    failed = []
    if not cfg.report_only:
        if cfg.teachers_only:
            shared = shared_jobs([*(p for c in sweeps.values() for p in c),
                                  *planner.plan(chosen, names)])
            runner.run_shared(shared)
            runner.say(f"{len(shared)} shared teacher/cache jobs ready")
            return 0
        if sweeps:
            chosen, failed = run_sweeps(runner, sweeps, spec.select)
            names = [n for n in names if n not in failed]
        plans = planner.plan(chosen, names)
        runner.run_shared(shared_jobs(plans))
        failed += runner.run_variants(plans)
    paths = experiment_report.write_report(
        spec,
        cfg.scale,
        cfg.workdir,
        planner.plan(report_selections(spec, planner, chosen)),
        cfg.report_dir or cfg.workdir,
    )
    runner.say(f"report: {paths['md']}")
    if failed:
        runner.say(f"failed variants: {', '.join(failed)}")
        return 1
    return 0
