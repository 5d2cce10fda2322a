"""The one place that picks the store engine for a hub's config."""

from __future__ import annotations

from dicomhub.config import HubConfig, encryption_key

from .store import Store


def create_store(config: HubConfig) -> Store:
    """The store `config` names, not opened yet (call `open()`): PostgreSQL when
    `[hub] database` is a postgresql:// URL, else the SQLite file (encrypted when
    `encryption_key_env` is set). Raises ConfigError for a missing or short key."""
    if config.database_url:
        from .pg_store import PGStore  # asyncpg is loaded only when it is used

        return PGStore(config.database_url)
    from .sqlite_store import SQLiteStore

    return SQLiteStore(config.database,
                       encryption_key(config.encryption_key_env, "hub.encryption_key_env"))
