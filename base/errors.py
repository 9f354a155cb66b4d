"""Mistakes in the input that the user can fix: raised anywhere, printed by main.py in one line (exit 2); a
run stopped by a bug (exit 1).

Imports nothing, so that main.py catches them without loading torch.
"""


class UserError(Exception):
    """A mistake in the input (path, value, file) that the user can fix; main.py prints it in one line."""


class DataProblems(UserError):
    """Every unusable file of a class, found in one scan; str() lists them one per line."""

    def __init__(self, class_name, problems):
        self.problems = problems
        lines = [f'class {class_name}: {len(problems)} unusable file(s) or folder(s); fix or remove them:']
        super().__init__('\n'.join(lines + [f'  - {path}: {reason}' for path, reason in problems]))


class RunStopped(Exception):
    """A run stopped by an unexpected error (a bug): its traceback and the line saying how to continue are
    printed already; main.py exits with status 1."""
