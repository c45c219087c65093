"""Shared pieces of the command-line tools."""
import argparse
import difflib
import inspect
import os
import re
import socket
import urllib.error
import os.path as osp
import sys
import traceback
from typing import Any, Callable

from .errors import ExpandMMError, UsageError  # noqa: F401  (UsageError re-exported)

#: Set to 1 to see the traceback of a refused input (for bug reports).
TRACEBACK_ENV = 'EXPAND_MM_TRACEBACK'


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None``: its help says what it means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ''
        return super()._get_help_string(action)


def require_file(path: str, what: str) -> None:
    """Refuse a ``path`` given on the command line that is not an existing file.

    Raises:
        UsageError: Naming ``what`` it is and the absolute path looked at.
    """
    if not osp.isfile(path):
        kind = 'is a directory' if osp.isdir(path) else 'does not exist'
        raise UsageError(f'{what} {path!r} {kind} (looked at {osp.abspath(path)!r})')


def is_own_check(err: BaseException) -> bool:
    """Whether ``err`` is one of expand_mm's refusals (:class:`~expand_mm.errors.ExpandMMError`).

    Its message says what is wrong and what would work. Anything else -- an
    error inside mmengine, torch or a user's config, a bug of ours -- keeps
    its traceback.
    """
    return isinstance(err, ExpandMMError)


UNEXPECTED_KEYWORD = re.compile(r"got an unexpected keyword argument '(\w+)'")


def unknown_config_key(err: BaseException) -> str | None:
    """A config key that the class it configures does not take, said with the nearest one.

    MMEngine builds every registered class with ``obj_cls(**cfg)``, so a
    misspelled key (``custom_hooks.1.ends=2``) surfaces as Python's bare
    "unexpected keyword argument"; the frame of ``build_from_cfg`` still holds
    the class, whose signature gives the keys it does take. None for any
    other error.
    """
    match = UNEXPECTED_KEYWORD.search(str(err)) if isinstance(err, TypeError) else None
    frames = list(traceback.walk_tb(err.__traceback__))
    if match is None or not frames or frames[-1][0].f_code.co_name != 'build_from_cfg':
        return None
    cls = frames[-1][0].f_locals.get('obj_cls')
    try:
        options = [name for name, param in inspect.signature(cls).parameters.items()
                   if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)]
    except (TypeError, ValueError):  # no signature to read: leave the error as it is
        return None
    key, name = match.group(1), getattr(cls, '__name__', str(cls))
    near = difflib.get_close_matches(key, options, n=1)
    return (f'{name} has no option {key!r}' + (f'; did you mean {near[0]!r}?' if near else '.')
            + f' {name} takes {", ".join(options)}')


#: mmengine's loaders of weights named by a URL or an ``open-mmlab://``-style name.
_WEIGHT_LOADERS = ('load_from_http', 'load_from_openmmlab', 'load_from_torchvision',
                   'load_from_mmcls')


def failed_weight_download(err: BaseException) -> str | None:
    """What to do when pretrained weights named in a config cannot be downloaded.

    A config's ``init_cfg=dict(type='Pretrained', checkpoint='open-mmlab://...')``
    (or ``pretrained=``) is downloaded by mmengine when the model is
    initialised; without a network that ends in urllib's bare "Name or service
    not known". The loader frames hold the name, the URL and where torch's hub
    would have cached the file. None for any other error.
    """
    if not isinstance(err, (urllib.error.URLError, socket.gaierror, ConnectionError,
                            TimeoutError)):
        return None  # not the network (a full disk, an unwritable cache): said as it is
    names = {}
    for frame, _ in traceback.walk_tb(err.__traceback__):
        if frame.f_code.co_name in _WEIGHT_LOADERS and 'mmengine' in frame.f_code.co_filename:
            names.setdefault(frame.f_code.co_name, frame.f_locals.get('filename'))
    url = names.get('load_from_http')
    if url is None:
        return None
    name = next((names[loader] for loader in _WEIGHT_LOADERS[1:] if loader in names), url)
    import torch.hub  # only here: the tools import torch anyway, the message does not need it
    cache = osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(url.split('?')[0]))
    origin = f'{name!r} ({url})' if name != url else repr(url)
    return (f'could not download the pretrained weights {origin}: {err}. Without a network, '
            f'copy the file to {cache!r} (where torch caches it), or point the config\'s '
            "init_cfg checkpoint / pretrained that names it to a local file, or set it to None "
            'to start from random weights')


def error_message(err: BaseException) -> str:
    """The user-facing text of ``err`` (a ``KeyError``'s own message, not its repr)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


def _exit_code(status: Any) -> int:
    """A tool's ``main`` result as an exit code (non-integers are success)."""
    return status if isinstance(status, int) else 0


def run_tool(main: Callable[[], Any]) -> int:
    """Run a tool's ``main``; a refused input becomes one ``error:`` line and exit code 2.

    ``main`` returns the exit code, or anything else (e.g. the analysis tools'
    results, for callers in Python) for 0.

    What :func:`is_own_check` recognises (and :class:`UsageError`), and a
    config key the class it configures does not take (:func:`unknown_config_key`),
    and pretrained weights that cannot be downloaded (:func:`failed_weight_download`)
    are printed without a traceback, after whatever the tool logged, so the reason is the
    last line a user sees; anything else propagates. With ``EXPAND_MM_TRACEBACK=1``
    nothing is caught.
    """
    if os.environ.get(TRACEBACK_ENV) == '1':
        return _exit_code(main())
    try:
        return _exit_code(main())
    except Exception as err:  # noqa: BLE001 (re-raised unless it is one of our checks)
        message = error_message(err) if is_own_check(err) else (
            unknown_config_key(err) or failed_weight_download(err))
        if message is None:
            raise
        print(f'error: {message}', file=sys.stderr)
        return 2
