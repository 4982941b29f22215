"""Progress within an epoch: a live bar in a terminal, plain lines in a log.

:func:`epoch_progress` picks the form: in a terminal (stdout and stderr both
ttys) a tqdm bar on stderr whose postfix shows the running loss, accuracy and
images/s; otherwise (piped, redirected, CI) one line about every 10% of the
epoch through ``log`` (step, running loss and accuracy, img/s, ETA), so a log
shows life long before the epoch ends; with ``enabled=False`` (``--quiet``)
nothing. Every form has the same two calls: ``update`` after each step and
``close`` at the end.
"""

import math
import sys
from typing import Callable

from tqdm import tqdm

LINES_PER_EPOCH = 10
POSTFIX_EVERY = 5      # steps between postfix refreshes of the bar


def is_terminal() -> bool:
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def _isatty(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):   # a closed or replaced stream
        return False


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _metrics(loss_sum, hits, applied, skipped) -> str:
    """The running means (over ``applied`` steps) and, with fp16, the skipped steps."""
    text = (f"loss {loss_sum / applied:.4f} acc {hits / applied:.4f}" if applied
            else "loss - acc -")
    return text if skipped is None else f"{text} skipped {skipped}"


class _Nothing:
    def wants(self, step) -> bool:
        """Whether :meth:`update` after 0-based ``step`` shows the running metrics
        (the loop reads them from the graph only then)."""
        return False

    def update(self, step, loss_sum=None, hits=None, images_per_sec=0.0, *, skipped=None,
               applied=None):
        """After 0-based ``step``; the metrics (sums over the ``applied`` steps, by default
        all ``step + 1``; ``skipped``: fp16's skipped steps, None to show none) are
        given when :meth:`wants` said so."""

    def close(self):
        pass


class _Bar(_Nothing):
    """tqdm on stderr, with the running metrics as its postfix."""

    def __init__(self, desc, first, total):
        self.first = first
        self.bar = tqdm(desc=desc, unit="step", leave=False, dynamic_ncols=True, initial=first,
                        total=total, file=sys.stderr, disable=False)

    def wants(self, step) -> bool:
        done = step + 1
        return (done - self.first) % POSTFIX_EVERY == 1 or done == self.bar.total

    def update(self, step, loss_sum=None, hits=None, images_per_sec=0.0, *, skipped=None,
               applied=None):
        done = step + 1
        self.bar.update(1)
        if loss_sum is not None and self.wants(step):
            applied = done if applied is None else applied
            postfix = {"loss": f"{loss_sum / applied:.3f}" if applied else "-",
                       "acc": f"{hits / applied:.3f}" if applied else "-"}
            if skipped is not None:
                postfix["skipped"] = str(skipped)
            postfix["img_s"] = f"{images_per_sec:.0f}"
            self.bar.set_postfix(postfix, refresh=True)

    def close(self):
        self.bar.close()


class _Lines(_Nothing):
    """A line every ``total / LINES_PER_EPOCH`` steps (not at the end: the epoch line follows)."""

    def __init__(self, desc, total, batch_size, log):
        self.desc, self.total, self.batch_size, self.log = desc, total, batch_size, log
        self.every = max(1, math.ceil(total / LINES_PER_EPOCH))

    def wants(self, step) -> bool:
        done = step + 1
        return done % self.every == 0 and done < self.total

    def update(self, step, loss_sum=None, hits=None, images_per_sec=0.0, *, skipped=None,
               applied=None):
        done = step + 1
        if loss_sum is None or not self.wants(step):
            return
        eta = (_eta((self.total - done) * self.batch_size / images_per_sec)
               if images_per_sec > 0 else "?")
        applied = done if applied is None else applied
        self.log(f"{self.desc} step {done}/{self.total} ({100 * done // self.total}%): "
                 f"{_metrics(loss_sum, hits, applied, skipped)}  "
                 f"{images_per_sec:.0f} img/s  ETA {eta}")


def epoch_progress(desc: str, first: int, total: int, batch_size: int, *, enabled: bool,
                   log: Callable[[str], None], terminal=None):
    """The progress display of one epoch's steps ``first..total-1`` (see the module
    docstring). ``terminal`` overrides the tty test (None: look)."""
    if not enabled or first >= total:
        return _Nothing()
    if is_terminal() if terminal is None else terminal:
        return _Bar(desc, first, total)
    return _Lines(desc, total, batch_size, log)
