"""The errors dicomhub raises on purpose, under one root.

    DicomhubError
    ├── ConfigError        config file or value is wrong; message names key and value
    └── StoreError         the database cannot be opened or migrated

Input from outside the process raises ValueError subclasses instead:
dicomhub.protocol.ProtocolError for a malformed message and
dicomhub.keys.KeyFormatError for a string that cannot be a key.
"""


class DicomhubError(Exception):
    """Root of the errors a user is meant to read."""


class ConfigError(DicomhubError):
    """The configuration is invalid; the message says which key and value."""


class StoreError(DicomhubError):
    """The store cannot be opened, migrated or written."""
