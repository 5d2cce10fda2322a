"""Configuration: `config.toml` loaded into frozen, typed objects.

Relative paths resolve against the folder of the file they come from, so a
config works the same from any working directory. Errors name the key and the
value: ``Config 'hub.port' has value 'abc': not an integer``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_FILE = "config.toml"
ENV_CONFIG = "DICOMHUB_CONFIG"
ENV_KEY = "DICOMHUB_KEY"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*:)[^@/]*@")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&]*")


@dataclass(frozen=True)
class HubConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    database: Path = Path("data/hub.sqlite3")  # the SQLite file, unless database_url is set
    # [hub] database = "postgresql://…": the PostgreSQL store instead of the file.
    database_url: str = ""
    stable_after: float = 10.0
    log_level: str = "info"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # require client certificates signed by this CA
    allow_insecure: bool = False  # plain HTTP on an address other than loopback
    # Origins besides the hub's own from which a dashboard session may be used
    # (e.g. the public name of a reverse proxy in front of the hub).
    allowed_origins: tuple[str, ...] = ()
    phi_display: str = "full"  # "masked": the read role sees initials and hashed IDs
    encryption_key_env: str = ""  # names the variable holding the database key

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class DicomConfig:
    """The watcher's DICOM listener (C-ECHO, C-STORE), off unless enabled."""

    enabled: bool = False
    ae_title: str = "DICOMHUB"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE title
    store_into: Path | None = None  # None: a "dicom" folder in the first watched folder
    max_associations: int = 10


@dataclass(frozen=True)
class WatcherConfig:
    hub_url: str = "ws://127.0.0.1:8080/ws/ingest"  # the first hub tried
    # Further hubs, tried in turn when one cannot be reached (config: hub_url as a list).
    failover_urls: tuple[str, ...] = ()
    watch: tuple[Path, ...] = (Path("inbox"),)
    state_dir: Path = Path("data/watcher")
    settle: float = 1.0
    key_file: Path | None = Path("data/watcher/ingest.key")
    watcher_id: str = ""
    polling: bool = False
    poll_interval: float = 2.0
    rescan_interval: float = 300.0  # seconds between reconciliation walks; 0 = never
    reconnect_max: float = 30.0  # longest wait between attempts to reach the hub
    workers: int = 0  # 0 = one per core
    batch_size: int = 200
    log_level: str = "info"
    ca_file: Path | None = None  # trust this CA for the hub (default: the system store)
    client_cert: Path | None = None  # for hubs that require client certificates
    client_key: Path | None = None
    encryption_key_env: str = ""  # names the variable holding the outbox key
    dicom: DicomConfig = field(default_factory=DicomConfig)

    @property
    def hub_urls(self) -> tuple[str, ...]:
        """Every hub, in the order the watcher tries them."""
        return (self.hub_url, *self.failover_urls)

    @property
    def dicom_folder(self) -> Path:
        return self.dicom.store_into or self.watch[0] / "dicom"


@dataclass(frozen=True)
class Config:
    hub: HubConfig = field(default_factory=HubConfig)
    watcher: WatcherConfig = field(default_factory=WatcherConfig)
    source: Path | None = None  # the file it came from, None for built-in defaults


def _fail(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"Config '{key}' has value {value!r}: {why}")


