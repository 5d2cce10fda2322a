"""PostgreSQL schema and its migrations, step for step the same as SQLite's.

The single row of `schema_version` holds the version. All pending migrations run
in one transaction under a transaction-level advisory lock, so two hubs starting
at once on a fresh database take turns: the second finds the work done. A
database newer than this code is refused, as with SQLite.

Choices that keep answers identical to SQLite's:
- every text column is COLLATE "C": comparisons, ORDER BY, LIKE and lower() work
  on bytes (lower() on ASCII only), as SQLite's BINARY collation does, whatever
  the database's default locale;
- times are epoch seconds as double precision, integers are bigint (SQLite's
  INTEGER is 64-bit), change payloads are `json` (kept verbatim, key order too).
"""

from __future__ import annotations

from typing import Any

from dicomhub.errors import StoreError

# pg_advisory_xact_lock keys ("dicomhub" in ASCII, then a number per purpose).
MIGRATION_LOCK = 0x6469636F6D680001

# Text columns compare byte by byte, like SQLite's default collation.
_TEXT = 'text COLLATE "C" NOT NULL'

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the core index
    (
        f"""CREATE TABLE patients (
            id bigserial PRIMARY KEY,
            patient_id {_TEXT} UNIQUE,
            issuer_of_patient_id {_TEXT} DEFAULT '',
            patient_name {_TEXT} DEFAULT '',
            patient_birth_date {_TEXT} DEFAULT '',
            patient_sex {_TEXT} DEFAULT '',
            first_seen double precision NOT NULL,
            last_seen double precision NOT NULL
        )""",
        f"""CREATE TABLE studies (
            id bigserial PRIMARY KEY,
            study_instance_uid {_TEXT} UNIQUE,
            patient_pk bigint NOT NULL REFERENCES patients(id),
            study_date {_TEXT} DEFAULT '',
            study_time {_TEXT} DEFAULT '',
            study_description {_TEXT} DEFAULT '',
            accession_number {_TEXT} DEFAULT '',
            study_id {_TEXT} DEFAULT '',
            referring_physician_name {_TEXT} DEFAULT '',
            first_seen double precision NOT NULL,
            last_seen double precision NOT NULL
        )""",
        "CREATE INDEX studies_patient ON studies(patient_pk)",
        f"""CREATE TABLE series (
            id bigserial PRIMARY KEY,
            series_instance_uid {_TEXT} UNIQUE,
            study_pk bigint NOT NULL REFERENCES studies(id),
            modality {_TEXT} DEFAULT '',
            series_number bigint,
            series_description {_TEXT} DEFAULT '',
            body_part_examined {_TEXT} DEFAULT '',
            series_date {_TEXT} DEFAULT '',
            series_time {_TEXT} DEFAULT '',
            instance_count bigint NOT NULL DEFAULT 0,
            status {_TEXT} DEFAULT 'receiving',
            first_seen double precision NOT NULL,
            last_seen double precision NOT NULL,
            stable_since double precision
        )""",
        "CREATE INDEX series_study ON series(study_pk)",
        "CREATE INDEX series_modality ON series(modality)",
        "CREATE INDEX series_status ON series(status, last_seen)",
        f"""CREATE TABLE instances (
            id bigserial PRIMARY KEY,
            sop_instance_uid {_TEXT} UNIQUE,
            series_pk bigint NOT NULL REFERENCES series(id),
            sop_class_uid {_TEXT} DEFAULT '',
            instance_number bigint,
            number_of_frames bigint,
            rows bigint,
            columns bigint,
            transfer_syntax_uid {_TEXT} DEFAULT '',
            specific_character_set {_TEXT} DEFAULT '',
            watcher_id {_TEXT},
            path {_TEXT},
            size bigint NOT NULL,
            mtime double precision NOT NULL,
            received double precision NOT NULL
        )""",
        "CREATE INDEX instances_series ON instances(series_pk, instance_number)",
        # Every file known to hold an indexed instance; several files may hold one.
        f"""CREATE TABLE files (
            watcher_id {_TEXT},
            path {_TEXT},
            sop_instance_uid {_TEXT},
            size bigint NOT NULL,
            mtime double precision NOT NULL,
            received double precision NOT NULL,
            PRIMARY KEY (watcher_id, path)
        )""",
        "CREATE INDEX files_sop ON files(sop_instance_uid)",
        # The current outcome for each rejected file; replaced when the file changes.
        f"""CREATE TABLE rejections (
            id bigserial PRIMARY KEY,
            watcher_id {_TEXT},
            path {_TEXT},
            reason {_TEXT},
            detail {_TEXT} DEFAULT '',
            sop_instance_uid {_TEXT} DEFAULT '',
            size bigint NOT NULL,
            mtime double precision NOT NULL,
            time double precision NOT NULL,
            UNIQUE (watcher_id, path)
        )""",
        "CREATE INDEX rejections_reason ON rejections(reason)",
        f"""CREATE TABLE keys (
            id bigserial PRIMARY KEY,
            name {_TEXT},
            role {_TEXT} CHECK (role IN ('ingest', 'read', 'admin')),
            key_hash {_TEXT} UNIQUE,
            created double precision NOT NULL,
            revoked double precision
        )""",
        "CREATE UNIQUE INDEX keys_live_name ON keys(name) WHERE revoked IS NULL",
        f"""CREATE TABLE watchers (
            watcher_id {_TEXT} PRIMARY KEY,
            key_name {_TEXT} DEFAULT '',
            software {_TEXT} DEFAULT '',
            address {_TEXT} DEFAULT '',
            connected integer NOT NULL DEFAULT 0,
            backlog bigint NOT NULL DEFAULT 0,
            first_seen double precision NOT NULL,
            last_seen double precision NOT NULL,
            instances bigint NOT NULL DEFAULT 0,
            rejections bigint NOT NULL DEFAULT 0
        )""",
        # Rows are never deleted. How seqs are handed out and become visible in
        # order is the writers' job (pg_store.py).
        f"""CREATE TABLE changes (
            seq bigserial PRIMARY KEY,
            time double precision NOT NULL,
            kind {_TEXT},
            payload json NOT NULL
        )""",
    ),
    # 2: dashboard sessions and one-time login links, both bound to a key: revoking
    # the key ends them. Only hashes of the tokens are stored.
    (
        f"""CREATE TABLE sessions (
            id bigserial PRIMARY KEY,
            token_hash {_TEXT} UNIQUE,
            key_id bigint NOT NULL REFERENCES keys(id),
            kind {_TEXT} CHECK (kind IN ('session', 'login')),
            created double precision NOT NULL,
            expires double precision NOT NULL
        )""",
        "CREATE INDEX sessions_expires ON sessions(expires)",
    ),
    # 3: the audit trail: who (key name) did what, when, from where. Append-only,
    # enforced by the database itself (TRUNCATE too, which skips row triggers).
    (
        f"""CREATE TABLE audit (
            id bigserial PRIMARY KEY,
            time double precision NOT NULL,
            actor {_TEXT},
            role {_TEXT},
            action {_TEXT},
            target {_TEXT},
            address {_TEXT},
            outcome {_TEXT}
        )""",
        "CREATE INDEX audit_actor ON audit(actor)",
        """CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$""",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
           FOR EACH ROW EXECUTE FUNCTION audit_append_only()""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
           FOR EACH ROW EXECUTE FUNCTION audit_append_only()""",
        """CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
           FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()""",
    ),
    # 4: settings the hub makes for itself, such as the secret behind masked IDs:
    # 64 hex digits, as SQLite's hex(randomblob(32)). gen_random_uuid() draws from
    # the server's strong random source (core since PostgreSQL 13, no extension).
    (
        f"CREATE TABLE settings (name {_TEXT} PRIMARY KEY, value {_TEXT})",
        "INSERT INTO settings (name, value) VALUES ('mask_secret', upper(encode(sha256("
        "convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')), 'hex')))",
    ),
    # 5: what DICOMweb searches return and match on. Rows from older watchers keep
    # the defaults (empty, NULL); indexes for the commonest study-level keys.
    (
        f"ALTER TABLE series ADD COLUMN pps_start_date {_TEXT} DEFAULT ''",
        f"ALTER TABLE series ADD COLUMN pps_start_time {_TEXT} DEFAULT ''",
        "ALTER TABLE instances ADD COLUMN bits_allocated bigint",
        "CREATE INDEX studies_date ON studies(study_date)",
        "CREATE INDEX studies_accession ON studies(accession_number)",
        "CREATE INDEX patients_name ON patients(patient_name)",
    ),
    # 6: which hub (its sessions' application_name) a watcher is connected through,
    # so that one hub's start or a watcher's move does not mark it disconnected.
    (
        f"ALTER TABLE watchers ADD COLUMN hub {_TEXT} DEFAULT ''",
    ),
)

VERSION = len(MIGRATIONS)

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    version integer NOT NULL
)"""


async def migrate(con: Any) -> int:
    """Bring the schema on asyncpg connection `con` to VERSION and return the
    version found. One transaction under MIGRATION_LOCK: never half-done, and
    hubs starting together take turns. Raises StoreError for a newer schema."""
    async with con.transaction(isolation="read_committed"):
        # The lock comes first, so every later statement of this transaction sees
        # what a hub that migrated before us committed.
        await con.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await con.execute(_VERSION_TABLE)
        found = int(await con.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
        if found > VERSION:
            raise StoreError(
                f"database schema version {found} is newer than this dicomhub "
                f"understands ({VERSION}); upgrade dicomhub")
        for number in range(found, VERSION):
            for statement in MIGRATIONS[number]:
                await con.execute(statement)
        if found < VERSION:
            await con.execute(
                "INSERT INTO schema_version (version) VALUES ($1) ON CONFLICT (one)"
                " DO UPDATE SET version = excluded.version", VERSION)
    return found
