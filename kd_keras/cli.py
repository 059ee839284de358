"""What kd_keras' command lines share: quiet logging and bad input reported in one line."""

import contextlib
import logging
import os
import sys

from kd_keras.choices import PREEMPTED_EXIT_CODE  # noqa: F401  (the command lines' exit code)


def quiet_logging():
    """Our own progress at INFO; TensorFlow's, FAISS' and absl's chatter only from WARNING up."""
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("kd_keras").setLevel(logging.INFO)


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
