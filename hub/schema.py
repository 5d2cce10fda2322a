"""SQLite schema and its migrations.

`PRAGMA user_version` holds the schema version. Each migration is a list of
statements run in one transaction, so a database is never left half-migrated;
opening an older database brings it up to date, and a newer one is refused.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the core index
    (
        """CREATE TABLE patients (
            id INTEGER PRIMARY KEY,
            patient_id TEXT NOT NULL UNIQUE,
            issuer_of_patient_id TEXT NOT NULL DEFAULT '',
            patient_name TEXT NOT NULL DEFAULT '',
            patient_birth_date TEXT NOT NULL DEFAULT '',
            patient_sex TEXT NOT NULL DEFAULT '',
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL
        )""",
        """CREATE TABLE studies (
            id INTEGER PRIMARY KEY,
            study_instance_uid TEXT NOT NULL UNIQUE,
            patient_pk INTEGER NOT NULL REFERENCES patients(id),
            study_date TEXT NOT NULL DEFAULT '',
            study_time TEXT NOT NULL DEFAULT '',
            study_description TEXT NOT NULL DEFAULT '',
            accession_number TEXT NOT NULL DEFAULT '',
            study_id TEXT NOT NULL DEFAULT '',
            referring_physician_name TEXT NOT NULL DEFAULT '',
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL
        )""",
        "CREATE INDEX studies_patient ON studies(patient_pk)",
        """CREATE TABLE series (
            id INTEGER PRIMARY KEY,
            series_instance_uid TEXT NOT NULL UNIQUE,
            study_pk INTEGER NOT NULL REFERENCES studies(id),
            modality TEXT NOT NULL DEFAULT '',
            series_number INTEGER,
            series_description TEXT NOT NULL DEFAULT '',
            body_part_examined TEXT NOT NULL DEFAULT '',
            series_date TEXT NOT NULL DEFAULT '',
            series_time TEXT NOT NULL DEFAULT '',
            instance_count INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'receiving',
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            stable_since REAL
        )""",
        "CREATE INDEX series_study ON series(study_pk)",
        "CREATE INDEX series_modality ON series(modality)",
        "CREATE INDEX series_status ON series(status, last_seen)",
        """CREATE TABLE instances (
            id INTEGER PRIMARY KEY,
            sop_instance_uid TEXT NOT NULL UNIQUE,
            series_pk INTEGER NOT NULL REFERENCES series(id),
            sop_class_uid TEXT NOT NULL DEFAULT '',
            instance_number INTEGER,
            number_of_frames INTEGER,
            rows INTEGER,
            columns INTEGER,
            transfer_syntax_uid TEXT NOT NULL DEFAULT '',
            specific_character_set TEXT NOT NULL DEFAULT '',
            watcher_id TEXT NOT NULL,
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime REAL NOT NULL,
            received REAL NOT NULL
        )""",
        "CREATE INDEX instances_series ON instances(series_pk, instance_number)",
        # Every file known to hold an indexed instance; several files may hold one.
        """CREATE TABLE files (
            watcher_id TEXT NOT NULL,
            path TEXT NOT NULL,
            sop_instance_uid TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime REAL NOT NULL,
            received REAL NOT NULL,
            PRIMARY KEY (watcher_id, path)
        ) WITHOUT ROWID""",
        "CREATE INDEX files_sop ON files(sop_instance_uid)",
        # The current outcome for each rejected file; replaced when the file changes.
        """CREATE TABLE rejections (
            id INTEGER PRIMARY KEY,
            watcher_id TEXT NOT NULL,
            path TEXT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '',
            sop_instance_uid TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL,
            mtime REAL NOT NULL,
            time REAL NOT NULL,
            UNIQUE (watcher_id, path)
        )""",
        "CREATE INDEX rejections_reason ON rejections(reason)",
        """CREATE TABLE keys (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('ingest', 'read', 'admin')),
            key_hash TEXT NOT NULL UNIQUE,
            created REAL NOT NULL,
            revoked REAL
        )""",
        "CREATE UNIQUE INDEX keys_live_name ON keys(name) WHERE revoked IS NULL",
        """CREATE TABLE watchers (
            watcher_id TEXT PRIMARY KEY,
            key_name TEXT NOT NULL DEFAULT '',
            software TEXT NOT NULL DEFAULT '',
            address TEXT NOT NULL DEFAULT '',
            connected INTEGER NOT NULL DEFAULT 0,
            backlog INTEGER NOT NULL DEFAULT 0,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            instances INTEGER NOT NULL DEFAULT 0,
            rejections INTEGER NOT NULL DEFAULT 0
        )""",
        # AUTOINCREMENT: a seq is never reused, even after the newest rows go.
        """CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            time REAL NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL
        )""",
    ),
    # 2: dashboard sessions and one-time login links, both bound to a key: revoking
    # the key ends them. Only hashes of the tokens are stored.
    (
        """CREATE TABLE sessions (
            id INTEGER PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            key_id INTEGER NOT NULL REFERENCES keys(id),
            kind TEXT NOT NULL CHECK (kind IN ('session', 'login')),
            created REAL NOT NULL,
            expires REAL NOT NULL
        )""",
        "CREATE INDEX sessions_expires ON sessions(expires)",
    ),
    # 3: the audit trail: who (key name) did what, when, from where. Append-only,
    # enforced by the database itself.
    (
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            time REAL NOT NULL,
            actor TEXT NOT NULL,
            role TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            address TEXT NOT NULL,
            outcome TEXT NOT NULL
        )""",
        "CREATE INDEX audit_actor ON audit(actor)",
        """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
           BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
        """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
           BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END""",
    ),
    # 4: settings the hub makes for itself, such as the secret behind masked IDs.
    (
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "INSERT INTO settings (name, value) VALUES ('mask_secret', hex(randomblob(32)))",
    ),
    # 5: what DICOMweb searches return and match on. Rows from older watchers keep
    # the defaults (empty, NULL); indexes for the commonest study-level keys.
    (
        "ALTER TABLE series ADD COLUMN pps_start_date TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE series ADD COLUMN pps_start_time TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE instances ADD COLUMN bits_allocated INTEGER",
        "CREATE INDEX studies_date ON studies(study_date)",
        "CREATE INDEX studies_accession ON studies(accession_number)",
        "CREATE INDEX patients_name ON patients(patient_name)",
    ),
)

VERSION = len(MIGRATIONS)
