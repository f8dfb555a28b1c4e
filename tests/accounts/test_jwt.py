"""JWT bearer auth against a JWKS served over a real socket, with real RSA and EC keys."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import func, select

from swarmgate.accounts.jwt_auth import parse_jwks
from swarmgate.billing.ledger import Ledger
from swarmgate.store.tables import account_identities
from tests.conftest import LiveGateway, fast_settings, start_gateway, stop_gateway

ISSUER = "https://id.example.test"
AUDIENCE = "swarmgate-api"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": "ES256", "use": "sig"}


def make_token(key: Any, kid: str | None, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "iat": now,
        "exp": now + 300,
        **claims,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class JwksServer:
    """A JWKS endpoint on a real socket; tests swap ``document`` to rotate keys."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                body = json.dumps(server.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    server.document = {"keys": [rsa_jwk(RSA_KEY, "rsa-1"), ec_jwk(EC_KEY, "ec-1")]}
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def jwt_live(tmp_path: Path, jwks: JwksServer) -> AsyncIterator[LiveGateway]:
    settings = fast_settings(tmp_path, jwks_url=jwks.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    live = await start_gateway(settings)
    try:
        yield live
    finally:
        await stop_gateway(live)


async def call(live: LiveGateway, token: str, path: str = "/v1/account") -> Any:
    async with live.client(token) as client:
        return await client.get(path)


async def test_rs256_and_es256_tokens_map_one_subject_to_one_account(
    jwt_live: LiveGateway,
) -> None:
    first = await call(
        jwt_live, make_token(RSA_KEY, "rsa-1", name="Dana", email="Dana@Example.com")
    )
    assert first.status_code == 200, first.text
    account = first.json()
    assert account["name"] == "Dana" and account["email"] == "dana@example.com"

    again = await call(jwt_live, make_token(EC_KEY, "ec-1", alg="ES256", jti="second"))
    assert again.status_code == 200, again.text
    assert again.json()["id"] == account["id"]
    assert (await call(jwt_live, make_token(RSA_KEY, "rsa-1"), "/v1/models")).status_code == 200

    other = await call(jwt_live, make_token(EC_KEY, "ec-1", alg="ES256", sub="user-2"))
    assert other.status_code == 200 and other.json()["id"] != account["id"]
    assert other.json()["name"] == "user-2"  # no name or email claim: the subject

    ledger = Ledger(jwt_live.gateway.engine)
    welcome = jwt_live.settings.welcome_credit_micros
    assert (await ledger.balance(account["id"])).available_micros == welcome
    assert (await ledger.balance(account["id"], sandbox=True)).available_micros == welcome


async def test_a_jwt_caller_manages_its_own_keys(jwt_live: LiveGateway) -> None:
    token = make_token(RSA_KEY, "rsa-1", sub="key-maker")
    async with jwt_live.client(token) as client:
        created = await client.post("/v1/keys", json={"name": "from-sso"})
        assert created.status_code == 201
        assert [k["name"] for k in (await client.get("/v1/keys")).json()["data"]] == ["from-sso"]
    key = created.json()["key"]
    assert (await call(jwt_live, key)).json()["id"] == (await call(jwt_live, token)).json()["id"]


async def test_first_sight_races_make_one_account(jwt_live: LiveGateway) -> None:
    tokens = [make_token(RSA_KEY, "rsa-1", sub="racer", jti=str(i)) for i in range(8)]
    responses = await asyncio.gather(*(call(jwt_live, t) for t in tokens))
    assert [r.status_code for r in responses] == [200] * 8
    assert len({r.json()["id"] for r in responses}) == 1
    async with jwt_live.gateway.engine.connect() as conn:
        count = await conn.scalar(
            select(func.count())
            .select_from(account_identities)
            .where(account_identities.c.subject == "racer")
        )
    assert count == 1


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "someone-else"
    return f"{header}.{b64(claims)}.{signature}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: make_token(RSA_KEY, "rsa-1", iss="https://evil.example"), "issuer"),
        (lambda: make_token(RSA_KEY, "rsa-1", aud="someone-else"), "audience"),
        (lambda: make_token(RSA_KEY, "rsa-1", aud=None), "'aud'"),
        (lambda: make_token(RSA_KEY, "rsa-1", exp=int(time.time()) - 60), "expired"),
        (lambda: make_token(RSA_KEY, "rsa-1", nbf=int(time.time()) + 600), "not valid yet"),
        (lambda: make_token(RSA_KEY, "rsa-1", sub=None), "'sub'"),
        (lambda: make_token(RSA_KEY, "rsa-1", exp=None), "'exp'"),
        (lambda: make_token(RSA_KEY_2, "rsa-1"), "signature"),
        (lambda: _tampered(make_token(RSA_KEY, "rsa-1")), "signature"),
        (lambda: make_token(EC_KEY, "rsa-1", alg="ES256"), "algorithm"),
        (lambda: make_token(RSA_KEY, "rsa-1", alg="RS512"), "RS512"),
        (lambda: make_token(b"k" * 64, "rsa-1", alg="HS256"), "HS256"),
        (lambda: b64({"alg": "none", "kid": "rsa-1"}) + "." + b64({"sub": "x"}) + ".", "none"),
        (lambda: make_token(RSA_KEY, "no-such-kid"), "unknown"),
        (lambda: "not.a.jwt", "Malformed"),
    ],
)
async def test_bad_tokens_are_401(jwt_live: LiveGateway, make: Any, message: str) -> None:
    response = await call(jwt_live, make())
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert message in error["message"]


