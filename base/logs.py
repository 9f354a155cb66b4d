"""What a run prints: every module logs to its own logger (`logging.getLogger(__name__)`); main.py sends the
project's messages to stdout, one line each as written, with the rank prefix under torchrun. Imports no torch.
"""
import logging
import sys

# the project's top-level modules and folders; their INFO messages are the run's output, other libraries'
# messages show from WARNING up
PROJECT_NAMES = ('main', 'model', 'train', 'utils', 'localization', 'freia_funcs', 'base', 'image_data', 'runner',
                 'reporting', 'deployment', '__main__')


class RankFormatter(logging.Formatter):
    """The message as written, every line of it starting with `prefix` ('[rank 3] ' under torchrun, '' else)."""

    def __init__(self, prefix=''):
        super().__init__('%(message)s')
        self.prefix = prefix

    def format(self, record):
        text = super().format(record)
        return '\n'.join(self.prefix + line for line in text.split('\n')) if self.prefix else text


class CurrentStdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a message comes (a test's captured stream, a redirected one)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass  # always the current sys.stdout


class ProjectMessages(logging.Filter):
    def filter(self, record):
        return record.levelno >= logging.WARNING or record.name.split('.')[0] in PROJECT_NAMES


def configure_logging(rank=None):
    """Sends the project's messages (INFO and up) and other libraries' warnings to stdout; with `rank`, every
    line starts with '[rank N] '. Calling it again replaces the earlier handler."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, CurrentStdoutHandler)]:
        root.removeHandler(handler)
    handler = CurrentStdoutHandler()
    handler.setFormatter(RankFormatter('' if rank is None else f'[rank {rank}] '))
    handler.addFilter(ProjectMessages())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def drop_rank_prefix():
    """From now on the project's lines carry no rank prefix (a sweep's summary reads as a one-process run's)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, CurrentStdoutHandler):
            handler.setFormatter(RankFormatter())
