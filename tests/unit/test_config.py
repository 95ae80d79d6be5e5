"""Tests for rayledger.config (validator sets, genesis files, chain ids) and rayledger.crypto
(key files): quorum arithmetic, the TOML round trip, and every way a genesis file is refused."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from rayledger.block import genesis_header
from rayledger.config import (
    Genesis,
    Limits,
    Organisation,
    Validator,
    ValidatorSet,
    derive_chain_id,
    genesis_terms,
    legacy_chain_id,
    load_genesis,
    new_genesis,
    parse_genesis,
)
from rayledger.crypto import (
    SMALL_ORDER_KEYS,
    generate_key,
    is_curve_point,
    key_from_seed,
    public_bytes,
    read_key_file,
    write_key_file,
)
from rayledger.errors import ConfigError
from rayledger.execution import Account, genesis_state

_hyp = settings(max_examples=30, deadline=None)


def _key(i: int) -> bytes:
    """A real public key (a point on the curve, as a genesis requires), made from seed i."""
    return public_bytes(key_from_seed(bytes([i]) * 32))


def _vals(n: int) -> tuple[Validator, ...]:
    return tuple(Validator(f"v{i}", _key(i + 1), f"org{i % 2}", f"site{i}") for i in range(n))


def _assert_config_error(fn: Any, *args: Any) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        fn(*args)
    assert exc.value.code == "config_error"
    return exc.value


# ---- ValidatorSet -------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 14))
def test_quorum_arithmetic(n: int) -> None:
    vs = ValidatorSet(_vals(n))
    f, q = vs.f, vs.quorum
    assert vs.n == n
    # f is the largest number of faults with n >= 3f + 1
    assert n >= 3 * f + 1
    assert n < 3 * (f + 1) + 1
    if n == 3 * f + 1:
        assert q == 2 * f + 1
    # Any two quorums share at least f + 1 validators, so at least one honest one
    assert 2 * q - n >= f + 1
    # A quorum can form without the f faulty validators
    assert q <= n - f
    # And it is the smallest size with the intersection property
    assert 2 * (q - 1) - n < f + 1


@pytest.mark.parametrize(
    ("n", "f", "quorum"),
    [(1, 0, 1), (2, 0, 2), (3, 0, 2), (4, 1, 3), (5, 1, 4), (6, 1, 4), (7, 2, 5), (10, 3, 7)],
)
def test_quorum_table(n: int, f: int, quorum: int) -> None:
    vs = ValidatorSet(_vals(n))
    assert (vs.f, vs.quorum) == (f, quorum)


def test_validator_set_keys_and_index() -> None:
    vals = _vals(5)
    vs = ValidatorSet(vals)
    assert vs.public_keys.shape == (5, 32)
    assert [bytes(row) for row in vs.public_keys] == [v.public_key for v in vals]
    assert [vs.index_of(v.public_key) for v in vals] == list(range(5))
    _assert_config_error(vs.index_of, b"\xee" * 32)


def test_validator_set_empty() -> None:
    _assert_config_error(ValidatorSet, ())


@pytest.mark.parametrize("width", [0, 31, 33])
def test_validator_set_key_width(width: int) -> None:
    vals = (*_vals(2), Validator("bad", b"\x09" * width))
    _assert_config_error(ValidatorSet, vals)


def test_validator_set_duplicate_key() -> None:
    vals = (*_vals(3), Validator("other-name", _vals(3)[1].public_key))
    _assert_config_error(ValidatorSet, vals)


def test_validator_set_duplicate_name() -> None:
    vals = (*_vals(3), Validator("v1", b"\xaa" * 32))
    _assert_config_error(ValidatorSet, vals)


# ---- Genesis and chain ids ----------------------------------------------------------------


def _genesis(n: int = 4, **kwargs: Any) -> Genesis:
    return new_genesis(
        "test-chain",
        _vals(n),
        1_700_000_000_000,
        organisations=[Organisation("org0", (b"\x01" * 32,)), Organisation("empty")],
        **kwargs,
    )


def test_new_genesis() -> None:
    g = _genesis(limits=Limits(max_payload_bytes=10, max_batch_rows=20, max_block_txs=30))
    assert g.chain_id == derive_chain_id(
        "test-chain",
        1_700_000_000_000,
        [v.public_key for v in _vals(4)],
        genesis_terms(g.limits, g.organisations),
    )
    assert g.validators.n == 4
    assert g.limits.max_batch_rows == 20
    assert g.header == genesis_header(g.chain_id, g.genesis_time_ms, genesis_state(())[1])
    assert g.header.height == 0


def test_genesis_accounts_round_trip_and_commit_to_state_root() -> None:
    accounts = (Account(_key(1), 10), Account(_key(2), 0))
    g = new_genesis("acc", list(_vals(4)), 5, accounts=accounts)
    back = parse_genesis(g.to_toml())
    assert back.accounts == accounts
    assert back.header == g.header
    assert g.header.state_root == genesis_state(accounts)[1]
    assert new_genesis("acc", list(_vals(4)), 5).header.state_root != g.header.state_root


KEY = "01" * 32


@pytest.mark.parametrize(
    "accounts",
    [
        5,
        [5],
        [{"balance": 1}],
        [{"public_key": "zz", "balance": 1}],
        [{"public_key": KEY, "balance": -1}],
        [{"public_key": KEY, "balance": "10"}],
        [{"public_key": KEY, "balance": True}],
        [{"public_key": KEY, "balance": 1 << 63}],
        [{"public_key": KEY, "balance": 1}, {"public_key": KEY, "balance": 2}],
    ],
)
def test_genesis_bad_accounts(accounts: Any) -> None:
    doc = tomllib.loads(new_genesis("acc", list(_vals(4)), 5).to_toml())
    doc["accounts"] = accounts
    with pytest.raises(ConfigError) as exc:
        parse_genesis(tomli_w.dumps(doc))
    assert exc.value.code == "config_error"


def test_genesis_chain_id_width_and_time() -> None:
    with pytest.raises(ConfigError, match="chain_id must be 32 bytes"):
        Genesis("x", b"\x00" * 31, 1, ValidatorSet(_vals(1)))
    for ms in (0, -5):
        with pytest.raises(ConfigError, match="genesis_time_ms must be positive"):
            Genesis("x", b"\x00" * 32, ms, ValidatorSet(_vals(1)))


def test_genesis_toml_round_trip() -> None:
    g = _genesis()
    assert parse_genesis(g.to_toml()) == g


def test_genesis_save_and_load(tmp_path: Path) -> None:
    g = _genesis(7)
    path = tmp_path / "genesis.toml"
    g.save(path)
    assert load_genesis(path) == g
    assert load_genesis(str(path)) == g


_names = st.text(max_size=12)


@st.composite
def _genesis_docs(draw: st.DrawFn) -> Genesis:
    n = draw(st.integers(1, 6))
    names = draw(st.lists(_names, min_size=n, max_size=n, unique=True))
    key = st.binary(min_size=32, max_size=32).map(lambda seed: public_bytes(key_from_seed(seed)))
    keys = draw(st.lists(key, min_size=n, max_size=n, unique=True))
    vals = [Validator(nm, k, draw(_names), draw(_names)) for nm, k in zip(names, keys, strict=True)]
    orgs = draw(
        st.lists(
            st.builds(
                Organisation,
                _names,
                st.lists(key, max_size=3).map(tuple),
            ),
            max_size=3,
        )
    )
    positive = st.integers(1, (1 << 63) - 1)
    batch_rows = draw(positive)
    limits = Limits(draw(positive), batch_rows, draw(st.integers(batch_rows, (1 << 63) - 1)))
    return new_genesis(draw(_names), vals, draw(positive), orgs, limits)


@given(_genesis_docs())
@_hyp
def test_genesis_toml_round_trip_property(g: Genesis) -> None:
    assert parse_genesis(g.to_toml()) == g


T = genesis_terms(Limits())


def test_derive_chain_id_binds_its_inputs() -> None:
    keys = [v.public_key for v in _vals(4)]
    base = derive_chain_id("chain", 1000, keys, T)
    assert len(base) == 32
    assert derive_chain_id("chain", 1000, list(keys), T) == base
    variants = {
        derive_chain_id("chain2", 1000, keys, T),
        derive_chain_id("chain", 1001, keys, T),
        derive_chain_id("chain", 1000, keys[:3], T),
        derive_chain_id("chain", 1000, [*keys, b"\x77" * 32], T),
        derive_chain_id("chain", 1000, [keys[1], keys[0], *keys[2:]], T),
        derive_chain_id("chain", 1000, [b"\x55" * 32, *keys[1:]], T),
        derive_chain_id("chain", 1000, keys, genesis_terms(Limits(max_block_txs=99_999))),
    }
    assert base not in variants
    assert len(variants) == 7


def test_derive_chain_id_is_injective() -> None:
    k1 = b"I" * 24 + (7).to_bytes(8, "big")
    k2 = bytes(range(32))
    t1 = int.from_bytes(b"ABCDEFGH", "big")
    assert derive_chain_id("x", t1, [k1, k2], T) != derive_chain_id(
        "xABCDEFGH" + "I" * 24, 7, [k2], T
    )


def test_genesis_terms_bind_limits_organisations_and_accounts_in_any_order() -> None:
    """Two copies of a genesis with different limits were one chain: their validators refused
    each other's blocks, and their transactions were valid on both."""
    a, b = _key(1), _key(2)
    orgs = [Organisation("o", (a, b)), Organisation("p", (b,))]
    accounts = [Account(a, 10), Account(b, 0)]
    base = genesis_terms(Limits(), orgs, accounts)
    # The same terms written in another order
    same = [
        genesis_terms(Limits(), orgs[::-1], accounts),
        genesis_terms(Limits(), [Organisation("o", (b, a)), orgs[1]], accounts),
        genesis_terms(Limits(), orgs, accounts[::-1]),
    ]
    assert same == [base] * 3
    variants = {
        genesis_terms(Limits(max_payload_bytes=1_000), orgs, accounts),
        genesis_terms(Limits(max_batch_rows=1_000), orgs, accounts),
        genesis_terms(Limits(max_block_txs=70_000), orgs, accounts),
        genesis_terms(Limits(), orgs[:1], accounts),
        genesis_terms(Limits(), [Organisation("q", (a, b)), orgs[1]], accounts),
        genesis_terms(Limits(), [Organisation("o", (a,)), orgs[1]], accounts),
        genesis_terms(Limits(), [Organisation("o", (a, b)), Organisation("p", (a,))], accounts),
        genesis_terms(Limits(), orgs, accounts[:1]),
        genesis_terms(Limits(), orgs, [Account(a, 11), Account(b, 0)]),
        genesis_terms(Limits(), orgs, [Account(a, 10), Account(_key(3), 0)]),
        # a name and a member count that run into each other
        genesis_terms(Limits(), [Organisation("o\x00\x00\x00\x02", ())], accounts),
    }
    assert base not in variants and len(variants) == 11
    # new_genesis and parse_genesis derive the id from them
    g = new_genesis("c", list(_vals(4)), 5, orgs, Limits(max_batch_rows=7), accounts)
    assert g.chain_id == derive_chain_id(
        "c",
        5,
        [v.public_key for v in _vals(4)],
        genesis_terms(Limits(max_batch_rows=7), orgs, accounts),
    )
    assert parse_genesis(g.to_toml()) == g


