"""``swarmgate admin …``: accounts, keys, devices and models, straight on the database.

Every command takes ``--json`` and then prints exactly one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from swarmgate.accounts import service
from swarmgate.billing.ledger import Ledger
from swarmgate.catalog import Catalog
from swarmgate.config import GatewaySettings
from swarmgate.errors import RequestError, SwarmgateError
from swarmgate.store.db import create_engine, migrate
from swarmgate.vault.crypto import VaultError

# Micro-dollars are stored in signed 64-bit columns: the most that can be stored at all.
# (The service applies its own, lower, business limits.)
MAX_STORABLE_USD = Decimal(2**63 - 1).scaleb(-6)


def usd_to_micros(value: str) -> int:
    """Parses a dollar amount exactly (Decimal, never float) into micro-dollars."""
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount of dollars: {value!r}") from None
    if not amount.is_finite():  # inf, nan, snan
        raise argparse.ArgumentTypeError(f"not an amount of dollars: {value!r}")
    if amount < 0:
        raise argparse.ArgumentTypeError("credits must be ≥ 0 with at most 6 decimal places")
    if amount > MAX_STORABLE_USD:
        raise argparse.ArgumentTypeError(f"too many dollars to store: {value!r}")
    micros = amount * 1_000_000
    if micros != micros.to_integral_value() or micros < 0:
        raise argparse.ArgumentTypeError("credits must be ≥ 0 with at most 6 decimal places")
    return int(micros)


def add_admin_parser(sub: Any) -> None:
    admin = sub.add_parser("admin", help="manage accounts, keys and devices")
    admin.add_argument("--json", action="store_true", help="print one JSON object")
    admin.add_argument("--data-dir", help="gateway data directory (SWARMGATE_DATA_DIR)")
    admin.add_argument("--database-url", help="SWARMGATE_DATABASE_URL")
    groups = admin.add_subparsers(dest="admin_group", required=True)

    accounts = groups.add_parser("accounts").add_subparsers(dest="action", required=True)
    create = accounts.add_parser("create", help="create an account")
    create.add_argument("--name", required=True)
    create.add_argument("--email")
    create.add_argument("--credits", type=usd_to_micros, default=0, help="dollars, e.g. 5.00")
    create.add_argument("--provider", action="store_true", help="the account owns devices")
    create.set_defaults(run=_accounts_create)
    accounts.add_parser("list").set_defaults(run=_accounts_list)
    top_up = accounts.add_parser("top-up", help="add credit to an account")
    top_up.add_argument("account", help="the account id")
    top_up.add_argument("--usd", type=usd_to_micros, required=True, help="dollars, e.g. 5.00")
    top_up.add_argument("--sandbox", action="store_true", help="play credit for sg_test_ keys")
    top_up.add_argument("--memo", help="why the credit was granted (kept in the ledger)")
    # Also accepted after the command; SUPPRESS keeps an earlier `admin --json`.
    top_up.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    top_up.set_defaults(run=_accounts_top_up)

    keys = groups.add_parser("keys").add_subparsers(dest="action", required=True)
    key_create = keys.add_parser("create", help="create an API key (shown once)")
    key_create.add_argument("--account", required=True)
    key_create.add_argument("--name", default="")
    key_create.add_argument("--test", action="store_true", help="a sandbox sg_test_ key")
    key_create.set_defaults(run=_keys_create)
    key_list = keys.add_parser("list", help="an account's keys (never their secrets)")
    key_list.add_argument("--account", required=True)
    key_list.set_defaults(run=_keys_list)
    key_revoke = keys.add_parser("revoke", help="revoke a key at once")
    key_revoke.add_argument("key_id")
    key_revoke.add_argument("--account", required=True)
    key_revoke.set_defaults(run=_keys_revoke)
    key_rotate = keys.add_parser("rotate", help="a new secret with the same settings")
    key_rotate.add_argument("key_id")
    key_rotate.add_argument("--account", required=True)
    key_rotate.add_argument(
        "--grace-seconds", type=int, default=0, help="keep the old key working this long"
    )
    key_rotate.set_defaults(run=_keys_rotate)

    devices = groups.add_parser("devices").add_subparsers(dest="action", required=True)
    dev_create = devices.add_parser("create", help="register a device; prints its token once")
    dev_create.add_argument("--account", required=True)
    dev_create.add_argument("--name", default="")
    dev_create.set_defaults(run=_devices_create)
    devices.add_parser("list").set_defaults(run=_devices_list)

    models = groups.add_parser("models").add_subparsers(dest="action", required=True)
    models.add_parser("list").set_defaults(run=_models_list)

    vault = groups.add_parser("vault").add_subparsers(dest="action", required=True)
    rotate = vault.add_parser(
        "rotate",
        help="re-encrypt every vault record under a new master secret",
        description=(
            "Opens every record with SWARMGATE_VAULT_MASTER_SECRET and seals it again with "
            "the secret in the environment variable --new-secret-env names (kept out of the "
            "command line). Then set SWARMGATE_VAULT_MASTER_SECRET and "
            "SWARMGATE_VAULT_KEY_VERSION to the new values and restart the gateway."
        ),
    )
    rotate.add_argument("--new-secret-env", required=True, metavar="NAME")
    rotate.add_argument("--new-version", type=int, help="default: the current version + 1")
    rotate.set_defaults(run=_vault_rotate)

    admin.set_defaults(func=run_admin)


def run_admin(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.database_url:
        overrides["database_url"] = args.database_url
    settings = GatewaySettings(**overrides)
    runner: Callable[[Any, argparse.Namespace], Awaitable[dict[str, Any]]] = args.run
    args.settings = settings

    async def main() -> dict[str, Any]:
        engine = create_engine(settings.database_url)
        try:
            await migrate(engine)
            return await runner(engine, args)
        finally:
            await engine.dispose()

    try:
        result = asyncio.run(main())
    except SwarmgateError as exc:
        if args.json:
            sys.stdout.write(orjson.dumps(exc.to_dict()).decode() + "\n")
        else:
            print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        _print_human(result)
    return 0


def _print_human(result: dict[str, Any]) -> None:
    if "data" in result:
        for item in result["data"]:
            print("  ".join(f"{k}={v}" for k, v in item.items() if v is not None))
        return
    for key, value in result.items():
        print(f"{key}: {value}")


async def _accounts_create(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    return await service.create_account(
        engine,
        name=args.name,
        email=args.email,
        credit_micros=args.credits,
        provider=args.provider,
    )


async def _accounts_list(engine: Any, _args: argparse.Namespace) -> dict[str, Any]:
    return {"object": "list", "data": await service.list_accounts(engine)}


async def _accounts_top_up(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    # Embedded: straight into the ledger; a running gateway re-reads the balance before
    # it refuses a request for want of credit, so it never acts on the stale amount.
    # Scaled out: announced to the account's wallet in Redis first and applied there
    # after, as the gateways do (a busy account's wallet is never re-read).
    ledger = Ledger(engine)
    settings: GatewaySettings = args.settings
    if settings.redis_url:
        transaction_id = await _top_up_shared(ledger, settings, args)
    else:
        transaction_id = await ledger.top_up(
            args.account, args.usd, "admin", sandbox=args.sandbox, memo=args.memo
        )
    balance = await ledger.balance(args.account, sandbox=args.sandbox)
    return {
        "object": "top_up",
        "account_id": args.account,
        "transaction_id": transaction_id,
        "amount_micros": args.usd,
        "sandbox": args.sandbox,
        "available_micros": balance.available_micros,
        "held_micros": balance.held_micros,
    }


async def _top_up_shared(
    ledger: Ledger, settings: GatewaySettings, args: argparse.Namespace
) -> str:
    from redis.asyncio import Redis

    from swarmgate.cluster.keys import ClusterKeys
    from swarmgate.cluster.wallets import RedisWallets, announced_credit, reservation_ttl_s

    redis = Redis.from_url(settings.redis_url)
    try:
        wallets = RedisWallets(
            redis, ClusterKeys(settings.redis_prefix), entry_ttl_s=reservation_ttl_s(settings)
        )
        return await announced_credit(
            wallets, ledger, args.account, args.usd, "admin", sandbox=args.sandbox, memo=args.memo
        )
    finally:
        await redis.aclose()


async def _keys_list(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    return {"object": "list", "data": await service.list_api_keys(engine, args.account)}


async def _keys_revoke(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    return await service.revoke_api_key(engine, args.account, args.key_id)


async def _keys_rotate(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    rotation = await service.rotate_api_key(
        engine, args.account, args.key_id, grace_s=args.grace_seconds
    )
    return {**rotation.new_key, "key": rotation.created.secret, "replaced": rotation.old_key}


async def _keys_create(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    created = await service.create_api_key(
        engine, account_id=args.account, name=args.name, mode="test" if args.test else "live"
    )
    return {
        "id": created.id,
        "account_id": created.account_id,
        "key": created.secret,
        "prefix": created.prefix,
        "created_at": created.created_at.isoformat(),
    }


async def _devices_create(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    created = await service.create_device(
        engine,
        account_id=args.account,
        name=args.name,
        welcome_bonus_micros=GatewaySettings().provider_welcome_bonus_micros,
    )
    return {
        "id": created.id,
        "account_id": created.account_id,
        "token": created.secret,
        "prefix": created.prefix,
        "created_at": created.created_at.isoformat(),
    }


async def _devices_list(engine: Any, _args: argparse.Namespace) -> dict[str, Any]:
    return {"object": "list", "data": await service.list_devices(engine)}


async def _vault_rotate(engine: Any, args: argparse.Namespace) -> dict[str, Any]:
    from swarmgate.vault.crypto import VaultCipher
    from swarmgate.vault.store import rotate_master

    settings: GatewaySettings = args.settings
    if not settings.vault_master_secret:
        raise RequestError("SWARMGATE_VAULT_MASTER_SECRET (the current secret) is not set.")
    new_secret = os.environ.get(args.new_secret_env, "")
    if len(new_secret) < 32:
        raise RequestError(f"${args.new_secret_env} must hold the new secret (32+ characters).")
    old = VaultCipher(settings.vault_master_secret, key_version=settings.vault_key_version)
    version = args.new_version or settings.vault_key_version + 1
    new = VaultCipher(new_secret, key_version=version)
    if old.same_master(new):
        raise RequestError("The new secret is the same as the current one.")
    try:
        count = await rotate_master(engine, old, new)
    except VaultError as exc:
        raise RequestError(str(exc)) from exc
    return {"rotated": count, "key_version": version}


async def _models_list(_engine: Any, _args: argparse.Namespace) -> dict[str, Any]:
    catalog = Catalog.load()
    return {
        "object": "list",
        "data": [
            {
                "id": m.id,
                "tier": m.tier,
                "context_length": m.context_length,
                "input_per_1m_micros": m.pricing.input_per_1m_micros,
                "output_per_1m_micros": m.pricing.output_per_1m_micros,
                "sha256": m.artifact.sha256 if m.artifact else None,
            }
            for m in catalog
        ],
    }