class _Section:
    """Typed reads from one table of the TOML document."""

    def __init__(self, name: str, table: Any, base: Path) -> None:
        if not isinstance(table, dict):
            raise _fail(name, table, "expected a table")
        self.name, self.table, self.base = name, dict(table), base

    def _get(self, key: str, default: Any) -> Any:
        return self.table.pop(key, default)

    def string(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise _fail(f"{self.name}.{key}", value, "not a string")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self._get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(f"{self.name}.{key}", value, "not an integer")
        if not lo <= value <= hi:
            raise _fail(f"{self.name}.{key}", value, f"must be between {lo} and {hi}")
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self._get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _fail(f"{self.name}.{key}", value, "not a number")
        if not lo <= value <= hi:
            raise _fail(f"{self.name}.{key}", value, f"must be between {lo} and {hi}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise _fail(f"{self.name}.{key}", value, "not true or false")
        return value

    def path(self, key: str, default: Path | None) -> Path | None:
        value = self._get(key, default)  # defaults resolve against `base` like values
        if value is None or value == "":
            return None
        if not isinstance(value, (str, Path)):
            raise _fail(f"{self.name}.{key}", value, "not a path string")
        return (self.base / Path(value).expanduser()).resolve()

    def required_path(self, key: str, default: Path) -> Path:
        value = self.path(key, default)
        if value is None:
            raise _fail(f"{self.name}.{key}", "", "must not be empty")
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in allowed:
            raise _fail(f"{self.name}.{key}", value, f"not one of {', '.join(allowed)}")
        return value

    def origins(self, key: str) -> tuple[str, ...]:
        value = self._get(key, [])
        if not isinstance(value, list) or not all(
            isinstance(v, str) and v.startswith(("http://", "https://")) and
            v.rstrip("/").count("/") == 2 for v in value
        ):
            raise _fail(f"{self.name}.{key}", value,
                        "expected a list of origins like \"https://hub.example.org\"")
        return tuple(v.rstrip("/") for v in value)

    def paths(self, key: str, default: tuple[Path, ...]) -> tuple[Path, ...]:
        value = self._get(key, [str(p) for p in default])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value
        ):
            raise _fail(f"{self.name}.{key}", value, "expected a non-empty list of folders")
        return tuple((self.base / Path(v).expanduser()).resolve() for v in value)

    def level(self, key: str) -> str:
        value = self.string(key, "info")
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise _fail(f"{self.name}.{key}", value, "not one of debug, info, warning, error")
        return value.lower()

    def done(self) -> None:
        if self.table:
            unknown = ", ".join(sorted(self.table))
            raise ConfigError(f"Config '{self.name}' has unknown key(s): {unknown}")


def redact_url(url: str) -> str:
    """`url` fit to show: a password (`user:password@host`, `?password=`) becomes ***."""
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD.sub(r"\1***@", url))


def _database_url(section: _Section) -> str:
    """`database` when it is a PostgreSQL URL (then taken from the section), else ""."""
    value = section.table.get("database")
    if not isinstance(value, str) or "://" not in value:
        return ""
    section._get("database", "")
    if not value.startswith(POSTGRES_SCHEMES):
        raise _fail("hub.database", redact_url(value), "a URL must start with postgresql:// "
                                                       "(a plain path is a SQLite file)")
    return value


def _hub(section: _Section) -> HubConfig:
    d = HubConfig()
    database_url = _database_url(section)  # before `database`: it takes the key
    hub = HubConfig(
        host=section.string("host", d.host),
        port=section.integer("port", d.port, 0, 65535),
        database=section.required_path("database", d.database),
        database_url=database_url,
        stable_after=section.number("stable_after", d.stable_after, 0.0, 7 * 86400.0),
        log_level=section.level("log_level"),
        tls_cert=section.path("tls_cert", None),
        tls_key=section.path("tls_key", None),
        client_ca=section.path("client_ca", None),
        allow_insecure=section.boolean("allow_insecure", False),
        allowed_origins=section.origins("allowed_origins"),
        phi_display=section.choice("phi_display", "full", ("full", "masked")),
        encryption_key_env=section.string("encryption_key_env", ""),
    )
    section.done()
    if hub.database_url and hub.encryption_key_env:
        raise _fail("hub.encryption_key_env", hub.encryption_key_env,
                    "encryption with SQLCipher is for a SQLite file, not PostgreSQL; remove "
                    "it: at-rest encryption is then the database server's or its disk's job")
    if (hub.tls_cert is None) != (hub.tls_key is None):
        raise ConfigError("Config 'hub.tls_cert' and 'hub.tls_key' go together: "
                          "set both (HTTPS) or neither")
    if hub.client_ca is not None and not hub.tls:
        raise _fail("hub.client_ca", str(hub.client_ca),
                    "client certificates need TLS: set hub.tls_cert and hub.tls_key")
    return hub


def _ae_title(key: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or "\\" in value \
            or not all(" " <= c <= "~" for c in value):
        raise _fail(key, value, "an AE title is 1 to 16 printable ASCII characters, "
                                "not only spaces, without a backslash")
    return value.strip()


def _dicom(section: _Section, watch: tuple[Path, ...]) -> DicomConfig:
    d = DicomConfig()
    aets = section._get("allowed_calling_aets", [])
    if not isinstance(aets, list):
        raise _fail(f"{section.name}.allowed_calling_aets", aets, "expected a list of AE titles")
    dicom = DicomConfig(
        enabled=section.boolean("enabled", d.enabled),
        ae_title=_ae_title(f"{section.name}.ae_title", section._get("ae_title", d.ae_title)),
        host=section.string("host", d.host),
        port=section.integer("port", d.port, 0, 65535),
        allowed_calling_aets=tuple(_ae_title(f"{section.name}.allowed_calling_aets", a)
                                   for a in aets),
        store_into=section.path("store_into", None),
        max_associations=section.integer("max_associations", d.max_associations, 1, 1000),
    )
    section.done()
    if dicom.store_into is not None and not any(
            dicom.store_into == root or root in dicom.store_into.parents for root in watch):
        raise _fail(f"{section.name}.store_into", str(dicom.store_into),
                    "must be a folder inside one of watcher.watch, so that what arrives "
                    "is indexed")
    return dicom


def _hub_urls(section: _Section, default: str) -> tuple[str, ...]:
    """`hub_url`: one URL, or a list of them tried in turn (each once)."""
    key = f"{section.name}.hub_url"
    value = section._get("hub_url", default)
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, list) or not urls:
        raise _fail(key, value, "expected a ws:// or wss:// URL, or a non-empty list of them")
    for n, url in enumerate(urls):
        if not isinstance(url, str):
            raise _fail(key, url, "not a string")
        if not url.startswith(("ws://", "wss://")):
            raise _fail(key, url, "must start with ws:// or wss://")
        if url in urls[:n]:
            raise _fail(key, url, "listed twice")
    return tuple(urls)


