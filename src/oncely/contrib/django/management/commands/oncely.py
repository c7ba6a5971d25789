"""``manage.py oncely …``: the ``oncely`` command on the project's configured store.

::

    manage.py oncely init                 # create the table (as the migration does)
    manage.py oncely check                # connectivity, schema, clock skew
    manage.py oncely keys ls --scope http:-
    manage.py oncely keys rm --key order-1 --name billing.charge
    manage.py oncely purge                # delete expired records

The same commands as the ``oncely`` CLI (:mod:`oncely.cli`, which does the work), with the
store URL taken from ``settings.ONCELY["store"]`` unless one is given after the command
(``manage.py oncely check redis://localhost:6379/0``); ``django`` and ``django://<alias>``
name a database of ``settings.DATABASES``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import click
from django.core.management.base import BaseCommand, CommandError  # type: ignore[import-untyped]

from oncely.cli import app
from oncely.contrib.django.conf import store_url
from oncely.contrib.django.database import alias_of
from oncely.errors import ConfigurationError

#: Commands of the CLI that take a store URL, and how many words name them.
_COMMANDS = {("init",): 1, ("check",): 1, ("purge",): 1, ("keys", "ls"): 2, ("keys", "show"): 2}
_COMMANDS[("keys", "rm")] = 2


def _with_url(argv: list[str]) -> list[str]:
    """``argv`` with the store URL in place: translated if it names a Django database,
    inserted from the settings if absent."""
    for words, length in _COMMANDS.items():
        if tuple(argv[:length]) == words:
            break
    else:
        return argv  # --help, --version, an unknown command: the CLI answers
    rest = argv[length:]
    given = rest[0] if rest and not rest[0].startswith("-") else None
    if given is not None and ("://" in given or alias_of(given) is not None):
        url, _ = store_url(given)
        rest = rest[1:]
    elif "--help" in rest:
        return argv
    else:
        url, _ = store_url(None)
    return [*argv[:length], url, *rest]


class Command(BaseCommand):  # type: ignore[misc]
    help = (
        "The oncely command (init, check, keys ls|show|rm, purge) on settings.ONCELY['store'] "
        "or on a store URL given after the command; 'manage.py oncely --help' lists them."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("argv", nargs=argparse.REMAINDER, help="oncely CLI arguments")

    def run_from_argv(self, argv: list[str]) -> None:
        # Everything after "manage.py oncely" belongs to the CLI (its own --help included),
        # so Django's parser is not asked.
        self._called_from_command_line = True
        try:
            self.execute(argv=argv[2:], force_color=False, no_color=False, skip_checks=True)
        except CommandError as exc:
            if str(exc):
                self.stderr.write(f"error: {exc}")
            sys.exit(exc.returncode)

    def handle(self, *args: Any, **options: Any) -> None:
        argv = [str(a) for a in (options.get("argv") or args)]
        out = getattr(self.stdout, "_out", sys.stdout)
        err = getattr(self.stderr, "_out", sys.stderr)
        try:
            argv = _with_url(argv)
        except ConfigurationError as exc:
            raise CommandError(str(exc)) from exc
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = app(args=argv, prog_name="manage.py oncely", standalone_mode=False)
            except click.exceptions.Exit as exc:
                if exc.exit_code:
                    raise CommandError("", returncode=exc.exit_code) from None
            except click.ClickException as exc:
                raise CommandError(exc.format_message(), returncode=exc.exit_code) from None
            except click.exceptions.Abort:
                raise CommandError("aborted") from None
        if isinstance(code, int) and code:
            raise CommandError("", returncode=code)
