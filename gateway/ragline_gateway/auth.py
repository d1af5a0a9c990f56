"""API keys: who is asking, for which tenant, which collections and which scopes.

Keys are stored as SHA-256 hex digests, never in the clear: a key is a random token of
high entropy, so a fast hash is enough (no salt or slow KDF needed), and a leaked keys file
or Secret gives nobody a usable key. `ragline keys new` makes a key and prints the entry.

The keys live in a JSON document, read from a file (a mounted Kubernetes Secret in
production; re-read when it changes, so keys rotate without a restart) or from an
environment variable. Auth never touches Redis: a Redis outage cannot lock everybody out
or let everybody in.

    {"keys": [{"id": "acme-web", "tenant": "acme", "sha256": "<64 hex>",
               "scopes": ["chat"], "collections": ["acme_docs", "acme_*"],
               "requests_per_minute": 120, "max_streams": 4}]}

A collection belongs to one tenant: the file is refused when two tenants' keys could reach
the same collection name, so "a key reaches only its tenant's collections" holds by
construction and does not depend on every request being well-formed.

A keys source that is configured but holds no key stops the gateway from starting, even
with `allow_anonymous`: an emptied Secret must not turn into an open, all-admin gateway.
Anonymous mode is only for a gateway given no keys source at all.

Failed authentication is throttled per client address (`FailedAuthThrottle`): the TCP
peer, or, when the peer is a trusted proxy (`trusted_proxies`), the client its
`X-Forwarded-For` names: uvicorn's proxy-headers middleware (given `trusted_proxies` as
`forwarded_allow_ips` by `python -m ragline_gateway`) reads the header from the right,
skipping trusted proxies, so what a client writes into the header itself is never taken
while a proxy appends the address it was called from (nginx's
`$proxy_add_x_forwarded_for`).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from ragline_common.errors import ApiError
from ragline_gateway import metrics

log = logging.getLogger("ragline.auth")

Scope = Literal["chat", "admin"]
# A collection name, or a name prefix ending in `*` (`acme_*`): what a tenant owns.
CollectionPattern = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}\*?$")]
KeyId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: 256 random bits, prefixed so that secret scanners recognise it."""
    return "rl-" + os.urandom(32).hex()


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: KeyId
    tenant: KeyId
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    scopes: list[Scope] = Field(min_length=1)
    collections: list[CollectionPattern] = Field(min_length=1, max_length=1000)
    # None: the gateway's defaults (settings); 0: unlimited.
    requests_per_minute: int | None = Field(default=None, ge=0)
    max_streams: int | None = Field(default=None, ge=0)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> KeysFile:
        for attr in ("id", "sha256"):
            values = [getattr(k, attr) for k in self.keys]
            dup = {v for v in values if values.count(v) > 1}
            if dup:
                shown = sorted(dup) if attr == "id" else ["(a key listed twice)"]
                raise ValueError(f"duplicate key {attr}: {', '.join(shown)}")
        claims = sorted({(p, k.tenant) for k in self.keys for p in k.collections})
        for i, (a, tenant_a) in enumerate(claims):
            for b, tenant_b in claims[i + 1 :]:
                if tenant_a != tenant_b and _overlap(a, b):
                    raise ValueError(
                        f"collections {a!r} (tenant {tenant_a}) and {b!r} (tenant "
                        f"{tenant_b}) overlap: a collection belongs to one tenant"
                    )
        return self


def _overlap(a: str, b: str) -> bool:
    """Whether some collection name matches both patterns."""
    a_prefix, b_prefix = a.endswith("*"), b.endswith("*")
    a_stem, b_stem = a.rstrip("*"), b.rstrip("*")
    if a_prefix and b_prefix:
        return a_stem.startswith(b_stem) or b_stem.startswith(a_stem)
    if a_prefix:
        return b_stem.startswith(a_stem)
    if b_prefix:
        return a_stem.startswith(b_stem)
    return a == b