def test_a_genesis_whose_limits_or_balances_were_edited_by_hand_is_refused() -> None:
    g = new_genesis("c", list(_vals(4)), 5, accounts=[Account(_key(1), 10)])
    for old, new in [
        ("max_block_txs = 100000", "max_block_txs = 200000"),
        ("balance = 10", "balance = 11"),
    ]:
        text = g.to_toml()
        assert old in text
        with pytest.raises(ConfigError, match="limits, organisations and accounts give"):
            parse_genesis(text.replace(old, new))


def test_a_chain_made_before_its_terms_were_bound_still_loads() -> None:
    """A data directory's genesis from before the terms joined the id: its chain keeps its id
    (every signed transaction and block holds it), and a hand edit of its limits goes unseen."""
    g = new_genesis("c", list(_vals(4)), 5, accounts=[Account(_key(1), 10)])
    old = legacy_chain_id("c", 5, [v.public_key for v in _vals(4)])
    assert old != g.chain_id
    text = g.to_toml().replace(g.chain_id.hex(), old.hex())
    assert parse_genesis(text).chain_id == old
    assert parse_genesis(text.replace("balance = 10", "balance = 11")).accounts[0].balance == 11
    # Another name, time or validator set is still refused under the old derivation
    with pytest.raises(ConfigError, match="edited by hand"):
        parse_genesis(text.replace('chain_name = "c"', 'chain_name = "d"'))


