"""The `dicomhub` command: up, hub, watch, keys, bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from . import __version__, bench, keys, progress
from .config import ENV_KEY, Config, WatcherConfig, load
from .errors import DicomhubError
from .logs import FORMATS, LEVELS, LogSettings, describe, fatal, setup

log = logging.getLogger("dicomhub")

LOCAL_INGEST_KEY = "watcher-local"
LOCAL_READ_KEY = "read-local"


def _setup_logging(level: str, log_format: str = "text", debug: bool = False) -> None:
    setup(LogSettings(level, log_format, debug))


async def _until_signalled(main: Awaitable[None]) -> None:
    """Run `main` until it ends or SIGINT/SIGTERM arrives, then let it clean up.

    `main` is cancelled once: a second signal during its clean-up (flushing the
    outbox, closing sockets) is noted, not obeyed, so that the clean-up finishes."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    stopping = False

    def stop(sig: signal.Signals) -> None:
        nonlocal stopping
        if stopping:
            log.warning("%s again: still stopping (SIGKILL stops at once)", sig.name)
            return
        stopping = True
        log.info("%s received: stopping", sig.name)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# keys ---------------------------------------------------------------------------------


def _store(config: Config):  # type: ignore[no-untyped-def]
    from hub.stores import create_store

    return create_store(config.hub)  # SQLite or PostgreSQL, as the config says


