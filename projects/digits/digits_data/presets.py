"""The digits sets that the project's configs and demo read, and the command that writes each."""
from __future__ import annotations

import shlex

from .settings import GenSettings

#: The generator's command line, from the repository root.
TOOL = 'projects/digits/tools/make_digits_data.py'

#: The 64x64 sets of ``projects/digits/configs`` (under ``data/digits64``):
#: large digits on small canvases are what lets a compact model learn to tell
#: digits apart within a few CPU minutes (calibration in the project README).
DIGITS64 = GenSettings(num_train=2000, num_val=500, img_size=64, min_digits=1, max_digits=4,
                       min_scale=16, max_scale=32)


def data_command(out: str, settings: GenSettings) -> str:
    """The generator command that writes the sets of ``settings`` under ``out``.

    The canvas and digit sizes are always given (the configs' comments name
    them); the counts, the digits per canvas and the seed only where they
    differ from the generator's defaults.

    Args:
        out: Output root (``--out``).
        settings: Generation settings.

    Returns:
        A shell command line.
    """
    options = [f'--img-size {settings.img_size}', f'--min-scale {settings.min_scale}',
               f'--max-scale {settings.max_scale}', f'--max-digits {settings.max_digits}']
    defaults = GenSettings()
    for name in ('min_digits', 'num_train', 'num_val', 'seed'):
        value = getattr(settings, name)
        if value != getattr(defaults, name):
            options.append(f'--{name.replace("_", "-")} {value}')
    return f'python {TOOL} --out {shlex.quote(out)} ' + ' '.join(options)