async def test_key_rotation_fetches_a_new_kid_once(jwt_live: LiveGateway, jwks: JwksServer) -> None:
    assert (await call(jwt_live, make_token(RSA_KEY, "rsa-1"))).status_code == 200
    fetched = jwks.requests
    assert fetched == 1

    jwks.document = {"keys": [rsa_jwk(RSA_KEY, "rsa-1"), rsa_jwk(RSA_KEY_2, "rsa-2")]}
    rotated = await call(jwt_live, make_token(RSA_KEY_2, "rsa-2", jti="r"))
    assert rotated.status_code == 200, rotated.text
    assert jwks.requests == fetched + 1

    # Made-up kids right after: refused without another round trip to the JWKS.
    for n in range(5):
        made_up = await call(jwt_live, make_token(RSA_KEY_2, f"fake-{n}"))
        assert made_up.status_code == 401
    assert jwks.requests == fetched + 1


async def test_periodic_refresh_drops_a_removed_key(tmp_path: Path, jwks: JwksServer) -> None:
    settings = fast_settings(
        tmp_path, jwks_url=jwks.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_refresh_s=0.3
    )
    live = await start_gateway(settings)
    try:
        assert (await call(live, make_token(EC_KEY, "ec-1", alg="ES256"))).status_code == 200
        jwks.document = {"keys": [rsa_jwk(RSA_KEY, "rsa-1")]}
        await asyncio.sleep(0.4)
        fresh = make_token(EC_KEY, "ec-1", alg="ES256", jti="after")
        assert (await call(live, fresh)).status_code == 401
        assert (await call(live, make_token(RSA_KEY, "rsa-1", jti="x"))).status_code == 200
    finally:
        await stop_gateway(live)


async def test_jwks_from_a_file_without_issuer_or_audience(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk(RSA_KEY, "rsa-1")]}))
    live = await start_gateway(fast_settings(tmp_path, jwks_file=path))
    try:
        token = make_token(RSA_KEY, "rsa-1", aud=None, iss="https://any.example")
        assert (await call(live, token)).status_code == 200
        # No audience configured: a token meant for some audience is not taken as ours.
        scoped = await call(live, make_token(RSA_KEY, "rsa-1", aud="elsewhere"))
        assert scoped.status_code == 401
        assert "SWARMGATE_JWT_AUDIENCE" in scoped.json()["error"]["message"]
    finally:
        await stop_gateway(live)


async def test_jwts_are_refused_where_no_jwks_is_configured(live: LiveGateway) -> None:
    response = await call(live, make_token(RSA_KEY, "rsa-1"))
    assert response.status_code == 401
    assert "JWKS" in response.json()["error"]["message"]


def test_parse_jwks_keeps_only_asymmetric_signing_keys() -> None:
    document = {
        "keys": [
            rsa_jwk(RSA_KEY, "rsa"),
            ec_jwk(EC_KEY, "ec"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**rsa_jwk(RSA_KEY_2, "enc"), "use": "enc"},
            {**rsa_jwk(RSA_KEY_2, "rs512"), "alg": "RS512"},
            {"kty": "RSA", "kid": "broken"},
            "not a key",
            {k: v for k, v in rsa_jwk(RSA_KEY_2, "x").items() if k != "kid"},
        ]
    }
    keys = parse_jwks(document)
    assert sorted(keys.by_kid) == ["ec", "rsa"]
    assert len(keys.unnamed) == 1
    assert [k.algorithm_name for k in keys.candidates(None, "RS256")] == ["RS256", "RS256"]
    with pytest.raises(ValueError, match="keys"):
        parse_jwks({"not": "a jwks"})
