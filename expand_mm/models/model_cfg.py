"""Helpers for model configs that hold another model's config (ExpandNet, the wrappers).

A builder that wraps a model config receives, at its top level, keys that
MMEngine's Runner and mm's own APIs set on whatever model config they get
(``data_preprocessor``, ``pretrained``, ``train_cfg``, ...). These helpers give
them to the inner model, as the inner model would have received them alone,
and refuse anything else with the nearest option named.
"""
from __future__ import annotations

import copy
import difflib
from typing import Any, Mapping, Sequence

from mmengine.logging import MMLogger

from ..errors import ConfigError

# Top-level model keys that mm's own APIs set on whatever model config they get
# (mmseg's init_model: pretrained, train_cfg); they go to the compact model.
API_MODEL_KEYS = ('pretrained', 'train_cfg', 'test_cfg', 'init_cfg')


def apply_data_preprocessor(inner_cfg: dict, given: Any, owner: str,
                            announce: bool = True) -> None:
    """Give a wrapper's ``data_preprocessor`` to the model config it wraps (in place).

    A full config (with a ``type``: MMEngine's Runner passes the config's
    top-level one) is the inner model's only when it has none, as for any
    model. One without a ``type`` can only be a change of some of its keys
    (``--cfg-options model.data_preprocessor.size=...``): those keys are set
    on the inner model's preprocessor, where the same option on the compact
    config would have set them, instead of being dropped.
    """
    if given is None:
        return
    current = inner_cfg.get('data_preprocessor')
    if current is None:
        inner_cfg['data_preprocessor'] = copy.deepcopy(given)
    elif isinstance(given, Mapping) and 'type' not in given:
        if not isinstance(current, Mapping):
            raise ConfigError(f'{owner}: data_preprocessor={dict(given)} changes keys of the '
                              f"inner model's data_preprocessor, which is {current!r}")
        merged = copy.deepcopy(dict(current))
        merged.update(copy.deepcopy(dict(given)))
        inner_cfg['data_preprocessor'] = merged
        if announce:
            MMLogger.get_current_instance().info(
                f"{owner}: data_preprocessor keys {sorted(given)} set on the wrapped model's "
                'data_preprocessor')


def check_model_overrides(overrides: Mapping[str, Any], owner: str, options: Sequence[str],
                          inner: Any, inner_key: str) -> None:
    """Refuse top-level model keys that are neither options nor ``API_MODEL_KEYS``.

    A wrapper passes those keys on to the model it builds, so a misspelled
    option would otherwise fail deep in that model's ``__init__`` (or not at
    all), blaming the wrong class.

    Args:
        overrides: The top-level keys the wrapper did not take as options.
        owner: The wrapper's type name, for the message.
        options: The wrapper's own option names (suggested for typos).
        inner: The inner model's config dict (its keys are pointed to).
        inner_key: Where that dict sits under ``model`` (e.g. ``'student'``).

    Raises:
        ConfigError: Naming every unknown key and the option it resembles.
    """
    unknown = sorted(set(overrides) - set(API_MODEL_KEYS))
    if not unknown:
        return
    hints = []
    for key in unknown:
        near = difflib.get_close_matches(key, options, n=1)
        if near:
            hints.append(f'{key!r}: did you mean {near[0]!r}?')
        elif isinstance(inner, Mapping) and key in inner:
            hints.append(f'{key!r} is a key of the inner model: set it inside `{inner_key}` '
                         f'(--cfg-options model.{inner_key}.{key}...)')
    inner_keys = [k for k in unknown if isinstance(inner, Mapping) and k in inner]
    if len(inner_keys) > 1:
        # Typically `model = dict(type='ExpandNet', model=...)` without `_delete_=True`,
        # which merges the inherited compact model's keys into the wrapper's dict.
        hints = [f'{inner_keys} are keys of the inner model: if the config inherits the '
                 f"compact model, start the dict with `_delete_=True` (model = dict("
                 f"_delete_=True, type='{owner}', ...)) so they are not merged into it"]
    raise ConfigError(f'{owner}: unknown option(s) {unknown}. '
                      + (' '.join(h if h.endswith(('?', '.')) else h + '.' for h in hints)
                         + ' ' if hints else '')
                      + f'{owner} takes {", ".join(options)}; the inner model\'s own settings '
                      f'go inside `{inner_key}`')
