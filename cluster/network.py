"""Network descriptions (``configs/*.toml``): who validates, where, and which e-service clients
belong to which organisation; and how a description becomes a genesis with keys."""

from __future__ import annotations

import hashlib
import importlib.resources
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayledger.config import Genesis, Limits, Organisation, Validator, new_genesis
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


def _members(doc: dict[str, Any], key: str, source: str) -> tuple[Member, ...]:
    out = []
    for i, m in enumerate(doc.get(key, [])):
        if not isinstance(m, dict) or "name" not in m or "org" not in m:
            raise ConfigError(f"{source}: {key}[{i}] needs a name and an org")
        out.append(Member(str(m["name"]), str(m["org"]), str(m.get("site", ""))))
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
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        shipped = ", ".join(bundled_configs())
        raise ConfigError(
            f"cannot read network config {path}: {exc} (shipped with rayledger, found from any "
            f"directory as configs/NAME: {shipped})"
        ) from exc
    if "chain_name" not in doc:
        raise ConfigError(f"{path}: missing 'chain_name'")
    validators = _members(doc, "validators", str(path))
    if not validators:
        raise ConfigError(f"{path}: no validators")
    try:
        limits = Limits(**doc.get("limits", {}))
    except TypeError as exc:
        raise ConfigError(f"{path}: bad [limits]: {exc}") from exc
    placement = doc.get("placement", "virtual")
    if placement not in ("virtual", "labels", "none"):
        raise ConfigError(f"{path}: placement must be virtual, labels or none")
    links = []
    sites = {v.site for v in validators}
    for i, link in enumerate(doc.get("links", [])):
        try:
            a, b, ms = str(link["a"]), str(link["b"]), float(link["latency_ms"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: links[{i}] needs a, b and latency_ms") from None
        if a not in sites or b not in sites or ms < 0:
            raise ConfigError(f"{path}: links[{i}] names an unknown site or a negative latency")
        links.append((a, b, ms))
    balance = doc.get("client_balance", 0)
    if not isinstance(balance, int) or not 0 <= balance < 1 << 63:
        raise ConfigError(f"{path}: client_balance must be an integer in 0..2^63-1")
    return NetworkSpec(
        str(doc["chain_name"]),
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
        if m.name in keys:
            raise ConfigError(f"member name {m.name!r} appears twice")
        keys[m.name] = dev_key(spec.chain_name, m.name) if dev else generate_key()
        if keys_dir is not None:
            write_key_file(keys_dir / f"{m.name}.key", keys[m.name])
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
