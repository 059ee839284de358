"""Builds SwAV / OSS runs from a `Config`: views, networks, export and reload.

The registry (`clustering_spec.py`) names these builders and hooks for `--method` swav, oss
and oss_offline; everything here takes the config dataclasses, never flags.
"""

import json
import math
import os
import shutil

import keras
import numpy as np

# Re-exported: the names of a SwAV/OSS network directory (kd_keras.artifacts.layout).
from kd_keras.artifacts.layout import NETWORK_KIND, NETWORK_MANIFEST, NETWORKS_DIR  # noqa: E402,F401
from kd_keras.data import augment
from kd_keras.methods.oss import OSS
from kd_keras.methods.swav import SwAV
from kd_keras.nets import backbones, clustering, heads


def multicrop_view_fn(cfg):
    """`augment.make_multicrop_fn` for the run: 2 x --image_size + V x --small_crop_size."""
    c = cfg.cluster
    return augment.make_multicrop_fn(
        sizes=(cfg.data.image_size, c.small_crop_size),
        counts=(c.num_large_crops, c.num_small_crops),
        scales=(c.large_crop_scale, c.small_crop_scale),
        color_strength=c.color_strength,
        blur_p=c.blur_prob,
        resize=cfg.data.view_resize,
    )


def build_backbone(cfg, name):
    """A backbone taking crops of any side (the stem is chosen by the large crop size)."""
    return backbones.build_backbone(
        name,
        cfg.data.image_size,
        small_stem=cfg.model.small_stem,
        norm=cfg.model.student_norm,
        sync_bn=cfg.sync_bn,
        any_input_size=True,
    )


def _head(cfg, name, dropout=True):
    c = cfg.cluster
    return heads.ProjectionHead(
        c.proj_hidden_dim,
        c.proj_dim,
        c.proj_dropout if dropout else (0.0, 0.0),
        c.dropout_position,
        sync_bn=cfg.sync_bn,
        init=cfg.model.head_init,
        name=name,
    )


def queue_for(cfg):
    c = cfg.cluster
    if not c.queue_length:
        return None
    queue = clustering.EmbeddingQueue(2, c.queue_length, c.proj_dim, name="queue")
    queue.check_batch(cfg.optim.batch_size)
    return queue


def _clustering_kwargs(ctx):
    """Settings every SwAV / OSS model takes."""
    c = ctx.cfg.cluster
    return dict(
        temperature=c.temperature,
        epsilon=c.sinkhorn_epsilon,
        sinkhorn_iters=c.sinkhorn_iters,
        queue_start_step=c.queue_start_epoch * ctx.steps_per_epoch,
        freeze_prototypes_steps=c.freeze_prototypes_steps,
        weight_decay=ctx.weight_decay,
    )


def _prototypes(cfg):
    return clustering.Prototypes(
        cfg.cluster.num_prototypes, cfg.cluster.proj_dim, cfg.model.head_init, name="prototypes"
    )


def build_swav(ctx):
    """The registry's builder of --method=swav (`ctx`: a `registry.BuildContext`)."""
    cfg = ctx.cfg
    return SwAV(
        ctx.student,
        _head(cfg, "projection_head", dropout=False),
        _prototypes(cfg),
        queue_for(cfg),
        name="swav",
        **_clustering_kwargs(ctx),
    )


def build_oss(ctx):
    """The registry's builder of --method=oss: an online teacher trained with the student."""
    cfg, c = ctx.cfg, ctx.cfg.cluster
    classifier = grl = None
    if c.feature_classifier:
        classifier = heads.feature_classifier(
            c.proj_dim, c.classifier_hidden, sync_bn=cfg.sync_bn, init=cfg.model.head_init
        )
        grl = heads.GradientReversal(name="gradient_reversal")
    return OSS(
        build_backbone(cfg, c.online_teacher),
        _head(cfg, "teacher_head"),
        ctx.student,
        _head(cfg, "student_head"),
        _prototypes(cfg),
        queue_for(cfg),
        classifier,
        grl,
        total_steps=cfg.optim.epochs * ctx.steps_per_epoch,
        grl_scale=c.grl_scale,
        online=True,
        use_dropout_views=c.dropout_views,
        name="oss",
        **_clustering_kwargs(ctx),
    )


