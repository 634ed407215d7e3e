"""`hrm`: the command-line interface (typer + rich).

Every command takes `--json` for machine-readable output. Bad input (unknown model, malformed
profile, infeasible limits, ...) raises an `HRMError`; `main` prints its message on one line and
exits with code 2, never with a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from hrm.errors import HRMError

app = typer.Typer(
    name="hrm",
    help="Hierarchical Roofline Model for offloaded MoE inference: profile a machine, find the "
         "best offloading policy, run it, and compare predicted with measured throughput.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def emit_json(data: Any) -> None:
    """Print `data` as JSON on stdout (the `--json` output of every command)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# ---- commands ----------------------------------------------------------------------------------
# Each command lives in the module of its concept and is registered here. Modules that need torch
# import it inside the command function, so `hrm --help` stays fast.


def main() -> None:
    """Console-script entry point: run the app, turning HRMError into a one-line error + exit 2."""
    try:
        app(standalone_mode=False)
    except HRMError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
