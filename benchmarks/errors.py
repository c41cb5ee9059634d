"""One line, not a traceback, for a benchmark that stops on a known kind of failure."""

from __future__ import annotations

import sys
from collections.abc import Callable

# failures whose own message says what is wrong: no data folder, no such model, run or version in the MLflow
# store, a `cxr train` child that failed (its message is already above); matched by name so that scripts which
# never import MLflow do not pay for it
KNOWN_FAILURES = {"DataError", "ConfigError", "ServerError", "MlflowException", "CalledProcessError"}


def run_main(main: Callable[[], None]) -> None:
    """Call a benchmark's `main`; a known failure ends it with `error: <message>` and exit status 1."""
    try:
        main()
    except Exception as exc:
        if not any(kind.__name__ in KNOWN_FAILURES for kind in type(exc).__mro__):
            raise
        if type(exc).__name__ == "CalledProcessError":
            sys.exit(f"error: {' '.join(map(str, exc.cmd))} failed with exit status {exc.returncode} (its own "
                     "message is above)")
        sys.exit(f"error: {getattr(exc, 'message', None) or exc}")