# ---- load_genesis rejections --------------------------------------------------------------


KA, KB = _key(0x11), _key(0x22)


TERMS = genesis_terms(Limits(max_payload_bytes=10), [Organisation("o", (KA,))])


def _doc() -> dict[str, Any]:
    return {
        "chain_name": "c",
        "chain_id": derive_chain_id("c", 5, [KA, KB], TERMS).hex(),
        "genesis_time_ms": 5,
        "limits": {"max_payload_bytes": 10},
        "validators": [
            {"name": "a", "public_key": KA.hex(), "org": "o", "site": "s"},
            {"name": "b", "public_key": KB.hex()},
        ],
        "organisations": [{"name": "o", "members": [KA.hex()]}],
    }


def _load(tmp_path: Path, doc: dict[str, Any] | str) -> Genesis:
    path = tmp_path / "genesis.toml"
    path.write_text(doc if isinstance(doc, str) else tomli_w.dumps(doc))
    return load_genesis(path)


def test_load_genesis_minimal_doc(tmp_path: Path) -> None:
    g = _load(tmp_path, _doc())
    assert g.chain_id == derive_chain_id("c", 5, [KA, KB], TERMS)
    assert g.validators.n == 2
    assert g.validators.validators[0] == Validator("a", KA, "o", "s")
    assert g.organisations == (Organisation("o", (KA,)),)
    assert g.limits == Limits(max_payload_bytes=10)


