"""The option parser of the subcommands that are not Lightning's (compare, stress, tsne, report).

A bad option ends the command the way every other user error does: one line
``adaptalign: error: SUBCOMMAND: ...`` and exit status 2, instead of argparse's usage block
followed by its own ``prog: error:`` line.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one ``adaptalign: error:`` line."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("adaptalign").strip()
        where = f"{command}: " if command else ""
        print(f"adaptalign: error: {where}{message}", file=sys.stderr)
        raise SystemExit(2)