def _matches(pattern: str, collection: str) -> bool:
    if pattern.endswith("*"):
        return collection.startswith(pattern[:-1])
    return collection == pattern


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated key behind a request."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    collections: tuple[str, ...]  # names and `prefix*` patterns; ("*",) reaches all
    requests_per_minute: int
    max_streams: int
    default: str = ""  # the collection used when a request names none
    anonymous: bool = False  # the one caller of a gateway without keys

    def conversation_scope(self, collection: str) -> str:
        """The namespace of this caller's conversations in `collection` (memory.py).

        A conversation belongs to the key that started it, in the collection it was
        started in: `tenant:key id:collection`. Another key, of the same tenant or not,
        that sends the same conversation id (or Open WebUI chat id) starts a conversation
        of its own and never reads or extends this one; the same key asking about another
        collection does too, so no passage of one collection is replayed as history into
        an answer from another. Anonymous mode (no keys) keeps one namespace per tenant,
        as before keys existed: `local`."""
        if self.anonymous:
            return self.tenant
        return f"{self.tenant}:{self.key_id}:{collection}"

    def may_read(self, collection: str) -> bool:
        return any(_matches(p, collection) for p in self.collections)

    def require(self, scope: Scope) -> None:
        if scope not in self.scopes:
            raise ApiError(403, "forbidden", f"this API key lacks the {scope!r} scope")

    def collection(self, asked: str | None) -> str:
        """The collection a request may use: the one it names if this key reaches it."""
        name = asked or self.default
        if not name:
            raise ApiError(
                422, "invalid_request", "this API key has no default collection; name one"
            )
        if not self.may_read(name):
            raise ApiError(
                403, "collection_forbidden", f"this API key has no access to collection {name!r}"
            )
        return name

    def visible(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.may_read(n)]


class KeyRing:
    """The keys in force; swapped whole when the source changes."""

    def __init__(
        self,
        entries: KeysFile,
        *,
        default_collection: str,
        requests_per_minute: int,
        max_streams: int,
    ) -> None:
        self.by_hash: dict[str, Caller] = {}
        for k in entries.keys:
            exact = [p for p in k.collections if not p.endswith("*")]
            default = default_collection if any(
                _matches(p, default_collection) for p in k.collections
            ) else (exact[0] if exact else "")  # fmt: skip
            self.by_hash[k.sha256] = Caller(
                key_id=k.id,
                tenant=k.tenant,
                scopes=frozenset(k.scopes),
                collections=tuple(k.collections),
                requests_per_minute=(
                    requests_per_minute if k.requests_per_minute is None else k.requests_per_minute
                ),
                max_streams=max_streams if k.max_streams is None else k.max_streams,
                default=default,
            )

    def __len__(self) -> int:
        return len(self.by_hash)

    def lookup(self, key: str) -> Caller | None:
        # A lookup by digest leaks no timing about the key: the client cannot steer the
        # digest's bytes, so a constant-time compare would add nothing.
        return self.by_hash.get(hash_key(key))


def parse_keys(text: str) -> KeysFile:
    try:
        return KeysFile.model_validate_json(text)
    except ValidationError as exc:
        # The message names fields and positions, never the values (which are hashes).
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'keys'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"invalid API keys: {problems}") from None


