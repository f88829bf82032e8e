"""The one exception type for user mistakes: the CLI prints it as one line and exits 2, never a traceback."""

from __future__ import annotations

import contextlib


class UserError(Exception):
    """A mistake the user can fix: what is wrong, where (file, dotted key, row), how to fix it."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.format())

    def format(self) -> str:
        head = f"{self.where}: " if self.where else ""
        tail = f" Fix: {self.fix}" if self.fix else ""
        return f"{head}{self.what}{tail}"


@contextlib.contextmanager
def located(where: str):
    """A UserError raised inside without a location gets `where` (the recipe file)."""
    try:
        yield
    except UserError as e:
        if e.where is None:
            e.where = where
            e.args = (e.format(),)
        raise
