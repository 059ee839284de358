"""Registration of SimReg and its Regress / Regress-BN baselines (no TensorFlow here)."""

from kd_keras.methods import registry


def _linear_head_only(cfg):
    """Regress and Regress-BN are the paper's baselines with a linear head."""
    if cfg.model.head != "linear":
        raise ValueError(
            f"--method={cfg.method} is a baseline with a linear head; set --head=linear "
            f"(got --head={cfg.model.head})."
        )


_COMMON = dict(
    builder="kd_keras.methods.simreg:build_simreg",
    views="pair",
    needs_teacher=True,
    teacher_features=True,
    can_cache_teacher=True,
)

registry.register(
    registry.MethodSpec(
        name="simreg", summary="SimReg: regress normalised teacher features (Navaneet et al., 2022).", **_COMMON
    )
)
registry.register(
    registry.MethodSpec(
        name="regress",
        summary="Regress baseline: unnormalised feature regression, linear head.",
        validate=_linear_head_only,
        **_COMMON,
    )
)
registry.register(
    registry.MethodSpec(
        name="regress_bn",
        summary="Regress-BN baseline: regression of batch-normalised features, linear head.",
        validate=_linear_head_only,
        **_COMMON,
    )
)
