"""Command line: `python -m kd_keras.convert` (console script `kd-convert`) converts a published PyTorch
checkpoint into a kd_keras teacher directory (kd_keras.teachers.conversion)."""

import functools
import os

from absl import app, flags

from kd_keras import cli

# TensorFlow loads with the modules below: silence its import banners first.
cli.import_tensorflow_quietly()
from kd_keras import config as config_lib  # noqa: E402
from kd_keras.nets import backbones, vit  # noqa: E402
from kd_keras.teachers import conversion, layouts, vit_layouts  # noqa: E402


def define_flags():
    """The flags of `python -m kd_keras.convert`, each defined unless one of that name exists
    (so calling it twice is harmless); `run_cli` calls it."""
    defined = set(flags.FLAGS)

    def define(kind, name, default, help_text, *args):
        if name not in defined:
            getattr(flags, f"DEFINE_{kind}")(name, default, *args, help_text)

    define(
        "string",
        "checkpoint",
        None,
        "Checkpoint to convert: .pth/.pth.tar (torch zip or legacy), .safetensors, or a TF "
        "checkpoint prefix/directory.",
    )
    define(
        "string",
        "arch",
        "resnet50",
        f"Architecture: {backbones.ALL_ARCH_HELP}; or a ViT: {vit.VIT_ARCH_HELP}.",
    )
    define("string", "out", None, "Output directory (must not exist unless --overwrite).")
    define(
        "string",
        "layout",
        None,
        f"Checkpoint layout, one of {layouts.LAYOUT_NAMES}, for ViTs one of "
        f"{vit_layouts.VIT_LAYOUT_NAMES} (default: detect).",
    )
    define(
        "integer",
        "image_size",
        None,
        "ViTs: input side the model is built for (a multiple of the patch); the positional "
        "embeddings are resized as the checkpoint's own code does (default: the checkpoint's).",
    )
    define(
        "enum", "pool", "cls", "ViTs: features: class token, patch mean, or both.", list(vit.POOLS)
    )
    define(
        "string",
        "norm",
        "layout",
        f"Input normalisation inside the converted model, one of {conversion.NORMS} ('layout': "
        "ImageNet mean/std, none for SimCLR).",
    )
    define("bool", "overwrite", False, "Replace an existing --out directory.")


def config_from_flags(fv):
    """A `ConvertConfig` from parsed flags; ValueError naming the flag when one is missing."""
    for name in ("checkpoint", "out"):
        if not getattr(fv, name):
            raise ValueError(f"--{name} is required.")
    return conversion.ConvertConfig(
        checkpoint=fv.checkpoint,
        out=fv.out,
        arch=fv.arch,
        layout=fv.layout or None,
        norm=None if fv.norm == "layout" else fv.norm,
        overwrite=fv.overwrite,
        image_size=fv.image_size,
        # Given, or the ViT default (a ResNet conversion refuses an explicit --pool).
        pool=fv.pool if fv["pool"].present else None,
    )


HELP = """Converts a published PyTorch checkpoint (.pth, .safetensors or TF) into a kd_keras teacher
directory, usable as --teacher=DIR or kd_keras.SimReg(teacher="DIR")."""
HELP_FLAGS = ("checkpoint", "arch", "out", "layout", "norm", "overwrite")


def main(argv):

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_logging()
    with cli.one_line_errors("kd_keras.convert", (ValueError, FileNotFoundError), first_line=True):
        manifest = conversion.convert(config_from_flags(flags.FLAGS))
        print(
            f"wrote {os.path.abspath(flags.FLAGS.out)} (layout {manifest['layout']}, "
            f"{len(manifest['mapping'])} tensors mapped, {len(manifest['skipped'])} skipped)"
        )


def run_cli():
    """Entry point of the `kd-convert` console script.

    The flags are defined here, not on import: `--image_size` means the ViT's input side here
    and the training views' side in kd_keras.train, and a process may import both modules."""
    define_flags()
    cli.exit_with_help_if_asked("kd_keras.convert", HELP, HELP_FLAGS)
    app.run(
        main, flags_parser=functools.partial(config_lib.parse_command_line, prog="kd_keras.convert")
    )


if __name__ == "__main__":
    run_cli()
