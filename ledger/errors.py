"""One exception hierarchy for the whole ledger, with machine-readable codes.

Every rejection names the exact rule that failed; the API maps the classes to HTTP statuses
and metrics count them by ``code``.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the ledger raises on bad input or bad state."""

    code = "ledger_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class DecodeError(LedgerError):
    """Bytes that do not parse as the canonical encoding."""

    code = "decode_error"


class TruncatedInput(DecodeError):
    code = "truncated"


class WrongLength(DecodeError):
    code = "wrong_length"


class UnknownVersion(DecodeError):
    code = "unknown_version"


class PayloadTooLarge(DecodeError):
    code = "payload_too_large"


class TrailingBytes(DecodeError):
    code = "trailing_bytes"


class SchemaMismatch(DecodeError):
    """An Arrow batch whose columns, types or nulls differ from the TxBatch schema."""

    code = "schema_mismatch"


class UnknownKind(LedgerError):
    """A transaction kind this ledger does not execute: refused at admission, never stored."""

    code = "unknown_kind"


class WrongChain(LedgerError):
    code = "wrong_chain"


class InvalidSignature(LedgerError):
    code = "invalid_signature"


class InvalidBlock(LedgerError):
    code = "invalid_block"


class InvalidBatch(LedgerError):
    """A disseminated batch whose content does not match its digest or its id column."""

    code = "invalid_batch"


class InvalidQuorumCert(LedgerError):
    code = "invalid_qc"


class InvalidReceipt(LedgerError):
    """A receipt that does not prove what it claims; the message names the failed check."""

    code = "invalid_receipt"


class ConfigError(LedgerError):
    code = "config_error"


class StoreError(LedgerError):
    code = "store_error"


class StoreCorruption(StoreError):
    """Durable data that fails verification: the file and height that are wrong are named."""

    code = "store_corruption"

    def __init__(self, message: str, *, height: int | None, path: str) -> None:
        super().__init__(f"{message} (height={height}, file={path})")
        self.height = height
        self.path = path


class AlreadyOpen(StoreError):
    """Durable data that another process holds open (its lock file names that process)."""

    code = "already_open"


class NotFound(StoreError):
    code = "not_found"


class NotYetAvailable(StoreError):
    """Committed, but not all that a read needs is stored here yet (a receipt whose block's
    proofs lie with a sibling shard that is behind, or down): ask another validator, or
    again later."""

    code = "not_yet_available"
