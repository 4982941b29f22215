"""Errors that the command line reports as one line, without a traceback."""


def first_line(error) -> str:
    """The first non-blank line of an exception's message (TensorFlow's run to many), or
    its type name: the part of a library error that fits a one-line ``Error:``."""
    text = getattr(error, "message", None) or str(error)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class UserError(Exception):
    """A failure the user can fix: bad data, a missing checkpoint, a wrong file.

    The CLI prints ``Error: <message>`` on stderr and exits with code 1. The
    message is one line and says what to do.
    """


class DataError(UserError):
    """Missing, truncated or malformed CIFAR-10 files, or a failed download."""


class HistoryError(UserError):
    """A file that is not a resnet-graph history, or a run that is not in it."""


class CheckpointError(UserError):
    """A run folder without a usable checkpoint or config."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run after a step; a checkpoint holds its state.

    Not a failure: the CLI prints the message (how to resume) and exits with
    128 + the signal number, as a shell does for a signal.
    """

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.signal_number = signal_number
