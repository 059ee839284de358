"""The experiment's report: a table of every variant (and layer), CSV, PNG plots, HParams logs.

Reads only what the command lines leave in a run directory: `results.json` (train's own k-NN of
student, teachers and random-init student, steps, seconds), `eval_<layer>/results.json`
(kd_keras.evaluate's records), `knn_monitor.json` (the k-NN curve during training) and the
runner's `commands.log` (wall time of each command).
"""

import csv
import json
import os
import shutil

TRAIN_KNN = ("student", "random_init_student")


def record_column(rec):
    """Column name of one kd_keras.evaluate record: 'knn/majority_k20_top1', 'linear/top1', ..."""
    protocol = rec["protocol"]
    if protocol == "knn":
        return f"knn/{rec.get('vote')}_k{rec.get('k')}_{rec['metric']}"
    if protocol == "linear":
        return f"linear/{rec.get('preset')}_{rec.get('path')}_{rec['metric']}"
    if protocol == "mse_cos":
        return f"mse_cos/{rec.get('teacher')}_{rec['metric']}"
    return f"{protocol}/{rec['metric']}"


def train_columns(results):
    """Train's own k-NN (majority vote, backbone) of the student, teachers and random init."""
    row = {}
    for who, metrics in (results or {}).get("knn", {}).items():
        if not isinstance(metrics, dict):
            continue
        short = who.removeprefix("teacher_")
        label = "train_knn" if who == "student" else f"{short}_knn"
        for key, value in metrics.items():
            if isinstance(value, float):
                row[f"{label}/{key.removeprefix('knn_')}"] = value
    return row


def wall_seconds(workdir):
    """name -> seconds of the last successful command of each job, from commands.log."""
    seconds = {}
    path = os.path.join(workdir, "commands.log")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                key = (entry["kind"], entry["name"])
                seconds[key] = seconds.get(key, 0.0) + entry["seconds"]
    return seconds


def collect_rows(plans, workdir):
    """One dict per (finished variant, layer): name, layer, metrics, seconds and command."""
    from kd_keras.artifacts.layout import read_json

    walls = wall_seconds(workdir)
    rows = []
    for plan in plans:
        results = read_json(os.path.join(plan.train.out, "results.json"))
        if not plan.train.done():
            continue
        base = {
            "variant": plan.name,
            "group": plan.variant or plan.name,
            "seed": plan.seed_index,
            "selected": " ".join(plan.selected),
            "overrides": " ".join(plan.overrides),
            "steps": results.get("steps"),
            "train_wall_s": round(walls.get(("train", plan.name), 0.0), 1) or None,
            **train_columns(results),
        }
        layers = plan.evals or (("backbone", None),)
        for layer, job in layers:
            row = dict(base, layer=layer, command=plan.train.command_line())
            if job is not None:
                evaluated = read_json(os.path.join(job.out, "results.json")) or {}
                for rec in evaluated.get("results", []):
                    row[record_column(rec)] = rec["value"]
                row["eval_command"] = job.command_line()
                row["eval_wall_s"] = round(walls.get(("evaluate", job.name), 0.0), 1) or None
            rows.append(row)
    return rows


def metric_columns(rows):
    fixed = {"variant", "group", "seed", "selected", "layer", "overrides", "command",
             "eval_command", "steps"}
    seen = []
    for row in rows:
        for key in row:
            if key not in fixed and key not in seen and not key.endswith("_wall_s"):
                seen.append(key)
    evaluated = [k for k in seen if "/" in k and not k.split("/")[0].endswith("_knn")]
    trained = [k for k in seen if k not in evaluated]
    return evaluated + trained


def interval(values, level=0.95):
    """(mean, sample std, half-width of the `level` confidence interval of the mean: Student's t
    with n - 1 degrees of freedom) of `values`; std and half-width are None for one value."""
    from scipy import stats

    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / n**0.5
    return mean, std, half


