"""Shared by the command-line scripts: user errors become one clear line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def run_cli(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace, program: str) -> Any:
    """Call ``main(args)``; a user error (bad input, missing file) exits with status 2 and one line of text."""
    try:
        return main(args)
    except USER_ERRORS as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{program}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
