"""Network descriptions (``configs/*.toml``): who validates, where, and which e-service clients
belong to which organisation; and how a description becomes a genesis with keys."""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayledger.config import (
    Genesis,
    Limits,
    Organisation,
    Validator,
    new_genesis,
    only_known,
    parse_limits,
)
from rayledger.crypto import SigningKey, generate_key, key_from_seed, public_bytes, write_key_file
from rayledger.errors import ConfigError
from rayledger.execution import Account


@dataclass(frozen=True)
class Member:
    name: str
    org: str
    site: str = ""


@dataclass(frozen=True)
class NetworkSpec:
    chain_name: str
    validators: tuple[Member, ...]
    clients: tuple[Member, ...]
    limits: Limits
    client_balance: int = 0
    # "virtual": sites are custom resources of one machine; "labels": nodes started with
    # `ray start --labels site=NAME`; "none": anywhere.
    placement: str = "virtual"
    # One-way latency in ms between two sites (symmetric), emulated by the transport.
    links: tuple[tuple[str, str, float], ...] = ()

    @property
    def sites(self) -> list[str]:
        return sorted({v.site for v in self.validators if v.site})

    def latency_matrix(self) -> list[list[float]]:
        """``m[i][j]``: emulated one-way delay from validator i's site to validator j's."""
        table = {}
        for a, b, ms in self.links:
            table[(a, b)] = table[(b, a)] = ms
        return [
            [0.0 if a.site == b.site else table.get((a.site, b.site), 0.0) for b in self.validators]
            for a in self.validators
        ]


# A member's name names its key file (``<name>.key`` in `genesis new --keys-dir`): letters,
# digits, '.', '_' and '-', not starting with '.' (a name such as '../../x' wrote its key
# outside the folder, 'a/b' made folders, '' a hidden '.key')
MEMBER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


# A network config's top-level keys (see configs/local.toml)
CONFIG_KEYS = {
    "chain_name",
    "client_balance",
    "limits",
    "placement",
    "validators",
    "clients",
    "links",
}


def check_member_name(name: str, where: str) -> str:
    if not MEMBER_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: name {name!r} is not 1 to 64 letters, digits, '.', '_' or '-' "
            "(not starting with '.')"
        )
    return name


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _tables(doc: dict[str, Any], key: str, source: str) -> list[Any]:
    """``[[key]]`` of a config (none: empty); anything but an array is an error."""
    items = doc.get(key, [])
    if not isinstance(items, list):
        raise ConfigError(f"{source}: {key} must be an array of tables ([[{key}]])")
    return items


def _members(doc: dict[str, Any], key: str, source: str) -> tuple[Member, ...]:
    out = []
    for i, m in enumerate(_tables(doc, key, source)):
        where = f"{source}: {key}[{i}]"
        if not isinstance(m, dict) or "name" not in m or "org" not in m:
            raise ConfigError(f"{where} needs a name and an org")
        only_known(m, {"name", "org", "site"}, where)
        name = check_member_name(_text(m["name"], f"{where}.name"), where)
        out.append(Member(name, _text(m["org"], f"{where}.org"), _text(m.get("site", ""), where)))
    return tuple(out)


def bundled_configs() -> list[str]:
    """The names of the network configs shipped with the package."""
    root = importlib.resources.files("rayledger.configs")
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".toml"))


def config_path(path: str | Path) -> Path:
    """``path`` where it exists; else, for a relative ``configs/NAME.toml`` or ``NAME.toml``
    (the commands' default is ``configs/local.toml``, relative to where they run), the config
    of that name shipped with the package, so that a command run outside a source checkout
    finds it. Anything else is returned as it is (reading it then fails, naming it)."""
    p = Path(path)
    if p.exists() or p.is_absolute() or p.parent not in (Path("."), Path("configs")):
        return p
    shipped = importlib.resources.files("rayledger.configs").joinpath(p.name)
    return Path(str(shipped)) if p.suffix == ".toml" and shipped.is_file() else p