def build_oss_offline(ctx):
    """The registry's builder of --method=oss_offline; `ctx.frozen` is the dict from
    `load_frozen_teacher` (backbone, head and prototypes of a SwAV / OSS run)."""
    cfg = ctx.cfg
    if ctx.frozen is None:
        raise ValueError("--method=oss_offline needs a frozen teacher (--teacher=RUN_DIR).")
    return OSS(
        ctx.frozen["backbone"],
        ctx.frozen["head"],
        ctx.student,
        _head(cfg, "student_head"),
        ctx.frozen["prototypes"],
        queue_for(cfg),
        total_steps=cfg.optim.epochs * ctx.steps_per_epoch,
        online=False,
        use_dropout_views=cfg.cluster.dropout_views,
        name="oss_offline",
        **_clustering_kwargs(ctx),
    )


def load_frozen_teacher(cfg):
    """The registry's `frozen_teacher` of oss_offline: its first --teacher, loaded."""
    return load_clustering_networks(cfg.model.teachers[0], cfg)


def teacher_network(method):
    """The registry's `knn_networks` of OSS: its teacher backbone, reported as "teacher"."""
    return {"teacher": method.teacher_backbone}


def clustering_callbacks(cfg):
    """The registry's `callbacks` of SwAV / OSS: the collapse warning."""
    return [CollapseWarning(uniform_loss(cfg))]


def export_clustering(cfg, method, workdir, student):
    """The registry's `exporter` of SwAV / OSS: the backbone of `exported_backbone`, plus
    every network with its head and prototypes under `<workdir>/networks/` (for oss_offline).
    """
    from kd_keras.methods import registry

    backbone, name = exported_backbone(cfg, method)
    networks = export_clustering_networks(cfg, method, workdir)
    return registry.Export(
        backbone, name, heads=getattr(method, "heads", None), results={"networks": networks}
    )


def exported_backbone(cfg, method):
    """The backbone to export: the student, or OSS's teacher with --export_network=teacher."""
    if cfg.method == "oss" and cfg.cluster.export_network == "teacher":
        return method.teacher_backbone, cfg.cluster.online_teacher
    return method.student, cfg.model.student


