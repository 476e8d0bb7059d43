"""User mistakes as one line (exit code 2, no traceback unless ``--debug``); interrupts as exit codes.

The commands raise ordinary exceptions; :func:`run_command` turns the ones a user causes (a missing file
or folder, a bad recipe, a box table of other data, the Hub out of reach) into ``error: ...`` and
exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

__all__ = ["EXIT_USER_ERROR", "TrainingInterrupted", "UserError", "run_command", "user_error_message"]

EXIT_USER_ERROR = 2

HUB_UNREACHABLE_HINT = ("the Hugging Face Hub is not reachable (offline, or HF_HUB_OFFLINE=1): for a dataset set "
                        "data.data_dir (eval: --data-dir) to a local copy; for a model use a local folder (local-dir:PATH)")


class UserError(Exception):
    """A mistake in what the user asked for; the message names the problem and the fix."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint at the current step."""

    def __init__(self, signum: int, checkpoint: str, resume_command: str) -> None:
        super().__init__(f"interrupted ({signal.Signals(signum).name}): saved {checkpoint}; continue with: "
                         f"{resume_command}")
        self.signum, self.checkpoint, self.resume_command = signum, checkpoint, resume_command

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention: 130 after Ctrl-C (SIGINT), 143 after SIGTERM."""
        return 128 + self.signum


def _hub_unreachable(err: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    # datasets raises the builtin ConnectionError ("Couldn't reach 'ORG/NAME' on the Hub (...)")
    return isinstance(err, OfflineModeIsEnabled | LocalEntryNotFoundError | ConnectionError)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message for an error the user caused, or None for anything else (a bug)."""
    from hub_ccrop.boxes import BoxTableMismatch
    from hub_ccrop.checks import RecipeError

    if isinstance(err, UserError | RecipeError | BoxTableMismatch | FileNotFoundError | FileExistsError
                  | NotADirectoryError | IsADirectoryError):
        if isinstance(err, OSError) and err.filename is not None:  # raised by the OS: name the file
            return f"{err.strerror}: {err.filename}"
        return str(err)
    if _hub_unreachable(err):
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{first_line}: {HUB_UNREACHABLE_HINT}"
    return None


def _is_main_rank() -> bool:
    """Under ``accelerate launch`` every process meets the same mistake; one of them says so."""
    return os.environ.get("RANK", "0") == "0"


def run_command(command: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run a command; user mistakes print one line and return 2, interrupts return 130/143."""
    try:
        result = command()
    except TrainingInterrupted as err:
        if _is_main_rank():
            print(err, file=sys.stderr, flush=True)
        return err.exit_code
    except KeyboardInterrupt:  # outside the training loop: nothing to save
        if debug:
            raise
        if _is_main_rank():
            print("interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception as err:
        message = user_error_message(err)
        if message is None or debug:
            raise
        if _is_main_rank():  # one line, also for messages that quote a multi-line parser error
            print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return result if isinstance(result, int) else 0
