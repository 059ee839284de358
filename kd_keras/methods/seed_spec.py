"""Registration of SEED (no TensorFlow here)."""

import dataclasses

from kd_keras.methods import registry


@dataclasses.dataclass(frozen=True)
class SeedOptions:
    """SEED's own flags (defaults: SEED tools/opts.py)."""

    queue_size: int = 65_536
    seed_student_temperature: float = 0.2
    seed_teacher_temperature: float = 1e-4


def define_seed_flags(flags):
    d = SeedOptions()
    flags.DEFINE_integer(
        "queue_size",
        d.queue_size,
        "--method=seed: queued teacher embeddings (SEED --queue); a multiple of --batch_size.",
    )
    flags.DEFINE_float(
        "seed_student_temperature", d.seed_student_temperature, "SEED tau_S (--temp)."
    )
    flags.DEFINE_float(
        "seed_teacher_temperature", d.seed_teacher_temperature, "SEED tau_T (--distill-t)."
    )


def validate_seed(cfg):
    o = cfg.options()
    if o.queue_size < 1 or o.queue_size % cfg.optim.batch_size:
        raise ValueError(
            f"--queue_size={o.queue_size} must be a positive multiple of the global "
            f"--batch_size={cfg.optim.batch_size} (SEED: 65536 = 256 x 256)."
        )
    for name in ("seed_student_temperature", "seed_teacher_temperature"):
        if not getattr(o, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(o, name)}.")


registry.register(
    registry.MethodSpec(
        name="seed",
        summary="SEED: mimic the teacher's similarities to a queue of teacher embeddings.",
        builder="kd_keras.methods.seed:build_seed",
        views="pair",
        needs_teacher=True,
        teacher_features=True,
        can_cache_teacher=True,
        nan_hint="Try a lower --lr or a higher --seed_teacher_temperature.",
        define_flags=define_seed_flags,
        options=SeedOptions,
        validate=validate_seed,
    )
)