class Authenticator:
    """Turns the `Authorization: Bearer <key>` header into a Caller, or refuses with 401.

    Without keys, only an explicit `allow_anonymous` lets requests in (a loopback stack
    on a laptop): then every request is one anonymous caller that reaches everything.
    """

    def __init__(
        self,
        *,
        keys_file: str,
        keys_json: str,
        allow_anonymous: bool,
        default_collection: str,
        requests_per_minute: int,
        max_streams: int,
    ) -> None:
        self.keys_file = Path(keys_file) if keys_file else None
        self.keys_json = keys_json
        self.limits = {
            "default_collection": default_collection,
            "requests_per_minute": requests_per_minute,
            "max_streams": max_streams,
        }
        self._stamp: tuple[float, int] | None = None
        self.ring = self._load()
        self.anonymous: Caller | None = None
        configured = self.keys_file is not None or bool(keys_json.strip())
        if len(self.ring) == 0:
            if configured:
                source = (
                    f"the API keys file {str(self.keys_file)!r}"
                    if self.keys_file is not None
                    else "RAGLINE_GATEWAY_API_KEYS"
                )
                raise ValueError(
                    f"no API keys configured: {source} holds no keys (add one with `ragline "
                    "keys new`; RAGLINE_GATEWAY_ALLOW_ANONYMOUS applies only when neither "
                    "RAGLINE_GATEWAY_API_KEYS_FILE nor RAGLINE_GATEWAY_API_KEYS is set)"
                )
            if not allow_anonymous:
                raise ValueError(
                    "no API keys configured: set RAGLINE_GATEWAY_API_KEYS_FILE (or "
                    "RAGLINE_GATEWAY_API_KEYS), or RAGLINE_GATEWAY_ALLOW_ANONYMOUS=true for "
                    "a local stack"
                )
            self.anonymous = Caller(
                key_id="anonymous",
                tenant="local",
                scopes=frozenset({"chat", "admin"}),
                collections=("*",),
                requests_per_minute=requests_per_minute,
                max_streams=max_streams,
                default=default_collection,
                anonymous=True,
            )
            log.warning("no API keys configured: every request is anonymous, with admin rights")
        else:
            log.info("API keys loaded", extra={"keys": len(self.ring)})

    def _load(self) -> KeyRing:
        text = self.keys_json
        if self.keys_file is not None:
            stat = self.keys_file.stat()
            self._stamp = (stat.st_mtime, stat.st_size)
            text = self.keys_file.read_text()
        entries = parse_keys(text) if text.strip() else KeysFile()
        return KeyRing(entries, **self.limits)  # type: ignore[arg-type]

    def reload_if_changed(self) -> bool:
        """Re-reads the keys file when it changed; a broken file keeps the old keys."""
        if self.keys_file is None or self.anonymous is not None:
            return False
        try:
            stat = self.keys_file.stat()
            if (stat.st_mtime, stat.st_size) == self._stamp:
                return False
            self.ring = self._load()
        except (OSError, ValueError) as exc:
            log.error("API keys file not reloaded; the old keys stay", extra={"error": str(exc)})
            return False
        if len(self.ring) == 0:
            log.error("the reloaded API keys file holds no keys: every request is refused")
        else:
            log.info("API keys reloaded", extra={"keys": len(self.ring)})
        return True

    async def watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.reload_if_changed()

    def authenticate(self, authorization: str | None) -> Caller:
        if self.anonymous is not None:
            return self.anonymous
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401, "unauthorized", "an API key is required: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        caller = self.ring.lookup(key.strip())
        if caller is None:
            raise ApiError(
                401, "unauthorized", "the API key is not valid",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )  # fmt: skip
        return caller


def check_trusted_proxies(entries: list[str]) -> list[str]:
    """`trusted_proxies`, checked before the gateway starts (uvicorn would take a malformed
    entry, or a network with host bits set, as a name that no peer has, silently)."""
    for entry in entries:
        try:
            if "/" in entry:
                ipaddress.ip_network(entry)
            else:
                ipaddress.ip_address(entry)
        except ValueError:
            raise ValueError(
                f"trusted_proxies: {entry!r} is not an IP address or network"
            ) from None
    return entries


class FailedAuthThrottle:
    """Slows down key guessing and floods of bad keys, per client address, in memory.

    After `limit` failed authentications in any `window_s`, the client's further calls
    are answered 429 with `Retry-After` before their key is even looked at, whatever key
    they carry, until the oldest failure leaves the window: a client that keeps failing
    gets `limit` tries per window. Other clients are not affected. Per replica (auth never
    depends on Redis): N replicas allow N times the tries. Bounded: the `max_clients`
    most recently failing addresses are remembered.
    """

    def __init__(self, limit: int, window_s: float, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again; None when it may now."""
        recent = self.failures.get(client)
        if not self.limit or recent is None or len(recent) < self.limit:
            return None
        wait = recent[0] + self.window_s - time.monotonic()
        if wait <= 0:
            return None
        return max(1, math.ceil(wait))

    def check(self, client: str) -> None:
        wait = self.retry_after(client)
        if wait is not None:
            metrics.RATE_LIMITED.labels("auth_failures").inc()
            raise ApiError(
                429, "rate_limited",
                "too many failed authentications from this client; retry later",
                headers={"Retry-After": str(wait)},
            )  # fmt: skip

    def failed(self, client: str) -> None:
        if not self.limit:
            return
        now = time.monotonic()
        recent = self.failures.pop(client, None)
        if recent is None:
            recent = deque(maxlen=self.limit)
        while recent and recent[0] <= now - self.window_s:
            recent.popleft()
        recent.append(now)
        self.failures[client] = recent  # most recent last
        while len(self.failures) > self.max_clients:
            self.failures.popitem(last=False)
        if len(recent) == self.limit:
            log.warning(
                "failed authentications from one client; its calls are refused for a while",
                extra={"client": client, "failures": self.limit, "window_s": self.window_s},
            )
