"""Errors the command line reports as one clear message instead of a traceback, and warnings."""


class ConfigurationError(ValueError):
    """A setting or file the user gave cannot be used; the message names it and what it expected."""


class DatasetFormatError(ValueError):
    """Bad dataset input; the message names the file, the position, the field and what was expected.

    A ``ValueError`` so callers that only know "bad value" still catch it, yet distinct so the
    command line can report it as one clear line instead of a traceback.
    """


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step, batch and controls."""


class CollapseWarning(UserWarning):
    """Training goes on but has collapsed: the loss sits at chance, or retrieval does."""
