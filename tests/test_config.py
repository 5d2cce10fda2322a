"""Configuration loading (dicomhub/config.py): defaults, path resolution, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicomhub import config
from dicomhub.config import Config, HubConfig, WatcherConfig, load
from dicomhub.errors import ConfigError, DicomhubError

REPO = Path(__file__).resolve().parents[1]
NO_ENV: dict[str, str] = {}


def write_config(folder: Path, text: str, name: str = "config.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, environ=NO_ENV)
    return str(info.value)


# Defaults ------------------------------------------------------------------------


def test_defaults_when_no_file_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load(environ=NO_ENV)
    here = tmp_path.resolve()
    assert cfg.source is None
    assert cfg.hub == HubConfig(database=here / "data" / "hub.sqlite3")
    assert cfg.watcher == WatcherConfig(watch=(here / "inbox",),
                                        state_dir=here / "data" / "watcher",
                                        key_file=here / "data" / "watcher" / "ingest.key")
    assert cfg.hub.port == 8080 and cfg.hub.host == "127.0.0.1"
    assert cfg.hub.stable_after == 10.0 and cfg.watcher.settle == 1.0
    assert cfg.watcher.hub_url == "ws://127.0.0.1:8080/ws/ingest"


def test_an_empty_file_gives_the_defaults_relative_to_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "etc", "")
    monkeypatch.chdir(tmp_path)
    cfg = load(path, environ=NO_ENV)
    base = (tmp_path / "etc").resolve()
    assert cfg.source == path.resolve()
    assert cfg.hub.database == base / "data" / "hub.sqlite3"
    assert cfg.watcher.watch == (base / "inbox",)
    assert cfg.watcher.key_file == base / "data" / "watcher" / "ingest.key"


def test_config_toml_in_the_working_directory_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path, "[hub]\nport = 9001\n")
    monkeypatch.chdir(tmp_path)
    cfg = load(environ=NO_ENV)
    assert cfg.hub.port == 9001
    assert cfg.source == (tmp_path / "config.toml").resolve()


def test_the_shipped_config_equals_the_built_in_defaults() -> None:
    shipped = load(REPO / "config.toml", environ=NO_ENV)
    defaults = config.parse({}, REPO.resolve())
    assert shipped.hub == defaults.hub
    assert shipped.watcher == defaults.watcher


def test_config_objects_are_frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load(environ=NO_ENV)
    with pytest.raises(AttributeError):
        cfg.hub.port = 1  # type: ignore[misc]


# Paths ---------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder_not_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "conf", """
[hub]
database = "db/hub.sqlite3"
[watcher]
watch = ["../incoming", "more"]
state_dir = "state"
key_file = "keys/ingest.key"
""")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(path, environ=NO_ENV)
    base = (tmp_path / "conf").resolve()
    assert cfg.hub.database == base / "db" / "hub.sqlite3"
    assert cfg.watcher.watch == ((tmp_path / "incoming").resolve(), base / "more")
    assert cfg.watcher.state_dir == base / "state"
    assert cfg.watcher.key_file == base / "keys" / "ingest.key"
    # and the same from another working directory, through a relative config path
    monkeypatch.chdir(tmp_path)
    assert load(Path("conf") / "config.toml", environ=NO_ENV) == cfg


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    target = (tmp_path / "abs" / "hub.sqlite3").resolve()
    path = write_config(tmp_path / "conf", f'[hub]\ndatabase = "{target.as_posix()}"\n')
    assert load(path, environ=NO_ENV).hub.database == target


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    path = write_config(tmp_path / "conf", '[watcher]\nwatch = "~/scans"\n')
    assert load(path, environ=NO_ENV).watcher.watch == (home.resolve() / "scans",)


def test_watch_accepts_a_string_or_a_list(tmp_path: Path) -> None:
    one = write_config(tmp_path / "a", '[watcher]\nwatch = "inbox2"\n')
    many = write_config(tmp_path / "b", '[watcher]\nwatch = ["x", "y", "z"]\n')
    assert load(one, environ=NO_ENV).watcher.watch == ((tmp_path / "a" / "inbox2").resolve(),)
    assert load(many, environ=NO_ENV).watcher.watch == tuple(
        (tmp_path / "b" / n).resolve() for n in "xyz")


@pytest.mark.parametrize("value", ["[]", '[""]', '""', "[1]", '["a", 2]', "3", "{x = 1}"])
def test_watch_must_be_a_non_empty_list_of_folders(tmp_path: Path, value: str) -> None:
    message = load_error(write_config(tmp_path, f"[watcher]\nwatch = {value}\n"))
    assert message.startswith("Config 'watcher.watch' has value ")
    assert "expected a non-empty list of folders" in message


def test_hub_url_accepts_a_string_or_a_list(tmp_path: Path) -> None:
    one = write_config(tmp_path / "a", '[watcher]\nhub_url = "wss://a:443/ws/ingest"\n')
    many = write_config(tmp_path / "b", '[watcher]\nhub_url = ["ws://a:8080/ws/ingest", '
                                        '"wss://b:443/ws/ingest"]\n')
    single = load(one, environ=NO_ENV).watcher
    assert (single.hub_url, single.failover_urls) == ("wss://a:443/ws/ingest", ())
    assert single.hub_urls == ("wss://a:443/ws/ingest",)
    several = load(many, environ=NO_ENV).watcher
    assert several.hub_url == "ws://a:8080/ws/ingest"
    assert several.failover_urls == ("wss://b:443/ws/ingest",)
    assert several.hub_urls == ("ws://a:8080/ws/ingest", "wss://b:443/ws/ingest")


@pytest.mark.parametrize("value,shown,why", [
    ('["ws://a/ws/ingest", "http://b:8080/ws/ingest"]', "'http://b:8080/ws/ingest'",
     "must start with ws:// or wss://"),
    ('["ws://a/ws/ingest", 5]', "5", "not a string"),
    ("[]", "[]", "expected a ws:// or wss:// URL, or a non-empty list of them"),
    ("5", "5", "expected a ws:// or wss:// URL, or a non-empty list of them"),
    ('["ws://a/ws/ingest", "ws://b/ws/ingest", "ws://a/ws/ingest"]', "'ws://a/ws/ingest'",
     "listed twice"),
])
def test_hub_url_lists_are_checked_entry_by_entry(tmp_path: Path, value: str, shown: str,
                                                  why: str) -> None:
    message = load_error(write_config(tmp_path, f"[watcher]\nhub_url = {value}\n"))
    assert message == f"Config 'watcher.hub_url' has value {shown}: {why}"
    assert "\n" not in message


def test_an_empty_key_file_means_none(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[watcher]\nkey_file = ""\n')
    assert load(path, environ=NO_ENV).watcher.key_file is None


@pytest.mark.parametrize("section,key", [("hub", "database"), ("watcher", "state_dir")])
def test_an_empty_path_never_yields_a_cwd_relative_path(tmp_path: Path, section: str,
                                                        key: str) -> None:
    path = write_config(tmp_path / "conf", f'[{section}]\n{key} = ""\n')
    try:
        cfg = load(path, environ=NO_ENV)
    except ConfigError as exc:  # refusing the value is fine too
        assert f"'{section}.{key}'" in str(exc)
        return
    value = getattr(getattr(cfg, section), key)
    assert value.is_absolute()


# $DICOMHUB_CONFIG ----------------------------------------------------------------


def test_env_names_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "etc", "[hub]\nport = 7000\n", name="hub.toml")
    write_config(tmp_path, "[hub]\nport = 1\n")  # ./config.toml must lose to the env
    monkeypatch.chdir(tmp_path)
    cfg = load(environ={config.ENV_CONFIG: str(path)})
    assert cfg.hub.port == 7000
    assert cfg.source == path.resolve()


def test_explicit_path_beats_the_env(tmp_path: Path) -> None:
    a = write_config(tmp_path / "a", "[hub]\nport = 1111\n")
    b = write_config(tmp_path / "b", "[hub]\nport = 2222\n")
    assert load(a, environ={config.ENV_CONFIG: str(b)}).hub.port == 1111


def test_an_empty_env_value_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load(environ={config.ENV_CONFIG: ""}).source is None


def test_missing_file_named_by_env_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load(environ={config.ENV_CONFIG: str(missing)})
    assert str(missing) in str(info.value)


def test_environ_argument_replaces_os_environ(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_CONFIG, str(tmp_path / "missing.toml"))
    monkeypatch.chdir(tmp_path)
    assert load(environ=NO_ENV).source is None  # os.environ was not consulted
    with pytest.raises(ConfigError):
        load()  # ... but is by default


# Errors --------------------------------------------------------------------------


def test_missing_explicit_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    message = load_error(missing)
    assert message == f"Config file {str(missing)!r} does not exist"


def test_invalid_toml(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[hub\nport = 1\n")
    message = load_error(path)
    assert message.startswith(f"Config file {str(path)!r} is not valid TOML")


def test_a_folder_is_not_a_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "config.toml"
    folder.mkdir()
    assert "cannot be read" in load_error(folder)


def test_config_error_is_a_dicomhub_error() -> None:
    assert issubclass(ConfigError, DicomhubError)


@pytest.mark.parametrize("text,key,shown,why", [
    ('[hub]\nport = "abc"', "hub.port", "'abc'", "not an integer"),
    ("[hub]\nport = true", "hub.port", "True", "not an integer"),
    ("[hub]\nport = 80.5", "hub.port", "80.5", "not an integer"),
    ("[hub]\nport = 70000", "hub.port", "70000", "must be between 0 and 65535"),
    ("[hub]\nport = -1", "hub.port", "-1", "must be between 0 and 65535"),
    ("[hub]\nhost = 127", "hub.host", "127", "not a string"),
    ('[hub]\nstable_after = "10s"', "hub.stable_after", "'10s'", "not a number"),
    ("[hub]\nstable_after = -1.0", "hub.stable_after", "-1.0", "must be between"),
    ("[hub]\nlog_level = 'loud'", "hub.log_level", "'loud'",
     "not one of debug, info, warning, error"),
    ("[hub]\ndatabase = 5", "hub.database", "5", "not a path string"),
    ('[watcher]\nhub_url = "http://hub:8080/ws/ingest"', "watcher.hub_url",
     "'http://hub:8080/ws/ingest'", "must start with ws:// or wss://"),
    ('[watcher]\nhub_url = "hub:8080"', "watcher.hub_url", "'hub:8080'", "ws://"),
    ("[watcher]\nsettle = true", "watcher.settle", "True", "not a number"),
    ("[watcher]\nsettle = 3601", "watcher.settle", "3601", "must be between 0.0 and 3600.0"),
    ("[watcher]\npoll_interval = 0.01", "watcher.poll_interval", "0.01", "must be between"),
    ("[watcher]\nreconnect_max = 0", "watcher.reconnect_max", "0", "must be between"),
    ('[watcher]\npolling = "yes"', "watcher.polling", "'yes'", "not true or false"),
    ("[watcher]\npolling = 1", "watcher.polling", "1", "not true or false"),
    ("[watcher]\nworkers = 257", "watcher.workers", "257", "must be between 0 and 256"),
    ("[watcher]\nbatch_size = 0", "watcher.batch_size", "0", "must be between 1 and 1000"),
    ("[watcher]\nbatch_size = 1001", "watcher.batch_size", "1001", "must be between 1 and 1000"),
    ("[watcher]\nid = 42", "watcher.id", "42", "not a string"),
    ("[watcher]\nstate_dir = []", "watcher.state_dir", "[]", "not a path string"),
])
def test_errors_name_the_key_and_the_value(tmp_path: Path, text: str, key: str, shown: str,
                                          why: str) -> None:
    message = load_error(write_config(tmp_path, text + "\n"))
    assert message.startswith(f"Config '{key}' has value {shown}: ")
    assert why in message


def test_a_section_that_is_not_a_table(tmp_path: Path) -> None:
    assert load_error(write_config(tmp_path, "hub = 5\n")) == \
        "Config 'hub' has value 5: expected a table"


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    message = load_error(write_config(tmp_path, "[hub]\nprot = 1\nzeta = 2\n"))
    assert message == "Config 'hub' has unknown key(s): prot, zeta"
    message = load_error(write_config(tmp_path, "[watcher]\nsettle_time = 1\n"))
    assert message == "Config 'watcher' has unknown key(s): settle_time"


def test_unknown_sections_are_refused(tmp_path: Path) -> None:
    message = load_error(write_config(tmp_path, "[hubb]\nport = 1\n[extra]\n"))
    assert message == "Config has unknown section(s): extra, hubb"


def test_top_level_keys_are_refused(tmp_path: Path) -> None:
    assert "unknown section(s): port" in load_error(write_config(tmp_path, "port = 1\n"))


# Valid values --------------------------------------------------------------------


def test_every_key_is_read(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
[hub]
host = "0.0.0.0"
port = 0
database = "hub.db"
stable_after = 5
log_level = "DEBUG"

[watcher]
hub_url = "wss://hub.example:443/ws/ingest"
watch = "in"
state_dir = "st"
settle = 0
key_file = "k"
id = "ward-7"
polling = true
poll_interval = 0.5
reconnect_max = 5
workers = 4
batch_size = 1000
log_level = "Warning"
""")
    cfg = load(path, environ=NO_ENV)
    base = tmp_path.resolve()
    assert cfg == Config(
        hub=HubConfig(host="0.0.0.0", port=0, database=base / "hub.db", stable_after=5.0,
                      log_level="debug"),
        watcher=WatcherConfig(hub_url="wss://hub.example:443/ws/ingest", watch=(base / "in",),
                              state_dir=base / "st", settle=0.0, key_file=base / "k",
                              watcher_id="ward-7", polling=True, poll_interval=0.5,
                              reconnect_max=5.0, workers=4, batch_size=1000, log_level="warning"),
        source=path.resolve(),
    )
    assert isinstance(cfg.hub.stable_after, float) and isinstance(cfg.watcher.settle, float)