def _watcher(section: _Section) -> WatcherConfig:
    d = WatcherConfig()
    dicom_table = section._get("dicom", {})
    first, *others = _hub_urls(section, d.hub_url)
    watcher = WatcherConfig(
        hub_url=first,
        failover_urls=tuple(others),
        watch=section.paths("watch", d.watch),
        state_dir=section.required_path("state_dir", d.state_dir),
        settle=section.number("settle", d.settle, 0.0, 3600.0),
        key_file=section.path("key_file", d.key_file),
        watcher_id=section.string("id", d.watcher_id),
        polling=section.boolean("polling", d.polling),
        poll_interval=section.number("poll_interval", d.poll_interval, 0.1, 3600.0),
        rescan_interval=section.number("rescan_interval", d.rescan_interval, 0.0, 7 * 86400.0),
        reconnect_max=section.number("reconnect_max", d.reconnect_max, 0.5, 3600.0),
        workers=section.integer("workers", d.workers, 0, 256),
        batch_size=section.integer("batch_size", d.batch_size, 1, 1000),
        log_level=section.level("log_level"),
        ca_file=section.path("ca_file", None),
        client_cert=section.path("client_cert", None),
        client_key=section.path("client_key", None),
        encryption_key_env=section.string("encryption_key_env", ""),
    )
    section.done()
    watcher = replace(watcher, dicom=_dicom(_Section("watcher.dicom", dicom_table, section.base),
                                            watcher.watch))
    if watcher.client_key is not None and watcher.client_cert is None:
        raise _fail("watcher.client_key", str(watcher.client_key),
                    "needs watcher.client_cert as well")
    names = [p.name for p in watcher.watch]
    if len(set(names)) != len(names):
        raise _fail("watcher.watch", [str(p) for p in watcher.watch],
                    "folders watched together need distinct names (paths are reported "
                    "as <folder name>/<path>)")
    return watcher


def encryption_key(variable: str, key: str, environ: Mapping[str, str] | None = None
                   ) -> str | None:
    """The secret named by `encryption_key_env` (config key `key`), or None when
    encryption is off. A named but empty variable is an error: silently writing
    patient data unencrypted is never the fallback."""
    if not variable:
        return None
    env = os.environ if environ is None else environ
    value = env.get(variable, "")
    if len(value) < 16:
        raise ConfigError(f"Config '{key}' names ${variable}, which "
                          + ("is not set" if not value else "holds fewer than 16 characters")
                          + ": set it to the database key (e.g. 64 hex digits)")
    return value


def parse(document: Mapping[str, Any], base: Path, source: Path | None = None) -> Config:
    doc = dict(document)
    config = Config(
        hub=_hub(_Section("hub", doc.pop("hub", {}), base)),
        watcher=_watcher(_Section("watcher", doc.pop("watcher", {}), base)),
        source=source,
    )
    if doc:
        raise ConfigError(f"Config has unknown section(s): {', '.join(sorted(doc))}")
    return config


def load(path: str | os.PathLike[str] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Load the config named by `path`, else $DICOMHUB_CONFIG, else ./config.toml.

    When none is given and ./config.toml does not exist, the built-in defaults
    apply, relative to the working directory.
    """
    env = os.environ if environ is None else environ
    explicit = path if path is not None else env.get(ENV_CONFIG) or None
    file = Path(explicit if explicit is not None else DEFAULT_FILE).expanduser()
    if not file.exists():
        if explicit is not None:
            raise ConfigError(f"Config file {str(file)!r} does not exist")
        return parse({}, Path.cwd().resolve())
    try:
        with file.open("rb") as fh:
            document = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {str(file)!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"Config file {str(file)!r} cannot be read: {exc.strerror}") from None
    return parse(document, file.resolve().parent, file.resolve())
