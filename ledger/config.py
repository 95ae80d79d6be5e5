"""Validator sets and the genesis file that fixes a chain: its id, validators, organisations
and limits. The genesis file is TOML (see ``configs/genesis-local.toml``)."""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from rayledger.block import BlockHeader, genesis_header
from rayledger.codec import u32, u64
from rayledger.crypto import is_curve_point, small_order_mask
from rayledger.errors import ConfigError
from rayledger.execution import Account, genesis_state
from rayledger.tx import DEFAULT_MAX_PAYLOAD


@dataclass(frozen=True)
class Validator:
    name: str
    public_key: bytes
    org: str = ""
    site: str = ""


@dataclass(frozen=True)
class ValidatorSet:
    """An ordered validator set; index i is bit i of every signer bitmap."""

    validators: tuple[Validator, ...]

    def __post_init__(self) -> None:
        if not self.validators:
            raise ConfigError("a validator set needs at least one validator")
        keys = [v.public_key for v in self.validators]
        if any(len(k) != 32 for k in keys):
            raise ConfigError("validator public keys must be 32 bytes")
        weak = small_order_mask(np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 32))
        if weak.any():
            name = self.validators[int(np.argmax(weak))].name
            raise ConfigError(f"validator {name}'s public key is a point of small order")
        if len(set(keys)) != len(keys):
            raise ConfigError("a public key appears twice in the validator set")
        names = [v.name for v in self.validators]
        if len(set(names)) != len(names):
            raise ConfigError("a validator name appears twice in the validator set")

    @property
    def n(self) -> int:
        return len(self.validators)

    @property
    def f(self) -> int:
        """Byzantine validators tolerated: the largest f with n >= 3f + 1."""
        return (self.n - 1) // 3

    @property
    def quorum(self) -> int:
        """Smallest size whose any two sets intersect in f + 1 validators (2f + 1 at n = 3f + 1)."""
        return (self.n + self.f) // 2 + 1

    @cached_property
    def public_keys(self) -> np.ndarray:
        return np.frombuffer(b"".join(v.public_key for v in self.validators), np.uint8).reshape(
            self.n, 32
        )

    @cached_property
    def _index(self) -> dict[bytes, int]:
        return {v.public_key: i for i, v in enumerate(self.validators)}

    def index_of(self, public_key: bytes) -> int:
        try:
            return self._index[public_key]
        except KeyError:
            raise ConfigError(f"{public_key.hex()[:16]}... is not a validator") from None


@dataclass(frozen=True)
class Organisation:
    name: str
    members: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    max_batch_rows: int = 65_536
    max_block_txs: int = 100_000

    def __post_init__(self) -> None:
        if self.max_batch_rows > self.max_block_txs:
            # A batch that fits in no block would never be ordered
            raise ConfigError(
                f"limits.max_batch_rows ({self.max_batch_rows}) exceeds"
                f" limits.max_block_txs ({self.max_block_txs})"
            )


@dataclass(frozen=True)
class Genesis:
    chain_name: str
    chain_id: bytes
    genesis_time_ms: int
    validators: ValidatorSet
    organisations: tuple[Organisation, ...] = ()
    limits: Limits = field(default_factory=Limits)
    accounts: tuple[Account, ...] = ()

    def __post_init__(self) -> None:
        if len(self.chain_id) != 32:
            raise ConfigError("chain_id must be 32 bytes")
        if self.genesis_time_ms <= 0:
            raise ConfigError("genesis_time_ms must be positive")
        # Checked here, not in ValidatorSet: the simulator's validator sets hold MAC keys
        keys = [
            (f"validator {v.name}'s public key", v.public_key) for v in self.validators.validators
        ]
        keys += [
            (f"organisation {o.name}'s member {j}", m)
            for o in self.organisations
            for j, m in enumerate(o.members)
        ]
        keys += [(f"account {a.public_key.hex()}", a.public_key) for a in self.accounts]
        for what, key in keys:
            if not is_curve_point(key):
                raise ConfigError(f"{what} is not a point on Ed25519")

    @cached_property
    def header(self) -> BlockHeader:
        """Block 0: its state root commits to the genesis balances."""
        return genesis_header(self.chain_id, self.genesis_time_ms, genesis_state(self.accounts)[1])

    def to_toml(self) -> str:
        doc: dict[str, Any] = {
            "chain_name": self.chain_name,
            "chain_id": self.chain_id.hex(),
            "genesis_time_ms": self.genesis_time_ms,
            "limits": {
                "max_payload_bytes": self.limits.max_payload_bytes,
                "max_batch_rows": self.limits.max_batch_rows,
                "max_block_txs": self.limits.max_block_txs,
            },
            "validators": [
                {"name": v.name, "public_key": v.public_key.hex(), "org": v.org, "site": v.site}
                for v in self.validators.validators
            ],
            "organisations": [
                {"name": o.name, "members": [m.hex() for m in o.members]}
                for o in self.organisations
            ],
            "accounts": [
                {"public_key": a.public_key.hex(), "balance": a.balance} for a in self.accounts
            ],
        }
        return tomli_w.dumps(doc)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())