def load_network(path: str | Path) -> NetworkSpec:
    """The network described by the TOML file ``path`` (see ``config_path``)."""
    path = config_path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        shipped = ", ".join(bundled_configs())
        raise ConfigError(
            f"cannot read network config {path}: {exc} (shipped with rayledger, found from any "
            f"directory as configs/NAME: {shipped})"
        ) from exc
    if "chain_name" not in doc:
        raise ConfigError(f"{path}: missing 'chain_name'")
    only_known(doc, CONFIG_KEYS, str(path))
    chain_name = _text(doc["chain_name"], f"{path}: chain_name")
    if not chain_name.strip():
        raise ConfigError(f"{path}: chain_name is empty")
    validators = _members(doc, "validators", str(path))
    if not validators:
        raise ConfigError(f"{path}: no validators")
    limits = parse_limits(doc.get("limits", {}), str(path))
    placement = doc.get("placement", "virtual")
    if placement not in ("virtual", "labels", "none"):
        raise ConfigError(f"{path}: placement must be virtual, labels or none")
    links = []
    sites = {v.site for v in validators}
    for i, link in enumerate(_tables(doc, "links", str(path))):
        if isinstance(link, dict):
            only_known(link, {"a", "b", "latency_ms"}, f"{path}: links[{i}]")
        try:
            a, b, ms = str(link["a"]), str(link["b"]), float(link["latency_ms"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: links[{i}] needs a, b and latency_ms") from None
        if a not in sites or b not in sites or not 0 <= ms < math.inf:
            raise ConfigError(
                f"{path}: links[{i}] names an unknown site or a latency that is not a finite "
                "number >= 0"
            )
        links.append((a, b, ms))
    balance = doc.get("client_balance", 0)
    if not isinstance(balance, int) or isinstance(balance, bool) or not 0 <= balance < 1 << 63:
        raise ConfigError(f"{path}: client_balance must be an integer in 0..2^63-1")
    return NetworkSpec(
        chain_name,
        validators,
        _members(doc, "clients", str(path)),
        limits,
        balance,
        placement,
        tuple(links),
    )


def dev_key(chain_name: str, member: str) -> SigningKey:
    """A well-known development key: anyone can derive it, so never use it outside a demo."""
    return key_from_seed(
        hashlib.sha256(f"rayledger/dev-key/{chain_name}/{member}".encode()).digest()
    )


def make_genesis(
    spec: NetworkSpec,
    genesis_time_ms: int,
    *,
    keys_dir: Path | None = None,
    dev: bool = False,
) -> tuple[Genesis, dict[str, SigningKey]]:
    """Create the genesis of a network and the keys of its validators and clients.

    With ``keys_dir`` each key is written there as ``<name>.key`` (0600); with ``dev`` the
    well-known development keys are used instead of fresh ones.
    """
    keys: dict[str, SigningKey] = {}
    for m in (*spec.validators, *spec.clients):
        check_member_name(m.name, "member")
        if m.name in keys:
            raise ConfigError(f"member name {m.name!r} appears twice")
        keys[m.name] = dev_key(spec.chain_name, m.name) if dev else generate_key()
    if keys_dir is not None:
        # Every key file checked first: none is written where one would be refused
        taken = [n for n in keys if os.path.lexists(keys_dir / f"{n}.key")]
        if taken:
            raise FileExistsError(
                f"{keys_dir} holds keys of {', '.join(taken)} already; a key file is never "
                "overwritten"
            )
        for name, key in keys.items():
            write_key_file(keys_dir / f"{name}.key", key)
    orgs: dict[str, list[bytes]] = {}
    for m in (*spec.validators, *spec.clients):
        orgs.setdefault(m.org, []).append(public_bytes(keys[m.name]))
    genesis = new_genesis(
        spec.chain_name,
        [Validator(m.name, public_bytes(keys[m.name]), m.org, m.site) for m in spec.validators],
        genesis_time_ms,
        [Organisation(name, tuple(members)) for name, members in orgs.items()],
        spec.limits,
        [Account(public_bytes(keys[c.name]), spec.client_balance) for c in spec.clients],
    )
    return genesis, keys