def export_clustering_networks(cfg, method, workdir):
    """Saves backbone + projection head + prototypes of each network for later reuse.

    Layout: `<workdir>/networks/<role>/{backbone.keras, head.keras, prototypes.npy,
    manifest.json}`, role "network" (swav) or "teacher" and "student" (oss). An `oss_offline`
    run loads a role as its frozen teacher. Written to a temporary directory and renamed.
    """
    if cfg.method == "swav":
        roles = {"network": (method.backbone, method.head, cfg.model.student)}
    else:
        roles = {"student": (method.student_backbone, method.student_head, cfg.model.student)}
        if cfg.method == "oss":
            roles["teacher"] = (
                method.teacher_backbone,
                method.teacher_head,
                cfg.cluster.online_teacher,
            )
    final = os.path.join(workdir, NETWORKS_DIR)
    tmp = f"{final}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for role, (backbone, head, backbone_name) in roles.items():
        out = os.path.join(tmp, role)
        os.makedirs(out)
        backbone.save(os.path.join(out, "backbone.keras"))
        inputs = keras.Input((backbone.output_shape[-1],))
        keras.Model(inputs, head(inputs), name=f"{role}_head").save(os.path.join(out, "head.keras"))
        np.save(os.path.join(out, "prototypes.npy"), method.prototypes.kernel.numpy())
        manifest = {
            "kind": NETWORK_KIND,
            "method": cfg.method,
            "role": role,
            "backbone": backbone_name,
            "proj_dim": cfg.cluster.proj_dim,
            "num_prototypes": cfg.cluster.num_prototypes,
            "image_size": cfg.data.image_size,
        }
        with open(os.path.join(out, NETWORK_MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def find_network_dir(path):
    """Resolves --teacher for oss_offline: a network dir, or a swav/oss run dir."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, NETWORK_MANIFEST)):
        return path
    for role in ("teacher", "network"):
        candidate = os.path.join(path, NETWORKS_DIR, role)
        if os.path.isfile(os.path.join(candidate, NETWORK_MANIFEST)):
            return candidate
    raise FileNotFoundError(
        f"--teacher={path}: no SwAV/OSS network there (expected {NETWORKS_DIR}/teacher or "
        f"{NETWORKS_DIR}/network with {NETWORK_MANIFEST}, written by a finished "
        "--method=swav or --method=oss run)."
    )


def load_clustering_networks(path, cfg):
    """Loads a frozen teacher for oss_offline: {"backbone", "head", "prototypes", "manifest"}.

    Raises:
      FileNotFoundError: naming --teacher when the files are missing.
      ValueError: naming --teacher, --proj_dim or --num_prototypes when the saved E x K
        differs from this run's.
    """
    if path.startswith("torch:"):
        # A SwAV checkpoint named directly: the same converted directory (converted once,
        # cached by sha256 under the workdir) that the teacher loader uses.
        from kd_keras.teachers import loading as teachers

        path = teachers.converted_dir(teachers.parse_teacher_spec(path), cfg.workdir)
    net_dir = find_network_dir(path)
    with open(os.path.join(net_dir, NETWORK_MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("kind") != NETWORK_KIND:
        raise ValueError(f"--teacher={net_dir}: {NETWORK_MANIFEST} is not a kd_keras network.")
    c = cfg.cluster
    for key in ("proj_dim", "num_prototypes"):
        if manifest[key] != getattr(c, key):
            raise ValueError(
                f"--teacher={net_dir} was trained with {key}={manifest[key]} but this run has "
                f"--{key}={getattr(c, key)}; the frozen prototypes must match."
            )
    backbone = keras.saving.load_model(os.path.join(net_dir, "backbone.keras"), compile=False)
    head_model = keras.saving.load_model(os.path.join(net_dir, "head.keras"), compile=False)
    head = next(layer for layer in head_model.layers if isinstance(layer, heads.ProjectionHead))
    kernel = np.load(os.path.join(net_dir, "prototypes.npy"))
    if kernel.shape != (c.proj_dim, c.num_prototypes):
        raise ValueError(
            f"--teacher={net_dir}: prototypes.npy has shape {kernel.shape}, expected "
            f"({c.proj_dim}, {c.num_prototypes}) from --proj_dim/--num_prototypes."
        )
    prototypes = clustering.Prototypes(c.num_prototypes, c.proj_dim, name="prototypes")
    prototypes.build()
    prototypes.kernel.assign(kernel)
    return {"backbone": backbone, "head": head, "prototypes": prototypes, "manifest": manifest}


def uniform_loss(cfg):
    """The swapped-prediction loss of uniform predictions: ln K times the share of terms.

    SwAV averages its n - 1 terms, giving ln K; OSS sums 2n - 1 terms over 2n - 2 (A.1).
    """
    c = cfg.cluster
    n = c.num_large_crops + c.num_small_crops
    log_k = math.log(c.num_prototypes)
    if cfg.method != "swav" and c.dropout_views:
        return log_k * (2 * n - 1) / (2 * n - 2)
    return log_k


class CollapseWarning(keras.callbacks.Callback):
    """Warns when a swapped-prediction loss stays at its uniform value: collapse.

    A cross-entropy against any code equals ln K exactly when the predicted distribution is
    uniform, the usual symptom of a SwAV run that does not learn (lr, temperature or epsilon
    off). After each epoch (from the second on) the monitored loss is compared with that
    value (`uniform_loss`); within `tol` (relative) a warning goes to the log and the scalar
    `collapse_warning` = 1 to the epoch logs (and hence TensorBoard).
    """

    def __init__(self, uniform, keys=("loss_student", "loss"), tol=0.02):
        super().__init__()
        self.log_k = float(uniform)
        self.keys = keys
        self.tol = tol

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        key = next((k for k in self.keys if k in logs), None)
        if key is None:
            return
        value = float(np.asarray(logs[key]).reshape(-1)[0])
        collapsed = epoch >= 1 and abs(value - self.log_k) <= self.tol * self.log_k
        logs["collapse_warning"] = float(collapsed)
        if collapsed:
            import logging

            logging.getLogger("kd_keras").warning(
                "%s = %.4f is at its uniform-prediction value %.4f after epoch %d: "
                "the predictions are uniform (collapse). Check --lr, --temperature and "
                "--sinkhorn_epsilon.",
                key,
                value,
                self.log_k,
                epoch + 1,
            )