def genesis_terms(
    limits: Limits, organisations: Sequence[Organisation] = (), accounts: Sequence[Account] = ()
) -> bytes:
    """The digest of what else a genesis fixes: its limits (a block within one chain's is
    refused by a validator holding another's), organisations and opening balances. In
    canonical order (organisations by name, members and accounts by key): the same terms
    written in another order are the same chain."""

    def text(value: str) -> bytes:
        raw = value.encode()
        return u32(len(raw)) + raw

    out = [b"rayledger/genesis-terms/v1", u32(len(fields(Limits)))]
    out += [text(f.name) + u64(getattr(limits, f.name)) for f in fields(Limits)]
    orgs = sorted((o.name, sorted(o.members)) for o in organisations)
    out.append(u32(len(orgs)))
    for name, members in orgs:
        out += [text(name), u32(len(members)), *members]
    out.append(u32(len(accounts)))
    out += [a.public_key + u64(a.balance) for a in sorted(accounts, key=lambda a: a.public_key)]
    return hashlib.sha256(b"".join(out)).digest()


def derive_chain_id(
    chain_name: str, genesis_time_ms: int, keys: Sequence[bytes], terms: bytes
) -> bytes:
    """A chain id that differs for every (name, time, validator set, other terms: see
    ``genesis_terms``): transactions signed for one chain are refused on any other."""
    return _chain_id(b"rayledger/chain/v2", chain_name, genesis_time_ms, keys, terms)


def legacy_chain_id(chain_name: str, genesis_time_ms: int, keys: Sequence[bytes]) -> bytes:
    """The id of a chain made before its other terms were bound (the twenty-sixth session):
    its genesis still loads, but a limit edited by hand in it cannot be told apart."""
    return _chain_id(b"rayledger/chain/v1", chain_name, genesis_time_ms, keys, b"")


def _chain_id(
    domain: bytes, chain_name: str, genesis_time_ms: int, keys: Sequence[bytes], terms: bytes
) -> bytes:
    name = chain_name.encode()
    head = domain + u32(len(name)) + name + u64(genesis_time_ms) + u32(len(keys))
    return hashlib.sha256(head + b"".join(keys) + terms).digest()


def new_genesis(
    chain_name: str,
    validators: Sequence[Validator],
    genesis_time_ms: int,
    organisations: Sequence[Organisation] = (),
    limits: Limits | None = None,
    accounts: Sequence[Account] = (),
) -> Genesis:
    keys = [v.public_key for v in validators]
    limits = limits or Limits()
    terms = genesis_terms(limits, organisations, accounts)
    return Genesis(
        chain_name,
        derive_chain_id(chain_name, genesis_time_ms, keys, terms),
        genesis_time_ms,
        ValidatorSet(tuple(validators)),
        tuple(organisations),
        limits,
        tuple(accounts),
    )


