"""Outputs of an evaluation in `--eval_dir`: results.json, TensorBoard scalars and projector
embeddings (logs/), the k-NN monitor curve of the run (knn_monitor.png), and a text table.
"""

import os

RESULTS = "results.json"
LOG_DIR = "logs"
PLOT = "knn_monitor.png"


def write_results(eval_dir, results):
    """Writes `results` to `<eval_dir>/results.json` atomically; returns the path."""
    from kd_keras.artifacts import checkpointing

    path = os.path.join(eval_dir, RESULTS)
    checkpointing.write_json(path, results)
    return path


def default_eval_dir(loaded, model_path=None):
    """<run>/eval for runs, otherwise <model>_eval next to the model."""
    if loaded.run_dir and (model_path is None or model_path.rstrip("/") == loaded.run_dir):
        return os.path.join(loaded.run_dir, "eval")
    base = (model_path or "in_memory_model").rstrip("/")
    return f"{base.removesuffix('.keras')}_eval"


def tensorboard_tag(rec):
    """'knn/majority_k20_top1', 'linear/simreg_cached_features_top1', ..."""
    parts = [rec["protocol"]]
    if rec["protocol"] == "knn":
        name = f"{rec['vote']}_k{rec['k']}_{rec['metric']}"
    elif rec["protocol"] == "linear":
        name = f"{rec['preset']}_{rec['path']}_{rec['metric']}"
    elif rec["protocol"] == "mse_cos":
        name = f"{rec['teacher']}_{rec['metric']}"
    elif rec["protocol"] == "transfer":
        name = f"{os.path.basename(rec['dataset'].rstrip('/'))}_{rec['metric']}"
    else:
        name = rec["metric"]
    parts.append(name)
    return "/".join(parts)


def write_tensorboard(logdir, records, step=0):
    """One scalar per result record (see `tensorboard_tag`) at `step`."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for rec in records:
            tf.summary.scalar(tensorboard_tag(rec), rec["value"], step=step)
    writer.flush()


def write_projector(logdir, feats, labels, class_names=()):
    """TensorBoard projector data: features [n, D] as a checkpointed variable + label metadata."""
    import tensorflow as tf
    from tensorboard.plugins import projector

    os.makedirs(logdir, exist_ok=True)
    with open(os.path.join(logdir, "metadata.tsv"), "w") as f:
        f.write("label\tclass\n")
        for y in labels:
            name = class_names[y] if 0 <= y < len(class_names) else str(y)
            f.write(f"{int(y)}\t{name}\n")
    embedding = tf.Variable(feats, name="embedding")
    tf.train.Checkpoint(embedding=embedding).save(os.path.join(logdir, "embedding.ckpt"))
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    entry.metadata_path = "metadata.tsv"
    projector.visualize_embeddings(logdir, config)
    return {"logdir": logdir, "num_examples": int(feats.shape[0]), "dim": int(feats.shape[1])}


def plot_knn_monitor(run_dir, path):
    """Draws the k-NN monitor curve of a run as a PNG; returns the path, or None without data."""
    from kd_keras.eval.monitor import KNN_MONITOR_FILE, read_knn_history

    entries = read_knn_history(os.path.join(run_dir, KNN_MONITOR_FILE))
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(
        {k for e in entries for k in e if k.startswith("knn_top1_")},
        key=lambda k: int(k.rsplit("k", 1)[1]),
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(e["epoch"], e[key]) for e in entries if key in e]
        ax.plot(*zip(*points, strict=True), marker="o", label=f"top-1, k={key.rsplit('k', 1)[1]}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("k-NN accuracy (monitor subset)")
    ax.set_title(f"k-NN monitor: {os.path.basename(run_dir.rstrip('/'))}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(results):
    """The results as a fixed-width text table."""
    lines = [
        f"{results['model']} | layer {results['layer']} | {results['dataset']} "
        f"{results['train_split']} ({results['num_train_split']}) -> {results['eval_split']} "
        f"({results['num_eval_split']})",
        f"{'protocol':<11} {'setting':<34} {'metric':<6} {'value':>7}  train/test",
    ]
    for rec in results["results"]:
        if rec["protocol"] == "knn":
            setting = f"{rec['vote']} k={rec['k']}"
        elif rec["protocol"] == "linear":
            setting = f"{rec['preset']} {rec['path']} {rec['epochs']} ep"
        elif rec["protocol"].startswith("finetune"):
            setting = f"{rec['fraction']:.0%} labels, {rec['epochs']} ep"
        elif rec["protocol"] == "transfer":
            dataset = os.path.basename(rec["dataset"].rstrip("/"))
            setting = f"{dataset[:22]} wd={rec['weight_decay']:g}"
        else:
            setting = f"teacher {rec['teacher']}"
        sizes = f"{rec.get('num_train', '-')}/{rec.get('num_test', '-')}"
        if rec["protocol"] == "transfer":
            sizes = f"{rec['num_train']}+{rec['num_val']}/{rec['num_test']}"
        lines.append(
            f"{rec['protocol']:<11} {setting:<34} {rec['metric']:<6} {rec['value']:>7.4f}  {sizes}"
        )
    return "\n".join(lines)
