"""How this process was started: torchrun's environment (a sweep when two or more processes run), and
its stderr prefixed with its rank. Imports no torch, so that main.py reads it before choosing a command.
"""
import os
import sys
from typing import NamedTuple

from base.errors import UserError


class Launch(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    restart: int  # torchrun --max_restarts: each attempt has its own keys in the store, continues the folder


def torchrun_launch(environ=None):
    """The Launch when torchrun started this process as one of two or more, else None."""
    environ = os.environ if environ is None else environ
    if 'LOCAL_RANK' not in environ or int(environ.get('WORLD_SIZE', '1')) < 2:
        return None
    return Launch(int(environ['RANK']), int(environ['WORLD_SIZE']), int(environ['LOCAL_RANK']),
                  int(environ.get('LOCAL_WORLD_SIZE', environ['WORLD_SIZE'])),
                  int(environ.get('TORCHELASTIC_RESTART_COUNT', '0')))


class RankZeroError(UserError):
    """Raised on the other ranks when rank 0 could not plan the sweep; rank 0 has printed why."""


class RankPrefixed:
    """A text stream that starts every line with `prefix` and writes whole lines only, so that lines of
    processes sharing one terminal or log do not cut into each other."""

    def __init__(self, stream, prefix):
        self.stream, self.prefix, self.partial = stream, prefix, ''

    def write(self, text):
        self.partial += text
        cut = max(self.partial.rfind('\n'), self.partial.rfind('\r')) + 1
        if cut:
            lines, self.partial = self.partial[:cut], self.partial[cut:]
            self.stream.write(''.join(self.prefix + line for line in lines.splitlines(keepends=True)))
            self.stream.flush()
        return len(text)

    def flush(self):
        self.stream.flush()

    def close_partial(self):
        if self.partial:
            self.write('\n')

    def __getattr__(self, name):
        return getattr(self.stream, name)


def prefix_stderr(launch):
    """Prefixes this process's stderr (tracebacks, progress bars, other libraries' output) with its rank, as the
    logging formatter does its own lines (base/logs.py); returns a function that undoes it."""
    original = sys.stderr
    sys.stderr = RankPrefixed(original, f'[rank {launch.rank}] ')

    def restore():
        if isinstance(sys.stderr, RankPrefixed):
            sys.stderr.close_partial()
        sys.stderr = original
    return restore
