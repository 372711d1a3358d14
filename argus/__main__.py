"""Command line: ``python -m argus users create EMAIL [--name NAME] [--admin]``, ``users list``
and ``store migrate [--to MONGO_URI] [--db NAME] [--from DATA_DIR]`` (SQLite -> MongoDB).

The password is read from standard input (first line) when it is not a
terminal, so scripts can pipe it in; on a terminal it is asked twice without
echo. Errors print one line to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from argus.auth import Authenticator, SignupError
from argus.commands.base import format_time
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
        print(f"{u.email:<{width}}  {u.role:<5}  {format_time(u.created_at)}  {u.name}")


def _store_migrate(args: argparse.Namespace) -> None:
    from argus.store import mongo_settings
    from argus.store.migrate import migrate_sqlite_to_mongo

    settings = Settings.from_env()  # also loads .env, so MONGO_URI/MONGO_DB may come from it
    data_dir = Path(args.from_dir).resolve() if args.from_dir else settings.data_dir
    env = mongo_settings()
    uri = args.to or (env[0] if env else None)
    if not uri:
        raise CliError("No MongoDB to copy to: pass --to mongodb://HOST:PORT/DB or set MONGO_URI.")
    db_name = args.db or os.environ.get("MONGO_DB", "").strip() or None
    try:
        migrate_sqlite_to_mongo(data_dir, uri, db_name, progress=print)
    except ValueError as exc:  # a malformed URI (the message never repeats its password)
        raise CliError(f"--to is {exc}") from None
    print("Done. Running it again copies nothing new.")


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
    store = commands.add_parser("store", help="manage the storage").add_subparsers(dest="action", required=True)
    migrate = store.add_parser(
        "migrate",
        help="copy everything from the SQLite store to MongoDB (idempotent)",
        description="Copy users, conversations, messages, attachments and feedback from the SQLite store "
        "to MongoDB, keeping ids and timestamps. Safe to run again: it upserts by id, so nothing is duplicated.",
    )
    migrate.add_argument("--to", metavar="MONGO_URI", help="the MongoDB to copy to (default: $MONGO_URI)")
    migrate.add_argument("--db", metavar="NAME", help="database name (default: $MONGO_DB, else the URI's path, else argus)")
    migrate.add_argument("--from", dest="from_dir", metavar="DATA_DIR", help="the data directory (default: $ARGUS_DATA_DIR)")
    migrate.set_defaults(func=_store_migrate)
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
