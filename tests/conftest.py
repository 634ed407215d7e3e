"""Shared fixtures."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest


@pytest.fixture
def hrm_cli(monkeypatch, capsys) -> Callable[..., tuple[int, str, str]]:
    """Run `hrm ARGS` in-process through `hrm.cli.main`; returns (exit code, stdout, stderr)."""
    from hrm.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["hrm", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
