"""Registration of CompRess-1q and CompRess-2q (no TensorFlow here)."""

import dataclasses

from kd_keras import choices
from kd_keras.methods import registry

STUDENT_FEATURES = ("head", "backbone")
BANK_ROWS = choices.COMPRESS_BANK_ROWS


@dataclasses.dataclass(frozen=True)
class CompressOptions:
    """CompRess' own flags (defaults: CompRess train_student*.py)."""

    bank_size: int = 128_000
    compress_temperature: float = 0.04
    compress_momentum: float = 0.999
    compress_student_features: str = "head"
    compress_bank_rows: str = "unit"


def define_compress_flags(flags):
    """--bank_size, --compress_*; defined once for both variants."""
    if "bank_size" in flags.FLAGS:
        return
    d = CompressOptions()
    flags.DEFINE_integer(
        "bank_size",
        d.bank_size,
        "--method=compress_1q/2q: anchors per memory bank (CompRess --compress_memory_size); "
        ">= the global --batch_size.",
    )
    flags.DEFINE_float(
        "compress_temperature", d.compress_temperature, "CompRess softmax temperature T."
    )
    flags.DEFINE_float(
        "compress_momentum",
        d.compress_momentum,
        "--method=compress_2q: momentum of the key copy of student + head that fills the "
        "student bank (CompRess --alpha); 0 = the student's own features.",
    )
    flags.DEFINE_enum(
        "compress_student_features",
        d.compress_student_features,
        list(STUDENT_FEATURES),
        "head: the --head output (to the teacher's dimension) is the student side; backbone: "
        "the backbone's features (plain CompRess-2q; giving --head then is an error).",
    )
    flags.DEFINE_enum(
        "compress_bank_rows",
        d.compress_bank_rows,
        list(BANK_ROWS),
        "How the loss reads bank rows: unit = l2-normalised when read, so the random initial "
        "rows count as unit vectors; as_stored = as CompRess' code does, the initial random "
        "rows keep their drawn norms until overwritten (pushed rows are unit features either "
        "way).",
    )


def validate_compress(cfg):
    o, d = cfg.options(), CompressOptions()
    if o.bank_size < 1:
        raise ValueError(f"--bank_size must be a positive integer, got {o.bank_size}.")
    if o.bank_size < cfg.optim.batch_size:
        raise ValueError(
            f"--bank_size={o.bank_size} is smaller than the global --batch_size="
            f"{cfg.optim.batch_size}; the bank must hold at least one batch."
        )
    if not o.compress_temperature > 0:
        raise ValueError(f"--compress_temperature must be positive, got {o.compress_temperature}.")
    if not 0 <= o.compress_momentum < 1:
        raise ValueError(f"--compress_momentum must be in [0, 1), got {o.compress_momentum}.")
    if cfg.method == "compress_1q":
        if o.compress_momentum != d.compress_momentum:
            raise ValueError(
                "--compress_momentum applies to --method=compress_2q only (1q has no student bank)."
            )
        if o.compress_student_features != "head":
            raise ValueError(
                "--compress_student_features=backbone needs --method=compress_2q: CompRess-1q "
                "scores the student against the teacher's bank, which takes a head to the "
                "teacher's dimension."
            )


def unused_by_compress(cfg):
    """--head / --head_hidden_dims / --head_batch_norm are not read when 2q compares backbone
    features."""
    if cfg.options().compress_student_features != "backbone":
        return {}
    why = "--compress_student_features=backbone compares the student's backbone features."
    return {"head": why, "head_hidden_dims": why, "head_batch_norm": why}


_COMMON = dict(
    builder="kd_keras.methods.compress:build_compress",
    views="pair",
    needs_teacher=True,
    teacher_features=True,
    can_cache_teacher=True,
    nan_hint="Try a lower --lr or a higher --compress_temperature.",
    define_flags=define_compress_flags,
    options=CompressOptions,
    validate=validate_compress,
    unused_flags=unused_by_compress,
)

registry.register(
    registry.MethodSpec(
        name="compress_1q",
        summary="CompRess-1q: mimic the teacher's similarities to one teacher bank.",
        **_COMMON,
    )
)
registry.register(
    registry.MethodSpec(
        name="compress_2q",
        summary="CompRess-2q: similarities to a teacher bank and a (momentum) student bank.",
        **_COMMON,
    )
)