async def _keys(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    await store.open()
    try:
        if args.keys_command == "create":
            name, role = keys.check_name(args.name), keys.check_role(args.role)
            key = keys.generate()
            await store.create_key(name, role, keys.digest(key), time.time())
            await _audit_cli(store, "key.create", f"{name} ({role})")
            print(key)
            print(f"created {role} key {name!r}; it is shown only once", file=sys.stderr)
        elif args.keys_command == "list":
            rows = await store.list_keys()
            print(f"{'NAME':<24} {'ROLE':<7} {'CREATED':<25} REVOKED")
            for row in rows:
                print(f"{row['name']:<24} {row['role']:<7} {row['created']:<25} "
                      f"{row['revoked'] or '-'}")
        elif args.keys_command == "revoke":
            if not await store.revoke_key(args.name, time.time()):
                print(f"error: no live key named {args.name!r}", file=sys.stderr)
                return 1
            await _audit_cli(store, "key.revoke", args.name)
            print(f"revoked key {args.name!r}", file=sys.stderr)
    finally:
        await store.close()
    return 0


async def _audit_cli(store, action: str, target: str) -> None:  # type: ignore[no-untyped-def]
    from hub.store import AuditEntry

    user = os.environ.get("USER") or os.environ.get("LOGNAME") or "?"
    await store.audit([AuditEntry(time.time(), "cli", "admin", action, target,
                                  f"local user {user}")])


def _watcher_key(config: WatcherConfig, environ: os._Environ[str] | dict[str, str]) -> str:
    """The ingest key from $DICOMHUB_KEY or [watcher] key_file, checked before anything starts."""
    value = environ.get(ENV_KEY)
    if value:
        return keys.check(value, f"${ENV_KEY}")
    if config.key_file is None:
        raise DicomhubError(f"no ingest key: set ${ENV_KEY} or [watcher] key_file")
    try:
        text = config.key_file.read_text()
    except FileNotFoundError:
        raise DicomhubError(f"no ingest key: ${ENV_KEY} is not set and [watcher] key_file "
                            f"{str(config.key_file)!r} does not exist") from None
    except OSError as exc:
        raise DicomhubError(f"[watcher] key_file {str(config.key_file)!r} cannot be read: "
                            f"{exc.strerror}") from None
    return keys.check(text, f"[watcher] key_file {str(config.key_file)!r}")


async def _local_keys(config: Config) -> tuple[str, str | None, str | None]:
    """For `up`: the local watcher's ingest key (made or reused), on the very
    first start only a new read key to show the user, and a one-time login
    token for the dashboard."""
    from hub.session import new_login_link

    store = _store(config)
    await store.open()
    try:
        first_start = await store.count_keys() == 0
        key_file = config.watcher.key_file or config.watcher.state_dir / "ingest.key"
        ingest_key = None
        with contextlib.suppress(OSError, keys.KeyFormatError):
            candidate = keys.check(key_file.read_text(), "key file")
            if await store.find_key(keys.digest(candidate)) is not None:
                ingest_key = candidate
        if ingest_key is None:
            await store.revoke_key(LOCAL_INGEST_KEY, time.time())
            ingest_key = keys.generate()
            await store.create_key(LOCAL_INGEST_KEY, "ingest", keys.digest(ingest_key),
                                   time.time())
            await _audit_cli(store, "key.create", f"{LOCAL_INGEST_KEY} (ingest)")
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(ingest_key + "\n")
        read_key = None
        login = await new_login_link(store, LOCAL_READ_KEY)
        if login is None:  # first start, or the local read key was revoked
            read_key = keys.generate()
            await store.create_key(LOCAL_READ_KEY, "read", keys.digest(read_key), time.time())
            await _audit_cli(store, "key.create", f"{LOCAL_READ_KEY} (read)")
            login = await new_login_link(store, LOCAL_READ_KEY)
            if not first_start:
                read_key = None  # show a key only once; the link is enough
        return ingest_key, read_key, login
    finally:
        await store.close()


# services -------------------------------------------------------------------------------


async def _hub(config: Config) -> None:
    from hub.app import start

    runner, url = await start(config.hub)
    print(f"dicomhub hub listening on {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _watch(config: Config, key: str) -> None:
    from watcher.service import Watcher

    watcher = Watcher(config.watcher, key)
    await progress.while_running(watcher.run(), watcher.progress)


async def _up(config: Config) -> None:
    from hub.app import start
    from watcher.service import Watcher

    ingest_key, read_key, login = await _local_keys(config)
    runner, url = await start(config.hub)
    try:
        ws_url = url.replace("http", "ws", 1) + "/ws/ingest"
        # Its own hub: trust the hub's certificate (self-signed is fine) unless told
        # which CA to use.
        ca_file = config.watcher.ca_file or config.hub.tls_cert
        # The embedded hub only: failover hubs of the config are not for `up`.
        watcher = Watcher(replace(config.watcher, hub_url=ws_url, failover_urls=(),
                                  ca_file=ca_file), ingest_key)
        folders = ", ".join(str(p) for p in config.watcher.watch)
        lines = [f"dicomhub {__version__} is running",
                 f"  dashboard   {url}/login?token={login}  (one-time link)",
                 f"  REST API    {url}/api/series",
                 f"  watching    {folders}"]
        if read_key is not None:
            lines += ["", "  read key (shown once; keep it):", f"    {read_key}", "",
                      f'  curl -H "Authorization: Bearer {read_key}" {url}/api/series']
        else:
            lines += ["  (make a read key with: dicomhub keys create --role read --name NAME)"]
        print("\n".join(lines), flush=True)
        await progress.while_running(watcher.run(), watcher.progress)
    finally:
        await runner.cleanup()


# parsing -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the command must survive the subparser's defaults.
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $DICOMHUB_CONFIG or ./config.toml)")
    common.add_argument("--log-level", choices=LEVELS, default=argparse.SUPPRESS,
                        help="default: [hub] or [watcher] log_level, else info")
    common.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS,
                        help="log events as text (the default) or one JSON object a line")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks (in the log and on errors) and log at debug "
                             "level unless --log-level says otherwise")
    parser = argparse.ArgumentParser(prog="dicomhub", parents=[common],
                                     description="A watched folder of DICOM files as a "
                                                 "live, queryable index.")
    parser.add_argument("--version", action="version", version=f"dicomhub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", parents=[common], help="run the hub and a watcher together")
    sub.add_parser("hub", parents=[common], help="run the hub alone")
    sub.add_parser("watch", parents=[common], help="run a watcher alone (key from "
                   f"${ENV_KEY} or [watcher] key_file)")
    keys_parser = sub.add_parser("keys", parents=[common], help="manage API keys")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True,
                                          metavar="ACTION")
    create = keys_sub.add_parser("create", parents=[common],
                                 help="create a key and print it (the only stdout line)")
    create.add_argument("--role", required=True, choices=keys.ROLES)
    create.add_argument("--name", required=True)
    keys_sub.add_parser("list", parents=[common], help="list keys (never the keys themselves)")
    revoke = keys_sub.add_parser("revoke", parents=[common], help="revoke a key by name")
    revoke.add_argument("name")
    bench.add_arguments(sub.add_parser(
        "bench", help="measure throughput, latency, fan-out, reads and memory with "
                      "real processes; prints a table and writes JSON"))
    for name, module in _tools().items():
        module.add_arguments(sub.add_parser(name, parents=[common], help=module.HELP))
    return parser