def test_parse_works_without_a_file(tmp_path: Path) -> None:
    cfg = config.parse({"hub": {"port": 1234}}, tmp_path)
    assert cfg.hub.port == 1234 and cfg.source is None
    assert cfg.hub.database == (tmp_path / "data" / "hub.sqlite3").resolve()


def test_parse_does_not_mutate_its_input(tmp_path: Path) -> None:
    document = {"hub": {"port": 1234}, "watcher": {"settle": 2.0}}
    config.parse(document, tmp_path)
    assert document == {"hub": {"port": 1234}, "watcher": {"settle": 2.0}}


def test_the_loaded_paths_do_not_depend_on_cwd(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "cfg", "[hub]\n[watcher]\n")
    results = []
    for cwd in (tmp_path, tmp_path / "cfg", Path(os.sep)):
        monkeypatch.chdir(cwd)
        results.append(load(path, environ=NO_ENV))
    assert results[0] == results[1] == results[2]


def test_watched_folders_need_distinct_names(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[watcher]\nwatch = ["a/inbox", "b/inbox"]\n')
    with pytest.raises(ConfigError, match=r"'watcher.watch'.*distinct names"):
        load(path, environ=NO_ENV)
    ok = write_config(tmp_path, '[watcher]\nwatch = ["a/inbox", "b/other"]\n')
    assert [p.name for p in load(ok, environ=NO_ENV).watcher.watch] == ["inbox", "other"]


def test_tls_settings_go_together(tmp_path: Path) -> None:
    half = write_config(tmp_path, '[hub]\ntls_cert = "hub.pem"\n')
    with pytest.raises(ConfigError, match="'hub.tls_cert' and 'hub.tls_key' go together"):
        load(half, environ=NO_ENV)
    client_ca_alone = write_config(tmp_path, '[hub]\nclient_ca = "ca.pem"\n')
    with pytest.raises(ConfigError, match="'hub.client_ca'"):
        load(client_ca_alone, environ=NO_ENV)
    full = write_config(tmp_path, '[hub]\ntls_cert = "a.pem"\ntls_key = "b.pem"\n'
                                  '[watcher]\nca_file = "c.pem"\n')
    config = load(full, environ=NO_ENV)
    assert config.hub.tls and config.hub.tls_cert == tmp_path / "a.pem"
    assert config.watcher.ca_file == tmp_path / "c.pem"


def test_allowed_origins_are_origins(tmp_path: Path) -> None:
    good = write_config(tmp_path, '[hub]\nallowed_origins = ["https://hub.example.org/"]\n')
    assert load(good, environ=NO_ENV).hub.allowed_origins == ("https://hub.example.org",)
    for bad in ('"https://a"', '["hub.example.org"]', '["https://a/path"]'):
        path = write_config(tmp_path, f"[hub]\nallowed_origins = {bad}\n")
        with pytest.raises(ConfigError, match="'hub.allowed_origins'"):
            load(path, environ=NO_ENV)


# The database: a SQLite file or a PostgreSQL URL ---------------------------------------


@pytest.mark.parametrize("url", ["postgresql://hub@db.example.org/dicomhub",
                                 "postgres://hub@db.example.org:5433/dicomhub?sslmode=require"])
def test_a_postgresql_url_selects_postgresql(tmp_path: Path, url: str) -> None:
    hub = load(write_config(tmp_path, f'[hub]\ndatabase = "{url}"\n'), environ=NO_ENV).hub
    assert hub.database_url == url
    plain = load(write_config(tmp_path, '[hub]\ndatabase = "db/hub.sqlite3"\n'),
                 environ=NO_ENV).hub
    assert plain.database_url == "" and plain.database == tmp_path / "db" / "hub.sqlite3"


def test_a_database_url_of_another_kind_is_an_error(tmp_path: Path) -> None:
    message = load_error(write_config(tmp_path, '[hub]\ndatabase = "mysql://u:pw@h/db"\n'))
    assert message == ("Config 'hub.database' has value 'mysql://u:***@h/db': a URL must "
                       "start with postgresql:// (a plain path is a SQLite file)")


def test_sqlcipher_encryption_with_postgresql_is_an_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[hub]\ndatabase = "postgresql://hub@db/dicomhub"\n'
                                  'encryption_key_env = "HUB_DB_KEY"\n')
    message = load_error(path)
    assert message.startswith("Config 'hub.encryption_key_env' has value 'HUB_DB_KEY': ")
    assert "PostgreSQL" in message and "database server" in message and "\n" not in message


def test_passwords_in_database_urls_are_never_shown() -> None:
    assert config.redact_url("postgresql://hub:s3cret@db/x") == "postgresql://hub:***@db/x"
    assert config.redact_url("postgresql://db/x?sslmode=require&password=s3cret&a=1") == (
        "postgresql://db/x?sslmode=require&password=***&a=1")
    assert config.redact_url("postgresql://hub@db/x") == "postgresql://hub@db/x"
