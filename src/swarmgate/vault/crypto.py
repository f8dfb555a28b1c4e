"""Sealing upstream API keys: AES-256-GCM under a key derived from the master secret.

Each record has its own 16-byte salt; PBKDF2-HMAC-SHA256 (600,000 iterations or more)
turns the master secret and that salt into the record's key-encryption key. Deriving
costs a few hundred milliseconds by design, so a derived key is cached in memory per
(salt, iterations, master) — once per record version, never per request. Every seal
uses a fresh random 96-bit nonce, and the associated data binds the ciphertext to its
account, provider and key version: a record copied to another account or provider, or
a flipped bit anywhere, fails to open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PBKDF2_ITERATIONS = 600_000
SALT_BYTES = 16
NONCE_BYTES = 12
_AAD_PREFIX = b"swarmgate-vault/1"
_CACHE_SIZE = 4096


class VaultError(Exception):
    """A record could not be opened: wrong master secret, tampered or misplaced."""


@dataclass(frozen=True, slots=True)
class Sealed:
    ciphertext: bytes  # with the 16-byte GCM tag at the end
    nonce: bytes
    salt: bytes
    iterations: int
    key_version: int


def associated_data(account_id: str, provider: str, key_version: int) -> bytes:
    parts = [_AAD_PREFIX, account_id.encode(), provider.encode(), str(key_version).encode()]
    return b"\x00".join(parts)


class VaultCipher:
    def __init__(
        self, master_secret: str, *, key_version: int = 1, iterations: int = PBKDF2_ITERATIONS
    ) -> None:
        if not master_secret:
            raise ValueError("the vault needs a master secret")
        if iterations < PBKDF2_ITERATIONS:
            raise ValueError(f"PBKDF2 needs at least {PBKDF2_ITERATIONS} iterations")
        self._secret = master_secret.encode()
        # Which master secret this is; records sealed under an older one need rotating.
        self._fingerprint = hashlib.sha256(b"swarmgate-vault-master\x00" + self._secret).digest()
        self.key_version = key_version
        self.iterations = iterations
        self._keys: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()

    def _key(self, salt: bytes, iterations: int) -> bytes:
        cached = self._keys.get((salt, iterations))
        if cached is not None:
            self._keys.move_to_end((salt, iterations))
            return cached
        key = hashlib.pbkdf2_hmac("sha256", self._secret, salt, iterations, dklen=32)
        self._keys[(salt, iterations)] = key
        while len(self._keys) > _CACHE_SIZE:
            self._keys.popitem(last=False)
        return key

    def seal(self, plaintext: str, *, account_id: str, provider: str) -> Sealed:
        """Encrypts ``plaintext`` for one account and provider under a fresh salt and nonce.

        Blocking (PBKDF2): call it in a worker thread from async code.
        """
        salt = os.urandom(SALT_BYTES)
        nonce = os.urandom(NONCE_BYTES)
        key = self._key(salt, self.iterations)
        aad = associated_data(account_id, provider, self.key_version)
        ciphertext = AESGCM(key).encrypt(nonce, plaintext.encode(), aad)
        return Sealed(ciphertext, nonce, salt, self.iterations, self.key_version)

    def open(self, sealed: Sealed, *, account_id: str, provider: str) -> str:
        """The plaintext, or VaultError. Blocking the first time a record is seen."""
        key = self._key(sealed.salt, sealed.iterations)
        aad = associated_data(account_id, provider, sealed.key_version)
        try:
            return AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, aad).decode()
        except (InvalidTag, ValueError, UnicodeDecodeError) as exc:
            raise VaultError("the vault record could not be opened") from exc

    def same_master(self, other: VaultCipher) -> bool:
        return hmac.compare_digest(self._fingerprint, other._fingerprint)