def test_load_genesis_missing_file(tmp_path: Path) -> None:
    _assert_config_error(load_genesis, tmp_path / "absent.toml")


def test_load_genesis_directory(tmp_path: Path) -> None:
    _assert_config_error(load_genesis, tmp_path)


@pytest.mark.parametrize("text", ["chain_name = ", "[[validators]\n", "a = 1\na = 2\n", "= 3"])
def test_load_genesis_bad_toml(tmp_path: Path, text: str) -> None:
    _assert_config_error(_load, tmp_path, text)


@pytest.mark.parametrize("key", ["chain_name", "chain_id", "genesis_time_ms", "validators"])
def test_load_genesis_missing_key(tmp_path: Path, key: str) -> None:
    doc = _doc()
    del doc[key]
    err = _assert_config_error(_load, tmp_path, doc)
    assert key in str(err)


_DELETE = object()


def _edit(path: str, value: Any) -> dict[str, Any]:
    doc = _doc()
    target: Any = doc
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("chain_id", "zz" * 32),
        ("chain_id", "ab" * 31),
        ("chain_id", "ab" * 33),
        ("chain_id", "abc"),
        ("chain_id", 5),
        ("genesis_time_ms", 0),
        ("genesis_time_ms", -1),
        ("genesis_time_ms", "5"),
        ("genesis_time_ms", True),
        ("validators", []),
        ("validators", ["a"]),
        ("validators.0.public_key", "11" * 31),
        ("validators.0.public_key", "11" * 33),
        ("validators.0.public_key", "xy" * 32),
        ("validators.0.public_key", 7),
        ("validators.0.public_key", _DELETE),
        ("validators.0.name", _DELETE),
        ("validators.1.public_key", KA.hex()),
        ("validators.1.name", "a"),
        ("organisations.0.name", _DELETE),
        ("organisations.0.members", ["11" * 31]),
        ("organisations.0.members", ["nothex"]),
        ("organisations", ["o"]),
        ("limits.max_payload_bytes", 0),
        ("limits.max_batch_rows", -5),
        ("limits.max_block_txs", 1.5),
        ("limits.max_block_txs", "100"),
        ("limits.max_block_txs", False),
        ("limits.max_rows", 10),
        # Batches of up to 65,536 rows (the default) could never fit in a block
        ("limits.max_block_txs", 1000),
    ],
)
def test_load_genesis_rejects(tmp_path: Path, path: str, value: Any) -> None:
    _assert_config_error(_load, tmp_path, _edit(path, value))


def test_a_batch_must_fit_in_a_block() -> None:
    assert Limits(max_batch_rows=50, max_block_txs=50).max_block_txs == 50
    with pytest.raises(ConfigError, match=r"max_batch_rows \(51\) exceeds .*max_block_txs \(50\)"):
        Limits(max_batch_rows=51, max_block_txs=50)


@pytest.mark.parametrize(
    "path", ["validators", "organisations", "organisations.0.members", "limits"]
)
def test_load_genesis_scalar_where_table_expected(tmp_path: Path, path: str) -> None:
    _assert_config_error(_load, tmp_path, _edit(path, 5))


def test_load_genesis_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "genesis.toml"
    path.write_bytes(b"\xff\xfe chain_name = 1\n")
    _assert_config_error(load_genesis, path)


# ---- key files ----------------------------------------------------------------------------


