"""Command-line entry points. Each `main()` parses its flags and calls the library."""

from __future__ import annotations

import os
import sys
from typing import Callable


def run_cli(command: Callable[[], None]) -> None:
    """Run a command; an error becomes one line on stderr and exit status 1.

    Set MLX_LLAVA_DEBUG=1 to see the traceback instead.
    """
    try:
        command()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # noqa: BLE001 - every failure ends as one readable line
        if os.environ.get("MLX_LLAVA_DEBUG"):
            raise
        from ..distributed import rank_prefix  # "rank R: " when mlx.launch runs several

        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{rank_prefix()}error: {message}", file=sys.stderr)
        sys.exit(1)
