"""The Prefect server process this project starts: Prefect's own ``prefect server start``,
with the server-side adjustments of :mod:`stablenew_core._prefect_internals` applied first.

Run as ``python -m stablenew_core._server_main --host 127.0.0.1 --port 4280``; every argument
is passed on to ``prefect server start``.
"""

from __future__ import annotations

import sys

from stablenew_core import _prefect_internals


def main(argv: list[str] | None = None) -> None:
    """Patch, then hand over to Prefect's CLI."""
    _prefect_internals.install_server_patches()
    from prefect.cli import app

    sys.argv = ["prefect", "server", "start", *(sys.argv[1:] if argv is None else argv)]
    app()


if __name__ == "__main__":
    main()