def _hex(value: Any, width: int, where: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{where}: not hex") from None
    if len(raw) != width:
        raise ConfigError(f"{where}: expected {width} bytes, got {len(raw)}")
    return raw


def _expect(value: Any, kind: type, where: str) -> None:
    if not isinstance(value, kind):
        noun = "an array" if kind is list else "a table"
        raise ConfigError(f"{where}: expected {noun}")


def _positive_int(value: Any, where: str) -> int:
    """A positive integer that fits the signed 64-bit fields it is stored in (a header's
    timestamp; a store verify of a genesis stamped 10^20 failed deep in ``struct``)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 63:
        raise ConfigError(f"{where}: expected a positive integer below 2^63")
    return value


def parse_limits(lim: Any, where: str) -> Limits:
    """``[limits]`` of a genesis or a network config: known keys only, positive integers.
    Shared, so that `genesis new` never writes a genesis that `genesis show` refuses."""
    _expect(lim, dict, f"{where}: limits")
    unknown = set(lim) - {f.name for f in fields(Limits)}
    if unknown:
        raise ConfigError(f"{where}: unknown limits {sorted(unknown)}")
    values = {k: _positive_int(val, f"{where}: limits.{k}") for k, val in lim.items()}
    try:
        return Limits(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


def only_known(table: dict[str, Any], known: set[str], where: str) -> None:
    """Refuse keys nobody reads: a typo (``[limit]``, ``sit = ...``) would otherwise be
    ignored and its default used in silence, in a file every validator must agree on."""
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (known: {', '.join(sorted(known))})")


GENESIS_KEYS = {
    "chain_name", "chain_id", "genesis_time_ms", "validators", "organisations", "limits",
    "accounts",
}  # fmt: skip


def parse_genesis(text: str, source: str = "genesis") -> Genesis:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    for key in ("chain_name", "chain_id", "genesis_time_ms", "validators"):
        if key not in doc:
            raise ConfigError(f"{source}: missing {key!r}")
    only_known(doc, GENESIS_KEYS, source)
    _expect(doc["validators"], list, f"{source}: validators")
    _expect(doc.get("organisations", []), list, f"{source}: organisations")
    validators = []
    for i, v in enumerate(doc["validators"]):
        where = f"{source}: validators[{i}]"
        if not isinstance(v, dict) or "name" not in v or "public_key" not in v:
            raise ConfigError(f"{where}: needs name and public_key")
        only_known(v, {"name", "public_key", "org", "site"}, where)
        validators.append(
            Validator(
                str(v["name"]),
                _hex(v["public_key"], 32, f"{where}.public_key"),
                str(v.get("org", "")),
                str(v.get("site", "")),
            )
        )
    orgs = []
    for i, o in enumerate(doc.get("organisations", [])):
        where = f"{source}: organisations[{i}]"
        if not isinstance(o, dict) or "name" not in o:
            raise ConfigError(f"{where}: needs a name")
        only_known(o, {"name", "members"}, where)
        _expect(o.get("members", []), list, f"{where}.members")
        members = tuple(
            _hex(m, 32, f"{where}.members[{j}]") for j, m in enumerate(o.get("members", []))
        )
        orgs.append(Organisation(str(o["name"]), members))
    _expect(doc.get("accounts", []), list, f"{source}: accounts")
    accounts = []
    for i, a in enumerate(doc.get("accounts", [])):
        where = f"{source}: accounts[{i}]"
        if not isinstance(a, dict) or "public_key" not in a or "balance" not in a:
            raise ConfigError(f"{where}: needs public_key and balance")
        only_known(a, {"public_key", "balance"}, where)
        balance = a["balance"]
        if not isinstance(balance, int) or isinstance(balance, bool) or not 0 <= balance < 1 << 63:
            raise ConfigError(f"{where}.balance: expected an integer in 0..2^63-1")
        accounts.append(Account(_hex(a["public_key"], 32, f"{where}.public_key"), balance))
    if len({a.public_key for a in accounts}) != len(accounts):
        raise ConfigError(f"{source}: an account appears twice")
    limits = parse_limits(doc.get("limits", {}), source)
    genesis = Genesis(
        str(doc["chain_name"]),
        _hex(doc["chain_id"], 32, f"{source}: chain_id"),
        _positive_int(doc["genesis_time_ms"], f"{source}: genesis_time_ms"),
        ValidatorSet(tuple(validators)),
        tuple(orgs),
        limits,
        tuple(accounts),
    )
    # The id commits to the name, the time, the validator set and the other terms
    # (derive_chain_id): a copy whose validators or limits were edited by hand but whose id
    # was kept would share its id, and so its signed transactions, with another chain; and
    # validators holding copies with different limits would refuse each other's blocks
    keys = [v.public_key for v in validators]
    terms = genesis_terms(limits, orgs, accounts)
    expected = derive_chain_id(genesis.chain_name, genesis.genesis_time_ms, keys, terms)
    legacy = legacy_chain_id(genesis.chain_name, genesis.genesis_time_ms, keys)
    if genesis.chain_id not in (expected, legacy):
        raise ConfigError(
            f"{source}: chain_id {genesis.chain_id.hex()} is not the one its chain_name,"
            " genesis_time_ms, validators' keys, limits, organisations and accounts give"
            f" ({expected.hex()}): was the file edited by hand? Make it again with"
            " `rayledger genesis new`"
        )
    return genesis


def load_genesis(path: str | Path) -> Genesis:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read genesis file {path}: {exc}") from exc
    return parse_genesis(text, str(path))
