"""Registration of SwAV, OSS and OSS-offline: multi-crop online clustering (no TensorFlow).

Their settings are the `cluster` section of the config (`config.ClusterConfig`); the checks
below apply where the flags only make sense for one of them.
"""

from kd_keras.methods import registry

CLUSTERING_NAN_HINT = (
    "The embeddings or the Sinkhorn codes became non-finite; try a lower --lr, "
    "a larger --sinkhorn_epsilon or --freeze_prototypes_steps."
)


def validate_clustering(cfg):
    """Checks of the multi-crop / queue flags that only hold for these methods."""
    c = cfg.cluster
    if c.num_large_crops != 2:
        raise ValueError(
            f"--num_large_crops must be 2 for --method={cfg.method} (codes come from the two "
            f"large crops), got {c.num_large_crops}."
        )
    if c.small_crop_size > cfg.data.image_size:
        raise ValueError(
            f"--small_crop_size={c.small_crop_size} is larger than the large crops "
            f"(--image_size={cfg.data.image_size})."
        )
    if c.queue_length and c.queue_length % cfg.optim.batch_size:
        raise ValueError(
            f"--queue_length={c.queue_length} must be a multiple of the global "
            f"--batch_size={cfg.optim.batch_size} (OSS: 3840 = 15 x 256)."
        )
    if c.export_network != "student" and cfg.method != "oss":
        raise ValueError(
            f"--export_network={c.export_network} applies to --method=oss only (the one with "
            f"an exportable online teacher), got --method={cfg.method}."
        )


def _no_feature_classifier(cfg):
    """Only online OSS has the feature classifier (A.8's offline variant and SwAV have none)."""
    reason = f"--method={cfg.method} has no feature classifier (online OSS only)."
    return {"feature_classifier": reason, "grl_scale": reason}


def _oss_unused(cfg):
    """--classifier_hidden and --grl_scale shape a classifier that --nofeature_classifier
    leaves out."""
    if cfg.cluster.feature_classifier:
        return {}
    reason = "--nofeature_classifier trains without the classifier."
    return {"classifier_hidden": reason, "grl_scale": reason}


_COMMON = dict(
    views="multicrop",
    callbacks="kd_keras.methods.factory:clustering_callbacks",
    validate_each_epoch=False,
    nan_hint=CLUSTERING_NAN_HINT,
    exporter="kd_keras.methods.factory:export_clustering",
    validate=validate_clustering,
)

registry.register(
    registry.MethodSpec(
        name="swav",
        summary="SwAV: swapped prediction of Sinkhorn codes over multi-crop views.",
        builder="kd_keras.methods.factory:build_swav",
        unused_flags=_no_feature_classifier,
        **_COMMON,
    )
)
registry.register(
    registry.MethodSpec(
        name="oss",
        summary="OSS: teacher and student trained jointly with SwAV (OSS paper, appendix A.1).",
        builder="kd_keras.methods.factory:build_oss",
        unused_flags=_oss_unused,
        knn_networks="kd_keras.methods.factory:teacher_network",
        **_COMMON,
    )
)
registry.register(
    registry.MethodSpec(
        name="oss_offline",
        unused_flags=_no_feature_classifier,
        summary="OSS offline: a frozen SwAV teacher gives the codes (OSS paper, appendix A.8).",
        builder="kd_keras.methods.factory:build_oss_offline",
        needs_teacher=True,
        frozen_teacher="kd_keras.methods.factory:load_frozen_teacher",
        knn_networks="kd_keras.methods.factory:teacher_network",
        **_COMMON,
    )
)
