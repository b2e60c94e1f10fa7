"""The ``tokend`` command line: parses arguments, loads the config, calls one function.

Exit codes: 0 ok, 1 work failed, 2 usage, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import __version__, logs
from .config import Config, load_config, render
from .errors import ConfigError, GrantUnreadable, InputError, StoreConflict, TokendError, UsageError
from .model import Status, UnreadableGrant

Handler = Callable[[argparse.Namespace, Config], int]
PROGRESS_HELP = ("progress lines on stderr also when it is not a terminal (on a terminal "
                 "a progress bar is always shown)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not the whole usage block: scripts and journald read this.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tokend", description="Keeps OAuth 2.0 grants alive.")
    p.add_argument("--config", "-c", metavar="PATH",
                   help="TOML config file (default: $TOKEND_CONFIG, else built-in defaults)")
    p.add_argument("--version", action="version", version=f"tokend {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="the daemon: scheduled maintenance passes")
    run.add_argument("--once", action="store_true", help="one pass, then exit (1 if any failed)")
    run.set_defaults(handler=_run)

    demo = sub.add_parser("demo", help="everything embedded: fake provider, SQLite, daemon")
    demo.add_argument("--duration", type=_seconds, default=60.0,
                      help="stop after this long, then print the summary (default: 60s; "
                           "0: until Ctrl-C)")
    demo.add_argument("--listen", default="127.0.0.1:9464", help="metrics HOST:PORT")
    demo.add_argument("--dir", default=None, help="working directory (default: a temp dir)")
    demo.set_defaults(handler=_demo)

    check = sub.add_parser("check-config", help="validate and print the effective settings")
    check.set_defaults(handler=_check_config)

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", metavar="ACTION", parser_class=_Parser)
    db.required = True
    db.add_parser("upgrade", help="apply schema migrations").set_defaults(handler=_db_upgrade)

    grants = sub.add_parser("grants", help="inspect and manage grants").add_subparsers(
        dest="grants_command", metavar="ACTION", parser_class=_Parser)
    grants.required = True
    ls = grants.add_parser("list", help="one line per grant")
    ls.add_argument("--status", choices=[s.value for s in Status])
    ls.add_argument("--client")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=_grants_list)
    show = grants.add_parser("show", help="one grant in full (never its tokens)")
    show.add_argument("id", type=_grant_id)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_grants_show)
    imp = grants.add_parser("import", help="import token responses (JSON array or JSON lines)")
    imp.add_argument("file", help="a file, or - for stdin")
    imp.add_argument("--progress", action="store_true", help=PROGRESS_HELP)
    imp.set_defaults(handler=_grants_import)
    for name, helptext in (("disable", "pause a grant"), ("enable", "resume a grant"),
                           ("delete", "delete a grant")):
        action = grants.add_parser(name, help=helptext)
        action.add_argument("id", type=_grant_id)
        action.set_defaults(handler=_grants_action, action=name)

    auth = sub.add_parser("authorize", help="re-consent: run the authorization-code flow")
    auth.add_argument("--client", required=True, help="client name from the config")
    auth.add_argument("--listen", metavar="HOST:PORT",
                      help="local listener (default: host and port of the redirect_uri)")
    auth.add_argument("--redirect-uri", help="override the client's redirect_uri")
    auth.add_argument("--no-browser", action="store_true", help="only print the URL")
    auth.add_argument("--timeout", type=_seconds, default=300.0,
                      help="give up after this long (default 5m)")
    auth.set_defaults(handler=_authorize)

    link = sub.add_parser("consent-link", help="print a signed re-consent link for a grant")
    link.add_argument("id", type=_grant_id)
    link.add_argument("--ttl", default=None, help="how long the link works (default: "
                      "consent.link_ttl, 7d)")
    link.set_defaults(handler=_consent_link)

    status = sub.add_parser("status", help="one screen: grants, deadlines, held tokens, "
                            "blocked clients, replicas, backlog (from the database)")
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(handler=_status)

    token = sub.add_parser("token", help="print the current access token of a grant")
    token.add_argument("id", type=_grant_id)
    token.set_defaults(handler=_token)

    keys = sub.add_parser("keys", help="encryption keys for tokens at rest").add_subparsers(
        dest="keys_command", metavar="ACTION", parser_class=_Parser)
    keys.required = True
    keys.add_parser("generate", help="print a new key").set_defaults(handler=_keys_generate)
    rotate = keys.add_parser("rotate", help="re-encrypt every token with the newest key")
    rotate.add_argument("--progress", action="store_true", help=PROGRESS_HELP)
    rotate.set_defaults(handler=_keys_rotate)
    return p


def _grant_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"grant id must be a whole number, not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"grant id must be positive, not {value}")
    return value


def _seconds(text: str) -> float:
    from .durations import parse_timedelta

    try:
        if text.strip().replace(".", "", 1).isdigit():
            return float(text)  # a bare number on the command line is seconds
        return parse_timedelta(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler: Handler = args.handler
        if handler in (_keys_generate, _demo):  # need no configuration
            return handler(args, Config())
        config = load_config(args.config)
        # Log lines to stderr: stdout is the command's answer (JSON, a consent URL).
        logs.configure(config.logging)
        return handler(args, config)
    except TokendError as exc:
        # One line, whatever the message carries (scripts and journald read this).
        print("tokend: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A database error the store did not translate (a damaged schema, a constraint):
        # one line for the operator, never the SQL parameters (they may hold tokens).
        if not type(exc).__module__.startswith(("sqlalchemy", "psycopg", "sqlite3")):
            raise
        orig = getattr(exc, "orig", None) or exc
        lines = str(orig).strip().splitlines() or [type(orig).__name__]
        print(f"tokend: database error: {lines[0][:300]}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- commands


def _open(config: Config) -> Any:
    from .store import open_store

    return open_store(config)


def _check_config(_args: argparse.Namespace, config: Config) -> int:
    from .crypto import Cipher

    if config.encryption.keys:
        Cipher(config.encryption.keys)  # a malformed key is a config error, say it now
    sys.stdout.write(render(config))
    return 0


def _db_upgrade(_args: argparse.Namespace, config: Config) -> int:
    from .crypto import cipher_for
    from .store import Store, make_engine

    store = Store(make_engine(config.database.url), cipher_for(config, create=True))
    try:
        before, after = store.upgrade()
    finally:
        store.close()
    if before == after:
        print(f"database schema is current ({after})")
    else:
        print(f"database schema upgraded from {before or 'nothing'} to {after}")
    return 0


def _grants_list(args: argparse.Namespace, config: Config) -> int:
    store = _open(config)
    try:
        # A row that cannot be decoded is listed as unreadable (id and what is wrong).
        grants = store.iter_rows(status=args.status, client=args.client)
        if args.json:
            out = sys.stdout
            out.write("[")
            n = -1
            for n, g in enumerate(grants):  # streamed: flat memory for any table size
                out.write(("," if n else "") + "\n  " + json.dumps(g.public()))
            out.write("\n]\n" if n >= 0 else "]\n")
            return 0
        header = ("ID", "CLIENT", "TYPE", "USER", "TENANT", "STATUS", "REASON",
                  "ACCESS_EXPIRES", "REFRESH_EXPIRES")
        print("\t".join(header))
        for g in grants:
            d = g.public()
            if isinstance(g, UnreadableGrant):
                d["reason"] = g.error
            print("\t".join(str(x) if x is not None else "-" for x in (
                d["id"], d.get("client"), d.get("grant_type"), d.get("user_id"),
                d.get("tenant_id"), d["status"], d.get("reason"), d.get("access_expires_at"),
                d.get("refresh_expires_at"))))
        return 0
    finally:
        store.close()


def _grants_show(args: argparse.Namespace, config: Config) -> int:
    store = _open(config)
    try:
        data = store.get(args.id).public()
    except GrantUnreadable as exc:
        data = UnreadableGrant(exc.grant_id, exc.problem).public()
    finally:
        store.close()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {'-' if value is None else value}")
    return 0


def _grants_import(args: argparse.Namespace, config: Config) -> int:
    from .imports import check_stored, parse_records, validate
    from .policy import initial
    from .store import utcnow

    try:
        if args.file == "-":
            text = sys.stdin.read().removeprefix("\ufeff")
        else:
            with open(args.file, encoding="utf-8-sig") as fh:  # tolerate a BOM
                text = fh.read()
    except FileNotFoundError:
        raise InputError(f"import: {args.file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"import: {args.file} cannot be read: "
                         f"{getattr(exc, 'strerror', None) or 'not UTF-8 text'}") from None
    records = validate(parse_records(text), config, utcnow())
    from .progress import Progress

    store = _open(config)
    try:
        now = store.clock()
        with Progress("importing", len(records), plain=args.progress) as progress:
            ids = store.insert_grants(records, lambda g: initial(g, now, config.schedule),
                                      check=lambda stored: check_stored(records, stored),
                                      progress=progress)
    except StoreConflict:
        # The only unique constraint a new row can break: one client_credentials grant
        # per client (the daemon creates it for clients with client_credentials = true).
        raise InputError("import: a client_credentials grant of a client in the file is "
                         "already stored (one per client); nothing was imported") from None
    finally:
        store.close()
    print(f"imported {len(ids)} grant(s) (ids {ids[0]}-{ids[-1]})")
    return 0


def _grants_action(args: argparse.Namespace, config: Config) -> int:
    from .policy import on_enable

    store = _open(config)
    try:
        if args.action == "delete":
            store.delete(args.id)
            print(f"grant {args.id} deleted")
        elif args.action == "disable":
            store.set_status(args.id, Status.DISABLED, "operator", None)
            print(f"grant {args.id} disabled")
        else:
            grant = store.get(args.id)
            if grant.status == Status.OK:
                print(f"grant {args.id} is already ok")
                return 0
            status, reason, next_at = on_enable(grant, store.clock(), config.schedule)
            store.set_status(args.id, status, reason, next_at)
            print(f"grant {args.id} enabled ({status.value}); "
                  "the daemon checks it on its next pass")
    finally:
        store.close()
    return 0


def _status(args: argparse.Namespace, config: Config) -> int:
    from . import status

    store = _open(config)
    try:
        now = store.clock()
        s = status.summary(store.stats(list(config.clients)), store.deadlines(status.DEADLINES),
                           store.replicas(), now, config.schedule.interval)
    finally:
        store.close()
    print(json.dumps(s, indent=2) if args.json else status.render(s), end="\n" if args.json
          else "")
    return 0


def _token(args: argparse.Namespace, config: Config) -> int:
    from .api import TokenStore

    with TokenStore(config) as tokens:
        print(tokens.access_token_by_id(args.id))
    return 0


def _consent_link(args: argparse.Namespace, config: Config) -> int:
    from dataclasses import replace

    from .consent import link_for
    from .durations import Duration

    if args.ttl is not None:
        try:
            ttl = Duration.parse(args.ttl)
        except ValueError as exc:
            raise UsageError(f"--ttl: {exc}") from None
        if ttl.is_zero:
            raise UsageError("--ttl: must be longer than zero")
        config = replace(config, consent=replace(config.consent, link_ttl=ttl))
    store = _open(config)
    try:
        grant = store.get(args.id)
        print(link_for(config, grant, store.clock()))
    finally:
        store.close()
    return 0


def _keys_generate(_args: argparse.Namespace, _config: Config) -> int:
    from .crypto import generate_key

    print(generate_key())
    return 0


def _keys_rotate(args: argparse.Namespace, config: Config) -> int:
    if not config.encryption.keys:
        raise ConfigError(f"encryption.key_file: {config.encryption.key_file} holds no key")
    from .progress import Progress

    store = _open(config)
    try:
        total = sum(store.stats().counts.values())
        with Progress("re-encrypting", total, plain=args.progress) as progress:
            n = store.reencrypt(progress=progress)
    finally:
        store.close()
    print(f"re-encrypted the tokens of {n} grant(s) with the newest key")
    return 0


def _run(args: argparse.Namespace, config: Config) -> int:
    from .daemon import run_daemon, run_once

    return run_once(config) if args.once else run_daemon(config)


def _demo(args: argparse.Namespace, _config: Config) -> int:
    from .demo import run_demo

    return run_demo(duration=args.duration or None, listen=args.listen, workdir=args.dir)


def _authorize(args: argparse.Namespace, config: Config) -> int:
    from .authorize import authorize

    return authorize(config, client=args.client, listen=args.listen,
                     redirect_uri=args.redirect_uri, open_browser=not args.no_browser,
                     timeout=args.timeout)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["UsageError", "main"]
