"""One exit-status policy, whether a command runs from the console or inside a warm worker.

A setting or file that cannot be used is one line ``adaptalign: error: ...`` and status 2; a loss
that stopped being finite is status 1 with its message; anything else is left to propagate.
"""

from __future__ import annotations

import sys

from adaptalign.common.errors import ConfigurationError, DatasetFormatError, NonFiniteLossError

PROG = "adaptalign"
BAD_INPUT = 2


def error_line(message: str) -> str:
    return f"{PROG}: error: {message}"


def reported_status(exc: BaseException) -> int | None:
    """Prints the one-line message of a user-facing error and returns its status; None otherwise."""
    if isinstance(exc, ConfigurationError | DatasetFormatError):
        code = BAD_INPUT
    elif isinstance(exc, NonFiniteLossError):
        code = 1
    else:
        return None
    print(error_line(str(exc)), file=sys.stderr)
    return code