# Commands that run once and exit (status, doctor, import, ...), each a module with
# HELP, add_arguments(parser) and main(args) -> exit code. They load the config
# themselves: doctor, for one, must report a broken config rather than die of it.
TOOLS: tuple[tuple[str, str], ...] = (
    ("doctor", "dicomhub.doctor"),
    ("status", "dicomhub.status"),
    ("import", "dicomhub.importer"),
)


def _tools() -> dict[str, Any]:
    return {name: importlib.import_module(module) for name, module in TOOLS}


def _log_settings(args: argparse.Namespace, config: Config | None) -> LogSettings:
    """The command line wins, then --debug (debug level), then the config."""
    debug = bool(getattr(args, "debug", False))
    level = getattr(args, "log_level", None) or ("debug" if debug else None)
    if level is None and config is not None:
        level = config.watcher.log_level if args.command == "watch" else config.hub.log_level
    return LogSettings(level or "info", getattr(args, "log_format", "text"), debug)


def _os_error(exc: OSError) -> str:
    """What the system refused, and on which file, on one line."""
    if exc.filename is None or exc.strerror is None:
        return describe(exc)
    return f"{exc.strerror}: {str(exc.filename)!r} (check the folders and files the " \
           "config names, and their permissions)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; every failure a user can cause ends in one line on stderr and
    exit code 2 (with --debug, its traceback as well)."""
    args = _parser().parse_args(argv)
    if args.command == "bench":  # runs its own hubs and watchers; no config of ours
        return bench.main(args)
    settings = _log_settings(args, None)
    setup(settings)
    try:
        tools = _tools()
        if args.command in tools:
            return int(tools[args.command].main(args))
        config = load(getattr(args, "config", None))
        settings = _log_settings(args, config)
        setup(settings)
        runner: Callable[[], Awaitable[None]]
        if args.command == "keys":
            return asyncio.run(_keys(args, config))
        if args.command == "watch":
            key = _watcher_key(config.watcher, os.environ)
            runner = lambda: _watch(config, key)  # noqa: E731
        elif args.command == "hub":
            runner = lambda: _hub(config)  # noqa: E731
        else:
            runner = lambda: _up(config)  # noqa: E731
        asyncio.run(_until_signalled(runner()))
        return 0
    except (DicomhubError, keys.KeyFormatError) as exc:
        fatal(settings, str(exc), exc)
        return 2
    except BrokenPipeError:
        # Whoever read stdout stopped (`dicomhub status | head`): nothing to report,
        # and nothing more to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        fatal(settings, _os_error(exc), exc)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A bug, not a user's error: say so in one line, and all of it with --debug.
        fatal(settings, f"internal error: {describe(exc)}"
              + ("" if settings.debug else " (run with --debug for details)"), exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
