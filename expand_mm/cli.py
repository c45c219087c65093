"""Shared pieces of the command-line tools."""
import argparse
import os
import os.path as osp
import sys
import traceback
from typing import Callable

#: Where expand_mm's own code lives: an error raised there by a ``raise``
#: statement is one of its checks, with a message written for the user.
PACKAGE_DIR = osp.dirname(osp.abspath(__file__))
TOOLS_DIR = osp.join(osp.dirname(PACKAGE_DIR), 'tools')
#: Set to 1 to see the traceback of a refused input (for bug reports).
TRACEBACK_ENV = 'EXPAND_MM_TRACEBACK'


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None``: its help says what it means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ''
        return super()._get_help_string(action)


class UsageError(ValueError):
    """A wrong command-line input (a missing file, an option that does not apply)."""


def require_file(path: str, what: str) -> None:
    """Refuse a ``path`` given on the command line that is not an existing file.

    Raises:
        UsageError: Naming ``what`` it is and the absolute path looked at.
    """
    if not osp.isfile(path):
        kind = 'is a directory' if osp.isdir(path) else 'does not exist'
        raise UsageError(f'{what} {path!r} {kind} (looked at {osp.abspath(path)!r})')


def is_own_check(err: BaseException) -> bool:
    """Whether ``err`` was raised on purpose by a check of expand_mm or of its tools.

    True for an exception whose innermost frame is a ``raise`` statement in
    this package or in ``tools/``: its message says what is wrong and what
    would work. An error inside mmengine, torch or a user's config, and a bug
    of ours (an ``AttributeError`` on some line), keep their traceback.
    """
    if isinstance(err, UsageError):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    filename = osp.abspath(last.filename)
    ours = filename.startswith((PACKAGE_DIR + os.sep, TOOLS_DIR + os.sep))
    return ours and (last.line or '').lstrip().startswith('raise ')


def error_message(err: BaseException) -> str:
    """The user-facing text of ``err`` (a ``KeyError``'s own message, not its repr)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


def run_tool(main: Callable[[], int]) -> int:
    """Run a tool's ``main``; a refused input becomes one ``error:`` line and exit code 2.

    What :func:`is_own_check` recognises (and :class:`UsageError`) is printed
    without a traceback, after whatever the tool logged, so the reason is the
    last line a user sees; anything else propagates. With ``EXPAND_MM_TRACEBACK=1``
    nothing is caught.
    """
    if os.environ.get(TRACEBACK_ENV) == '1':
        return main()
    try:
        return main()
    except Exception as err:  # noqa: BLE001 (re-raised unless it is one of our checks)
        if not is_own_check(err):
            raise
        print(f'error: {error_message(err)}', file=sys.stderr)
        return 2
