"""veil's exceptions: every failure a user can cause has a specific class and a message naming it.

Boundaries (file loading, config parsing, user arguments, peers) raise these; internal invariants
use asserts. The CLI turns any `VeilError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations


class VeilError(Exception):
    """Base of every error veil raises on purpose."""


class ConfigError(VeilError):
    """A model or runtime configuration that is missing, malformed or inconsistent."""


class UnsupportedError(ConfigError):
    """A valid configuration veil does not implement (an architecture, an op variant, a scheme)."""


class CheckpointError(VeilError):
    """A checkpoint that cannot be read: missing files, truncated or corrupt data, wrong tensors."""


class InputError(VeilError):
    """Bad user input at call time: an over-long prompt, invalid sampling parameters, …"""


class DataError(VeilError):
    """An evaluation corpus that cannot be fetched, extracted or read."""


class IntegrityError(VeilError):
    """A result or artifact failed verification (tampered, truncated, wrong key, altered result)."""


class ProtocolAbort(VeilError):
    """A peer died, stalled or sent something that is not a valid message."""
