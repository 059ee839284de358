"""Registration of CRD, contrastive loss only (no TensorFlow here)."""

import dataclasses

from kd_keras.methods import registry


@dataclasses.dataclass(frozen=True)
class CrdOptions:
    """CRD's own flags (defaults: RepDistiller train_student.py)."""

    crd_feature_dim: int = 128
    crd_num_negatives: int = 16_384
    crd_temperature: float = 0.07
    crd_momentum: float = 0.5


def define_crd_flags(flags):
    d = CrdOptions()
    flags.DEFINE_integer("crd_feature_dim", d.crd_feature_dim, "CRD embedding size (--feat_dim).")
    flags.DEFINE_integer(
        "crd_num_negatives", d.crd_num_negatives, "CRD negatives per sample (--nce_k)."
    )
    flags.DEFINE_float("crd_temperature", d.crd_temperature, "CRD temperature (--nce_t).")
    flags.DEFINE_float("crd_momentum", d.crd_momentum, "CRD memory momentum (--nce_m).")


def validate_crd(cfg):
    o = cfg.options()
    for name in ("crd_feature_dim", "crd_num_negatives"):
        if getattr(o, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(o, name)}.")
    if not o.crd_temperature > 0:
        raise ValueError(f"--crd_temperature must be positive, got {o.crd_temperature}.")
    if not 0 <= o.crd_momentum < 1:
        raise ValueError(f"--crd_momentum must be in [0, 1), got {o.crd_momentum}.")


registry.register(
    registry.MethodSpec(
        name="crd",
        summary="CRD: NCE between student and teacher embeddings and per-sample memories.",
        builder="kd_keras.methods.crd:build_crd",
        views="pair",
        needs_teacher=True,
        teacher_features=True,
        can_cache_teacher=True,
        define_flags=define_crd_flags,
        options=CrdOptions,
        validate=validate_crd,
    )
)