def test_key_from_seed_is_deterministic() -> None:
    assert public_bytes(key_from_seed(b"\x01" * 32)) == public_bytes(key_from_seed(b"\x01" * 32))
    assert public_bytes(key_from_seed(b"\x01" * 32)) != public_bytes(key_from_seed(b"\x02" * 32))
    assert len(public_bytes(generate_key())) == 32
    assert public_bytes(generate_key()) != public_bytes(generate_key())


def test_key_file_round_trip(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "nested" / "dir" / "validator.pem"
    write_key_file(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = read_key_file(path)
    assert public_bytes(back) == public_bytes(key)
    raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    assert back.private_bytes(*raw) == key.private_bytes(*raw)
    assert read_key_file(str(path)) is not None


def test_key_file_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first = generate_key()
    write_key_file(path, first)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_key_file(path, generate_key())
    assert path.read_bytes() == before
    assert public_bytes(read_key_file(path)) == public_bytes(first)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_read_key_file_garbage(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(data)
    _assert_config_error(read_key_file, path)


def test_read_key_file_encrypted(tmp_path: Path) -> None:
    pem = generate_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = tmp_path / "k.pem"
    path.write_bytes(pem)
    _assert_config_error(read_key_file, path)


def test_read_key_file_not_ed25519(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "k.pem"
    path.write_bytes(pem)
    _assert_config_error(read_key_file, path)


def test_a_small_order_validator_key_is_refused() -> None:
    good = [Validator(f"v{i}", bytes([i + 7]) * 32) for i in range(3)]
    weak = Validator("weak", bytes.fromhex("01" + "00" * 31))
    with pytest.raises(ConfigError, match="weak's public key is a point of small order"):
        ValidatorSet((*good, weak))


# ---- keys that are no point, and chain ids that were not derived --------------------------


def test_is_curve_point() -> None:
    keys = [public_bytes(generate_key()) for _ in range(50)]
    assert all(is_curve_point(k) for k in keys)
    # -P is a point too (the sign bit flipped); x is never 0 for a real key
    assert all(is_curve_point(k[:31] + bytes([k[31] ^ 0x80])) for k in keys)
    assert not is_curve_point(b"\xab" * 32)  # y^2 - 1 / (d y^2 + 1) has no square root
    assert not is_curve_point(keys[0][:31])
    # Of the 14 encodings of small-order points, the 8 canonical ones decode: y >= p and "-0"
    # (x = 0 with the sign bit set) do not
    canonical = {k for k in SMALL_ORDER_KEYS if is_curve_point(k)}
    assert len(canonical) == 8
    assert bytes.fromhex("ed" + "ff" * 30 + "7f") not in canonical  # y = p
    assert bytes.fromhex("01" + "00" * 30 + "80") not in canonical  # y = 1, x = -0


def test_a_key_that_is_no_point_is_refused_in_a_genesis() -> None:
    off = b"\xab" * 32
    vals = (*_vals(3), Validator("typo", off))
    ValidatorSet(vals)  # the simulator's sets hold MAC keys, so the set itself allows it
    with pytest.raises(ConfigError, match="validator typo's public key is not a point"):
        new_genesis("c", vals, 5)
    with pytest.raises(ConfigError, match="organisation o's member 1 is not a point"):
        new_genesis("c", _vals(4), 5, [Organisation("o", (_key(1), off))])
    with pytest.raises(ConfigError, match=f"account {off.hex()} is not a point"):
        new_genesis("c", _vals(4), 5, accounts=[Account(_key(1), 3), Account(off, 1)])


def test_load_genesis_refuses_a_key_that_is_no_point(tmp_path: Path) -> None:
    doc = _doc()
    doc["validators"][1]["public_key"] = "ab" * 32
    doc["chain_id"] = derive_chain_id("c", 5, [KA, b"\xab" * 32], TERMS).hex()
    with pytest.raises(ConfigError, match="validator b's public key is not a point"):
        _load(tmp_path, doc)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("chain_id", "ab" * 32),
        ("chain_name", "d"),
        ("genesis_time_ms", 6),
        ("validators.1.public_key", _key(0x33).hex()),
        ("validators", [{"name": "a", "public_key": KA.hex()}]),
    ],
)
def test_load_genesis_refuses_a_chain_id_not_derived(tmp_path: Path, path: str, value: Any) -> None:
    with pytest.raises(ConfigError, match="chain_id [0-9a-f]{64} is not the one its chain_name"):
        _load(tmp_path, _edit(path, value))
