"""The key vault: AES-256-GCM under PBKDF2-derived keys, bound to account, provider and
key version; rotation; nothing in clear in the database or the logs."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import pytest

from swarmgate.accounts import service
from swarmgate.config import GatewaySettings
from swarmgate.store.db import create_engine, migrate
from swarmgate.vault import crypto
from swarmgate.vault.crypto import PBKDF2_ITERATIONS, VaultCipher, VaultError
from swarmgate.vault.store import Vault, rotate_master
from tests.conftest import LiveGateway

SECRET = "a-master-secret-for-tests-0123456789"
API_KEY = "sk-live-ABCDEFGHIJKLMNOP-9876"


def test_round_trip_and_what_binds_a_record() -> None:
    cipher = VaultCipher(SECRET)
    sealed = cipher.seal(API_KEY, account_id="acct_a", provider="openrouter")
    assert API_KEY.encode() not in sealed.ciphertext
    assert len(sealed.nonce) == 12 and len(sealed.salt) == 16
    assert sealed.iterations >= 600_000
    assert cipher.open(sealed, account_id="acct_a", provider="openrouter") == API_KEY
    with pytest.raises(VaultError):
        cipher.open(sealed, account_id="acct_b", provider="openrouter")  # another account
    with pytest.raises(VaultError):
        cipher.open(sealed, account_id="acct_a", provider="together")  # another provider
    with pytest.raises(VaultError):
        cipher.open(
            dataclasses.replace(sealed, key_version=2), account_id="acct_a", provider="openrouter"
        )
    for field in ("ciphertext", "nonce", "salt"):
        value = bytearray(getattr(sealed, field))
        value[len(value) // 2] ^= 0x01  # one flipped bit
        tampered = dataclasses.replace(sealed, **{field: bytes(value)})
        with pytest.raises(VaultError):
            cipher.open(tampered, account_id="acct_a", provider="openrouter")
    with pytest.raises(VaultError):
        VaultCipher("another-master-secret-0123456789ab").open(
            sealed, account_id="acct_a", provider="openrouter"
        )


def test_weak_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        VaultCipher("")
    with pytest.raises(ValueError):
        VaultCipher(SECRET, iterations=PBKDF2_ITERATIONS - 1)
    with pytest.raises(ValueError, match="VAULT_MASTER_SECRET"):
        GatewaySettings(environment="production", admin_token="x" * 40, vault_master_secret="")
    with pytest.raises(ValueError, match="VAULT_MASTER_SECRET"):
        GatewaySettings(
            environment="production", admin_token="x" * 40, vault_master_secret="changeme"
        )
    GatewaySettings(environment="production", admin_token="x" * 40, vault_master_secret=SECRET)


def test_nonces_never_repeat_and_a_record_key_is_derived_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    derivations: list[bytes] = []
    real = hashlib.pbkdf2_hmac

    def counted(name: str, secret: bytes, salt: bytes, iterations: int, dklen: int) -> bytes:
        derivations.append(salt)
        # The real function at its real cost would make 5,000 seals take half an hour;
        # this test is about nonces and caching, so it derives with 1 iteration.
        return real(name, secret, salt, 1, dklen)

    monkeypatch.setattr(crypto.hashlib, "pbkdf2_hmac", counted)
    cipher = VaultCipher(SECRET)
    sealed = [cipher.seal("k", account_id="a", provider="p") for _ in range(5_000)]
    assert len({s.nonce for s in sealed}) == 5_000
    assert len({s.salt for s in sealed}) == 5_000
    derivations.clear()
    for _ in range(10):
        assert cipher.open(sealed[-1], account_id="a", provider="p") == "k"
    assert len(derivations) == 0  # derived when sealed, cached since


async def test_rotation_keeps_every_key_readable(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'vault.db'}")
    await migrate(engine)
    try:
        accounts = [(await service.create_account(engine, name=f"a{i}"))["id"] for i in range(3)]
        old = Vault(engine, VaultCipher(SECRET, key_version=1))
        for i, account in enumerate(accounts):
            await old.put(account, "openrouter", f"sk-key-number-{i}-abcdef", None)
        await old.put(accounts[0], "together", "sk-together-key-xyz", "https://example.test/v1")
        new_cipher = VaultCipher("the-next-master-secret-0123456789", key_version=2)
        assert await rotate_master(engine, old.cipher, new_cipher) == 4  # type: ignore[arg-type]
        new = Vault(engine, new_cipher)
        for i, account in enumerate(accounts):
            assert await new.key_for(account, "openrouter") == (f"sk-key-number-{i}-abcdef", None)
        assert await new.key_for(accounts[0], "together") == (
            "sk-together-key-xyz",
            "https://example.test/v1",
        )
        stale = Vault(engine, VaultCipher(SECRET, key_version=1))
        with pytest.raises(VaultError):
            await stale.key_for(accounts[1], "openrouter")
        # Rotating with the wrong old secret changes nothing.
        wrong = VaultCipher("not-the-current-secret-0123456789", key_version=2)
        with pytest.raises(VaultError):
            await rotate_master(engine, wrong, VaultCipher(SECRET, key_version=3))
        assert await new.key_for(accounts[2], "openrouter") == ("sk-key-number-2-abcdef", None)
    finally:
        await engine.dispose()


async def test_the_api_never_shows_stores_or_logs_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import fast_settings, start_gateway, stop_gateway

    live: LiveGateway = await start_gateway(
        fast_settings(
            tmp_path,
            vault_master_secret=SECRET,
            upstreams=[{"name": "openrouter", "base_url": "http://127.0.0.1:9/v1"}],
        )
    )
    caplog.set_level(logging.DEBUG)
    try:
        _, key = await live.developer_key()
        _, other = await live.developer_key("other")
        async with live.client(key) as client:
            assert (await client.get("/v1/vault")).json() == {
                "exists": False,
                "object": "list",
                "data": [],
            }
            stored = await client.post("/v1/vault", json={"apiKey": API_KEY})
            assert stored.status_code == 201, stored.text
            assert stored.json()["provider"] == "openrouter"  # the gateway's default upstream
            assert stored.json()["last4"] == "9876"
            listed = await client.get("/v1/vault", params={"provider": "openrouter"})
            assert listed.json()["exists"] is True
            for response in (stored, listed, await client.get("/v1/vault")):
                assert API_KEY not in response.text
            bad = await client.post("/v1/vault", json={"provider": "nope", "apiKey": API_KEY})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "provider"
            short = await client.post("/v1/vault", json={"apiKey": "x"})
            assert short.status_code == 400
            for url in ("http://127.0.0.1:6379/v1", "http://10.0.0.8/v1", "http://[::1]/v1"):
                private = await client.post("/v1/vault", json={"apiKey": API_KEY, "baseUrl": url})
                assert private.status_code == 400, url
                assert private.json()["error"]["param"] == "baseUrl"
        async with live.client(other) as client:
            assert (await client.get("/v1/vault")).json()["exists"] is False
            missing = await client.delete("/v1/vault", params={"provider": "openrouter"})
            assert missing.status_code == 404
        account_id = (await live.gateway.authenticate(f"Bearer {key}")).account_id
        assert await live.gateway.vault.key_for(account_id, "openrouter") == (API_KEY, None)
    finally:
        await stop_gateway(live)
    # The database, its WAL, and the charge journal's files.
    for path in [*tmp_path.glob("swarmgate.db*"), *tmp_path.glob("swarmgate.db-charges/*")]:
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path
    assert API_KEY not in caplog.text


async def test_the_rotate_command_re_encrypts_every_record(tmp_path: Path) -> None:
    import asyncio
    import os
    import subprocess

    from tests.conftest import swarmgate_cmd

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'swarmgate.db'}")
    await migrate(engine)
    try:
        account = (await service.create_account(engine, name="dev"))["id"]
        await Vault(engine, VaultCipher(SECRET)).put(account, "openrouter", API_KEY, None)
    finally:
        await engine.dispose()
    new_secret = "the-rotated-master-secret-0123456789"
    env = {
        **os.environ,
        "SWARMGATE_DATA_DIR": str(tmp_path),
        "SWARMGATE_VAULT_MASTER_SECRET": SECRET,
        "NEW_VAULT_SECRET": new_secret,
    }
    done = await asyncio.to_thread(
        subprocess.run,
        swarmgate_cmd("admin", "--json", "vault", "rotate", "--new-secret-env", "NEW_VAULT_SECRET"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert '"rotated":1' in done.stdout and '"key_version":2' in done.stdout
    assert new_secret not in done.stdout + done.stderr
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'swarmgate.db'}")
    try:
        rotated = Vault(engine, VaultCipher(new_secret, key_version=2))
        assert await rotated.key_for(account, "openrouter") == (API_KEY, None)
    finally:
        await engine.dispose()
