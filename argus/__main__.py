"""Command line: ``python -m argus users create EMAIL [--name NAME] [--admin]`` and ``users list``.

The password is read from standard input (first line) when it is not a
terminal, so scripts can pipe it in; on a terminal it is asked twice without
echo. Errors print one line to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import getpass
import sys
from datetime import datetime, timezone
from typing import Optional, Sequence

from argus.auth import Authenticator, SignupError
from argus.config import ConfigError, Settings
from argus.store import StoreError, open_store


class CliError(Exception):
    """A problem to report in one line (exit status 2)."""


def _read_password() -> str:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise CliError("No password given on standard input.")
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise CliError("The two passwords do not match.")
    return first


def _users_create(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    store = open_store(settings)
    try:
        password = _read_password()
        name = args.name if args.name is not None else args.email.strip().split("@")[0]
        auth = Authenticator(store, settings)
        user = auth.create_user(args.email, name, password, role="admin" if args.admin else None)
    finally:
        store.close()
    print(f"Created {'admin ' if user.role == 'admin' else ''}user {user.email}")


def _users_list(args: argparse.Namespace) -> None:
    settings = Settings.from_env()
    store = open_store(settings)
    try:
        users = store.list_users()
    finally:
        store.close()
    if not users:
        print("No users yet.")
        return
    width = max(len(u.email) for u in users)
    for u in users:
        created = datetime.fromtimestamp(u.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"{u.email:<{width}}  {u.role:<5}  {created}  {u.name}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m argus", description="Jarvis Argus administration.")
    commands = parser.add_subparsers(dest="command", required=True)
    users = commands.add_parser("users", help="manage accounts").add_subparsers(dest="action", required=True)
    create = users.add_parser("create", help="create an account (password from stdin or prompted)")
    create.add_argument("email")
    create.add_argument("--name", help="display name (default: the part of the email before @)")
    create.add_argument("--admin", action="store_true", help="make the account an administrator")
    create.set_defaults(func=_users_create)
    users.add_parser("list", help="list accounts").set_defaults(func=_users_list)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 error)."""
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, SignupError, StoreError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, EOFError):
        print("error: cancelled", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
