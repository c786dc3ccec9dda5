"""One line for every user mistake, at every entry point (train_grail.py, data.py, reports.py, bench/).

Library code raises `UserError(label, message)` where the user can fix something, the label naming
what failed (config, data, model, checkpoint, output, ...). `run` turns it, and any other exception,
into one line on stderr and a non-zero exit; `GRAIL_DEBUG=1` lets the traceback through instead.
"""
import os
import sys

INTERRUPTED_EXIT_CODE = 130  # the shell's code for Ctrl-C


class UserError(Exception):
    def __init__(self, label, message):
        super().__init__(f"[{label}] {message}")
        self.label, self.message = label, message  # what a peer rank needs to raise the same error


def first_line(err):
    """An exception's message as one line (library errors can span several)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run(main, *args):
    """Call main(*args); a failure ends the process with one line and exit code 1 (130 on Ctrl-C)."""
    if os.environ.get("GRAIL_DEBUG", "") not in ("", "0"):
        return main(*args)
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # a failed hub request surfaces once, as the error of what needed it
    try:
        return main(*args)
    except UserError as err:
        sys.exit(str(err))
    except KeyboardInterrupt:
        print("[stop] interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Exception as err:  # an unforeseen failure: still one line, with the way to see more
        sys.exit(f"[error] {type(err).__name__}: {first_line(err)} (GRAIL_DEBUG=1 shows the traceback)")
