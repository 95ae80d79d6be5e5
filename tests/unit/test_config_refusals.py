"""`genesis new`, `genesis show` and `keys new` refuse a bad network config, genesis or path
with exit code 2 and one message naming the problem, and write nothing: no genesis, no key.

Found by a sweep of bad inputs: a member named '../../escaped' wrote its key outside
--keys-dir; limits such as -1, 1.5 or "lots" went into a genesis that `genesis show` then
refused; a [[clients]] that was a number, or a config that was not UTF-8, ended in a
traceback; an --out that could not be written ended in a traceback after the keys were
written; a --keys-dir holding one of the keys had the others written before the refusal;
and without --keys-dir or --dev the new keys were thrown away."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rayledger.cluster.cli import app

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.toml"
BASE = CONFIG.read_text()
# The config without its [[clients]] tables, and without its [[links]]: a key put first
# then names the whole section
NO_CLIENTS = re.sub(r"\[\[clients\]\]\n(?:\w+ = .*\n)*", "", BASE)
NO_LINKS = re.sub(r"\[\[links\]\]\n(?:\w+ = .*\n)*", "", BASE)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), terminal_width=200)
    return result.exit_code, " ".join(result.output.split())


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # Member names name key files
        (('name = "v0"', 'name = "../../escaped"'), "name '../../escaped' is not 1 to 64"),
        (('name = "v1"', 'name = "sub/dir/x"'), "name 'sub/dir/x' is not"),
        (('name = "v2"', 'name = ""'), "name '' is not"),
        (('name = "v3"', 'name = ".hidden"'), "name '.hidden' is not"),
        (('name = "v3"', "name = 5"), "validators[3].name: expected a string, got int"),
        (('org = "customs"', "org = []"), "validators[2].org: expected a string, got list"),
        # Limits: what `genesis show` would refuse is refused here
        (("max_payload_bytes = 65536", "max_payload_bytes = -1"), "limits.max_payload_bytes"),
        (("max_payload_bytes = 65536", "max_payload_bytes = 1.5"), "expected a positive integer"),
        (("max_payload_bytes = 65536", 'max_payload_bytes = "lots"'), "expected a positive"),
        (("max_block_txs = 100000", "max_block_txs = 0"), "limits.max_block_txs: expected a"),
        (("max_block_txs = 100000", "max_block_txs = 10"), "exceeds limits.max_block_txs (10)"),
        (("max_block_txs = 100000", "max_block_txs = 1\nbogus = 3"), "unknown limits ['bogus']"),
        (("client_balance = 1000000", "client_balance = true"), "client_balance must be an"),
        (('chain_name = "rayledger-local"', "chain_name = 42"), "chain_name: expected a string"),
        (('chain_name = "rayledger-local"', 'chain_name = " "'), "chain_name is empty"),
    ],
)
def test_genesis_new_refuses_a_bad_config_and_writes_nothing(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    old, new = edit
    assert old in BASE
    config = tmp_path / "conf" / "net.toml"
    config.parent.mkdir()
    config.write_text(BASE.replace(old, new, 1))
    keys = tmp_path / "k" / "a" / "b"
    code, out = run(
        "genesis", "new", "--out", str(tmp_path / "g.toml"), "--config", str(config),
        "--keys-dir", str(keys),
    )  # fmt: skip
    assert code == 2 and "error:" in out and message in out, out
    assert files(tmp_path) == ["conf", "conf/net.toml"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clients = 5\n" + BASE, "cannot read network config"),  # defined twice
        ("clients = 5\n" + NO_CLIENTS, "clients must be an array of tables"),
        ('clients = ["x"]\n' + NO_CLIENTS, "clients[0] needs a name and an org"),
        ("links = 5\n" + NO_LINKS, "links must be an array of tables"),
        (BASE.replace("latency_ms = 5.0", "latency_ms = nan", 1), "a latency that is not a finite"),
        (BASE.replace("latency_ms = 5.0", "latency_ms = inf", 1), "a latency that is not a finite"),
    ],
)
def test_wrong_types_in_a_config_are_named_not_a_traceback(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "net.toml"
    config.write_text(text)
    code, out = run(
        "genesis", "new", "--out", str(tmp_path / "g.toml"), "--config", str(config), "--dev"
    )
    assert code == 2 and message in out, out
    assert files(tmp_path) == ["net.toml"]


def test_a_config_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    config = tmp_path / "net.toml"
    config.write_bytes(b"chain_name = \xb5\xff\n")
    code, out = run(
        "genesis", "new", "--out", str(tmp_path / "g.toml"), "--config", str(config), "--dev"
    )
    assert code == 2 and f"cannot read network config {config}" in out, out
    assert files(tmp_path) == ["net.toml"]


def test_genesis_new_refuses_an_out_or_keys_dir_it_cannot_use_before_writing_anything(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    # --out in a folder that does not exist, or under a file
    (tmp_path / "plain").write_text("x")
    for out in (tmp_path / "missing" / "g.toml", tmp_path / "plain" / "g.toml"):
        code, msg = run("genesis", "new", "--out", str(out), "--keys-dir", str(keys))
        assert code == 2 and "is not a directory" in msg, msg
    # --out a dangling link: not written through
    (tmp_path / "link.toml").symlink_to(tmp_path / "elsewhere.toml")
    code, msg = run("genesis", "new", "--out", str(tmp_path / "link.toml"), "--keys-dir", str(keys))
    assert code == 2 and "link.toml exists" in msg, msg
    # --keys-dir a file
    code, msg = run(
        "genesis", "new", "--out", str(tmp_path / "g.toml"), "--keys-dir", str(tmp_path / "plain")
    )
    assert code == 2 and "is not a directory" in msg, msg
    # New keys that nobody would keep
    code, msg = run("genesis", "new", "--out", str(tmp_path / "g.toml"))
    assert code == 2 and "pass --keys-dir DIR to keep the new keys, or --dev" in msg, msg
    assert files(tmp_path) == ["link.toml", "plain"]
    # A --keys-dir holding one of the keys: named, and no other key written
    keys.mkdir()
    (keys / "v3.key").write_text("someone's key")
    code, msg = run("genesis", "new", "--out", str(tmp_path / "g.toml"), "--keys-dir", str(keys))
    assert code == 2 and "holds keys of v3 already" in msg, msg
    assert files(keys) == ["v3.key"] and not (tmp_path / "g.toml").exists()


def test_genesis_show_names_a_bad_limit_once_and_a_time_past_64_bits(tmp_path: Path) -> None:
    made = tmp_path / "g.toml"
    assert run("genesis", "new", "--out", str(made), "--dev")[0] == 0
    text = made.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("max_payload_bytes = 65536", "max_payload_bytes = -1"))
    code, out = run("genesis", "show", str(bad))
    assert code == 2, out
    assert out == f"error: [config_error] {bad}: limits.max_payload_bytes: expected a positive " \
        "integer below 2^63"  # fmt: skip
    line = next(x for x in text.splitlines() if x.startswith("genesis_time_ms"))
    bad.write_text(text.replace(line, "genesis_time_ms = 9223372036854775808"))
    code, out = run("genesis", "show", str(bad))
    assert code == 2 and "genesis_time_ms: expected a positive integer below 2^63" in out, out


def test_keys_new_says_what_is_wrong_with_the_path(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    code, out = run("keys", "new", str(tmp_path / "plain" / "k.key"))
    assert code == 2 and "a parent is not a folder" in out, out
    code, out = run("keys", "new", str(tmp_path / "plain"))
    assert code == 2 and "exists; a key file is never overwritten" in out, out
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    code, out = run("keys", "new", str(tmp_path / "dangling"))
    assert code == 2 and "exists" in out and not (tmp_path / "nowhere").exists(), out
    assert files(tmp_path) == ["dangling", "plain"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("[limits]", "[limit]"), "unknown keys ['limit'] (known: chain_name, client_balance"),
        (('site = "site-a"', 'sit = "site-a"'), "validators[0]: unknown keys ['sit']"),
        (('org = "customs"', 'org = "customs"\nrole = "x"'), "unknown keys ['role']"),
        (("latency_ms = 5.0", "latency_ms = 5.0\nms = 1"), "links[0]: unknown keys ['ms']"),
    ],
)
def test_a_key_nobody_reads_is_refused_not_ignored(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    """A typo would otherwise leave its default in place in silence: `[limit]` meant the
    default limits, `sit` a validator placed anywhere."""
    old, new = edit
    config = tmp_path / "net.toml"
    config.write_text(BASE.replace(old, new, 1))
    code, out = run(
        "genesis", "new", "--out", str(tmp_path / "g.toml"), "--config", str(config), "--dev"
    )
    assert code == 2 and message in out, out
    assert files(tmp_path) == ["net.toml"]


def test_genesis_show_refuses_a_key_nobody_reads(tmp_path: Path) -> None:
    made = tmp_path / "g.toml"
    assert run("genesis", "new", "--out", str(made), "--dev")[0] == 0
    text = made.read_text()
    bad = tmp_path / "bad.toml"
    for old, new, message in [
        ("[limits]", "[limit]", "unknown keys ['limit'] (known: accounts, chain_id"),
        (
            "[[validators]]\n",
            "[[validators]]\nstake = 5\n",
            "validators[0]: unknown keys ['stake']",
        ),
        ("[[accounts]]\n", "[[accounts]]\nnonce = 1\n", "accounts[0]: unknown keys ['nonce']"),
        ("[[organisations]]\n", "[[organisations]]\nx = 1\n", "organisations[0]: unknown keys"),
    ]:
        assert old in text, old
        bad.write_text(text.replace(old, new, 1))
        code, out = run("genesis", "show", str(bad))
        assert code == 2 and message in out, out