def summary_rows(rows, columns):
    """One dict per (variant, layer) over its seeds: n, the sweep's selection, and for every
    metric column its mean, std and 95 % interval half-width (`<col>`, `<col>:std`,
    `<col>:ci95`)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["group"], row["layer"]), []).append(row)
    out = []
    for (group, layer), members in groups.items():
        summary = {"variant": group, "layer": layer, "n": len(members),
                   "selected": members[0].get("selected", "")}
        for column in columns:
            values = [r[column] for r in members if isinstance(r.get(column), float)]
            if values:
                mean, std, half = interval(values)
                summary.update({column: mean, f"{column}:std": std, f"{column}:ci95": half})
        out.append(summary)
    return out


def _mean_cell(summary, column):
    if column not in summary:
        return ""
    text = _fmt(summary[column])
    if summary.get(f"{column}:ci95") is not None:
        text += f" ± {_fmt(summary[f'{column}:ci95'])}"
    return text


def _summary_markdown(spec, summaries, columns):
    """The per-variant table over seeds (mean ± 95 % interval), when there is more than one
    seed or a sweep."""
    if spec.seeds < 2 and not spec.sweep:
        return []
    lines = [f"Over seeds: mean ± half-width of the 95 % interval (Student's t, n - 1 degrees "
             f"of freedom) of {spec.seeds} seed(s) per variant"
             + (f"; hyper-parameters selected per variant by `{spec.select}` on "
                f"{spec.holdout} % of the train split held out (never the reported split)"
                if spec.sweep else "") + ".", ""]
    header = ["variant", "layer", "n", *(["selected"] if spec.sweep else []), *columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for s in summaries:
        cells = [s["variant"], s["layer"], str(s["n"]),
                 *([f"`{s['selected']}`"] if spec.sweep else []),
                 *(_mean_cell(s, c) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(spec, scale, workdir, plans, report_dir=None):
    """Writes report.md, report.csv, plots/ and hparams/ under `report_dir` (default
    `workdir`); returns their paths."""
    rows = collect_rows(plans, workdir)
    columns = metric_columns(rows)
    out = report_dir or workdir
    paths = {
        "md": os.path.join(out, "report.md"),
        "csv": os.path.join(out, "report.csv"),
        "curves": os.path.join(out, "plots", "knn_curves.png"),
        "bars": os.path.join(out, "plots", "metric_bars.png"),
        "hparams": os.path.join(out, "hparams"),
    }
    os.makedirs(os.path.dirname(paths["curves"]), exist_ok=True)
    _write_csv(paths["csv"], rows, columns)
    summaries = summary_rows(rows, columns)
    if spec.seeds > 1 or spec.sweep:
        paths["summary_csv"] = os.path.join(out, "report_summary.csv")
        _write_summary_csv(paths["summary_csv"], summaries, columns)
    metric = spec.metric if spec.metric in columns else (columns[0] if columns else "")
    curves = plot_knn_curves(plans, paths["curves"])
    bars = plot_bars(rows, metric, paths["bars"]) if metric else False
    _write_markdown(paths["md"], spec, scale, plans, rows, columns,
                    plots={"curves": curves and paths["curves"], "bars": bars and paths["bars"]},
                    metric=metric, summaries=summaries)
    write_hparams(paths["hparams"], rows, columns, plans)
    return paths


def _write_summary_csv(path, summaries, columns):
    header = ["variant", "layer", "n", "selected"]
    for column in columns:
        header += [column, f"{column}:std", f"{column}:ci95"]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summaries)
    os.replace(tmp, path)


def _write_csv(path, rows, columns):
    header = ["variant", "layer", *columns, "steps", "train_wall_s", "eval_wall_s", "overrides",
              "seed", "selected", "command", "eval_command"]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in header})
    os.replace(tmp, path)


def _fmt(value, digits=4):
    if isinstance(value, float):
        if digits != 4:
            return f"{value:.{digits}f}"
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _write_markdown(path, spec, scale, plans, rows, columns, plots, metric, summaries=()):
    lines = [f"# {spec.title or spec.name}", ""]
    lines.append(f"Spec `{spec.path}`, `--scale={scale}`, base flagfile `{spec.base}`; "
                 f"{len({r['variant'] for r in rows})} of {len(plans)} runs finished.")
    lines.append("")
    if any(c.startswith("knn/") for c in columns):
        # The student's train-time k-NN repeats the evaluated one: report.csv keeps it.
        columns = [c for c in columns if not c.startswith("train_knn/")]
    lines += _summary_markdown(spec, summaries, columns)
    header = ["variant", "layer", *columns, "train s", "eval s", "command"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        cells = [row["variant"], row["layer"], *(_fmt(row.get(c)) for c in columns),
                 _fmt(row.get("train_wall_s"), 0), _fmt(row.get("eval_wall_s"), 0),
                 f"`{row['command']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    evals = [r for r in rows if r.get("eval_command")]
    if evals:
        lines.append("Evaluation commands:")
        lines.append("")
        lines += [f"- {r['variant']} / {r['layer']}: `{r['eval_command']}`" for r in evals]
        lines.append("")
    lines.append("Columns: `knn/...`, `linear/...` etc. come from `kd_keras.evaluate` "
                 "(`eval_<layer>/results.json`); `train_knn/...` (student), `<teacher>_knn/...` "
                 "and `random_init_student_knn/...` from training's own k-NN (majority vote, "
                 "backbone features) in `results.json`. Seconds are wall times of the commands "
                 "(`commands.log`, summed over resumed invocations).")
    lines.append("")
    if plots["bars"]:
        lines.append(f"![{metric}](plots/{os.path.basename(plots['bars'])})")
    if plots["curves"]:
        lines.append(f"![k-NN during training](plots/{os.path.basename(plots['curves'])})")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def plot_knn_curves(plans, path):
    """k-NN top-1 vs epoch of every variant with a `knn_monitor.json`; False if none has one."""
    from kd_keras.artifacts.layout import read_json

    curves = {}
    for plan in plans:
        entries = read_json(os.path.join(plan.train.out, "knn_monitor.json")) or []
        if entries:
            curves[plan.name] = sorted(entries, key=lambda e: e["epoch"])
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entries in curves.items():
        keys = sorted({k for e in entries for k in e if k.startswith("knn_top1_k")},
                      key=lambda k: int(k.rsplit("k", 1)[1]))
        key = keys[-1]  # the largest k
        ax.plot([e["epoch"] for e in entries], [e.get(key) for e in entries], marker="o",
                label=f"{name} ({key.removeprefix('knn_')})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("k-NN top-1 (monitor subset)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_bars(rows, metric, path):
    """`metric` of every row as a bar chart; False when no row has it."""
    shown = [(f"{r['variant']}" + (f"/{r['layer']}" if r["layer"] != "backbone" else ""),
              r[metric]) for r in rows if isinstance(r.get(metric), float)]
    if not shown:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(shown) + 2), 4))
    bars = ax.bar([s[0] for s in shown], [s[1] for s in shown], color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, min(1.0, max(s[1] for s in shown) * 1.15) or 1.0)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    _save(fig, path)
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    tmp = f"{path}.tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    fig.clear()
    import matplotlib.pyplot as plt

    plt.close(fig)
    os.replace(tmp, path)


def hparams_of(plan, layer):
    """The HParams of a row: variant, layer and every flag the variant overrides."""
    values = {"variant": plan.name, "layer": layer}
    for text in plan.overrides:
        name, _, value = text.lstrip("-").partition("=")
        if not value and name.startswith("no"):
            name, value = name[2:], "false"
        values[name.rstrip("+")] = value or "true"
    return values


def write_hparams(logdir, rows, columns, plans):
    """TensorBoard HParams: one session per row under `logdir`, metrics as scalars at step 0.

    The directory is rewritten on each report, so it always shows the current rows.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    shutil.rmtree(logdir, ignore_errors=True)
    by_name = {p.name: p for p in plans}
    sessions = [(row, hparams_of(by_name[row["variant"]], row["layer"])) for row in rows]
    names = sorted({k for _, values in sessions for k in values})
    metrics = [c for c in columns if any(isinstance(r.get(c), float) for r in rows)]
    with tf.summary.create_file_writer(logdir).as_default():
        hp.hparams_config(
            hparams=[hp.HParam(n) for n in names],
            metrics=[hp.Metric(m, display_name=m) for m in metrics],
        )
    for row, values in sessions:
        run = row["variant"] + ("" if row["layer"] == "backbone" else f"_{row['layer']}")
        session_dir = os.path.join(logdir, run.replace("/", "_"))
        with tf.summary.create_file_writer(session_dir).as_default():
            hp.hparams({n: str(values.get(n, "")) for n in names}, trial_id=run)
            for metric in metrics:
                if isinstance(row.get(metric), float):
                    tf.summary.scalar(metric, row[metric], step=0)
            tf.summary.flush()
