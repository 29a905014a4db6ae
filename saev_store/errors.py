"""Errors a user can cause, and how every command line prints them."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input: the message names the thing and says what to do."""


def cli_errors(on_interrupt: str):
    """Decorator for a click command: a UserError prints as one line (exit 2, no traceback);
    Ctrl-C prints `on_interrupt`, which says what was kept and how to resume (exit 130)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            except KeyboardInterrupt:
                print(f"interrupted: {on_interrupt}", file=sys.stderr)
                sys.exit(130)

        return wrapper

    return decorate


def cli_class(base, on_interrupt: str):
    """A click Command or Group class (`base`) that reports errors as `cli_errors` says, for the whole
    command line: every subcommand, and whatever its callback raises. The three CLIs (saev-store,
    saev-train, saev-tools) use it, so a UserError reads the same in each: `error: <message>`, exit 2."""

    class Reporting(base):
        def invoke(self, ctx):
            return cli_errors(on_interrupt)(super().invoke)(ctx)

    Reporting.__name__ = f"Reporting{base.__name__}"
    return Reporting
