"""The package's own refusals: one base class the tools turn into one ``error:`` line.

Every check of expand_mm that refuses an input raises a subclass of
:class:`ExpandMMError`; its message says what is wrong and what would work.
Each subclass also derives from the builtin a caller would expect
(``ValueError`` for a bad value, ``RuntimeError`` for a failed check), so
``except ValueError`` keeps working. Anything else (a bug, an error inside
mmengine or torch, a mistake in a config file's own Python) keeps its
traceback under :func:`expand_mm.cli.run_tool`.
"""


class ExpandMMError(Exception):
    """Base of every refusal raised on purpose by expand_mm (see the module docstring)."""


class ConfigError(ExpandMMError, ValueError):
    """A config value or option that expand_mm cannot use (names the key and what works)."""


class UsageError(ConfigError):
    """A wrong command-line input (a missing file, an option that does not apply)."""


class ConfigTypeError(ExpandMMError, TypeError):
    """A config value of the wrong kind (a module where a loss was expected, ...)."""


class SetupError(ExpandMMError, RuntimeError):
    """A model or hook that cannot run as configured, found once it runs (a recorded
    module that never ran, a teacher without weights)."""


class MissingFileError(ExpandMMError, FileNotFoundError):
    """A file a config or command names that does not exist."""


class VerificationUnavailableError(ExpandMMError, RuntimeError):
    """A contraction check that could not decide (its float64 re-check could not run)."""


class NonFiniteError(ExpandMMError, ValueError):
    """A model, checkpoint or output that holds a NaN or an Inf (names the tensors)."""
