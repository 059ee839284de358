"""What kd_keras' command lines share: quiet logging, a user-level --help and bad input
reported in one line.

Every command-line module imports this module before anything that imports TensorFlow, so
TensorFlow's C++ INFO and WARNING lines (its oneDNN and CPU-feature banners) are off from the
start; set TF_CPP_MIN_LOG_LEVEL yourself to see them.
"""

import contextlib
import logging
import os
import re
import sys
import textwrap

from kd_keras.choices import PREEMPTED_EXIT_CODE  # noqa: F401  (the command lines' exit code)

# Before any TensorFlow import (see the module docstring).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "-?")


def import_tensorflow_quietly():
    """Imports TensorFlow with file descriptor 2 pointed at /dev/null.

    TensorFlow 2.21 prints its C++ banners (absl's "before InitializeLog" notice, oneDNN,
    CPU features) while it is imported, and TF_CPP_MIN_LOG_LEVEL does not reach them. An
    import error is still raised as a Python exception, with its message, once stderr is back.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quiet_logging():
    """Our own progress at INFO; TensorFlow's, FAISS' and absl's chatter only from WARNING up."""
    from absl import logging as absl_logging

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("kd_keras").setLevel(logging.INFO)
    # TensorFlow's SavedModel writer logs through absl's own logger, whose level follows
    # --verbosity (INFO by default), not the root logger's.
    absl_logging.set_verbosity(absl_logging.WARNING)


@contextlib.contextmanager
def one_line_errors(prog, errors, first_line=False):
    """Turns `errors` raised in the block into `<prog>: error: <message>` and exit code 2.

    Set KD_KERAS_DEBUG=1 to re-raise with the traceback instead.

    Args:
      prog: command name, e.g. "kd_keras.train".
      errors: exception class or tuple of classes that mean bad input.
      first_line: print only the message's first line (for errors that may carry details).
    """
    try:
        yield
    except errors as err:
        message = str(err).strip()
        if first_line:
            message = message.splitlines()[0] if message else type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        if os.environ.get("KD_KERAS_DEBUG"):
            raise
        sys.exit(2)


def _flag_line(flag_values, name):
    flag = flag_values[name]
    choices = getattr(flag.parser, "enum_values", None)
    default = flag.default if flag.default not in (None, [], "") else None
    extra = []
    if choices:
        extra.append("one of " + ", ".join(choices))
    if default is not None:
        extra.append(f"default {default}")
    text = re.sub(r"^<[^>]*>: ", "", flag.help)  # absl's choices prefix, given below instead
    text = re.sub(r";\s*repeat this option.*$", " (repeat the flag for several)", text, flags=re.S)
    text = text.split(" See ")[0].strip()
    if choices and len(text) > 160:  # e.g. --method's one line per method: --helpfull has it
        text = text.split(":")[0] + "."
    if extra:
        text = f"{text} ({'; '.join(extra)})"
    body = textwrap.fill(text, 96, initial_indent="      ", subsequent_indent="      ")
    return f"  --{name}\n{body}"


def help_text(prog, summary, flag_names, flag_values=None):
    """The user-level help: what `prog` does, its most used flags, how to see them all."""
    if flag_values is None:
        from absl import flags

        flag_values = flags.FLAGS
    lines = [f"usage: {prog} [--flag=value ...] [--flagfile=FILE]", "", summary.strip(), ""]
    lines.append("most used flags:")
    lines += [_flag_line(flag_values, n) for n in flag_names if n in flag_values]
    lines += ["", f"All flags: {prog} --helpfull. Debugging: KD_KERAS_DEBUG=1 shows tracebacks."]
    return "\n".join(lines)


def exit_with_help_if_asked(prog, summary, flag_names, argv=None):
    """Prints `help_text` and exits 0 when the arguments ask for --help (-h, --helpshort);
    --helpfull is left to absl (every flag)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in HELP_ARGS for a in argv):
        print(help_text(prog, summary, flag_names))
        sys.exit(0)
