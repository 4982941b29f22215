"""Errors that the command line reports as one line, without a traceback."""


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
