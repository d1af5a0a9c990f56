"""Step 1 of the pipeline: who is asking, and whether they may have one more answer now.

Order of the checks, cheapest and least unfair first:
0. a client with too many failed authentications lately (429 + Retry-After, in memory,
   per client address: auth.FailedAuthThrottle), whatever key it sends now;
1. the API key (401), then the key's calls per minute (429 + Retry-After, Redis: every
   authenticated call counts, reads such as `GET /v1/models` and `/api/jobs` too, so no
   route is unlimited; limits.py), then its scope and collection (403);
2. draining (503): a replica shutting down takes no new streams;
3. this replica's bound on in-flight streams (503 + Retry-After at once, never an
   unbounded queue): checked before the per-key limits so that a request we refuse for
   our own overload is not charged to the key's rate;
4. the key's rate and concurrent-stream limits in Redis (429 + Retry-After).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ragline_common.errors import ApiError
from ragline_common.logs import tenant_var
from ragline_gateway.auth import Authenticator, Caller, FailedAuthThrottle, Scope
from ragline_gateway.limits import Lease, Limiter
from ragline_gateway.metrics import ACTIVE_STREAMS


class Ticket:
    """Held for the life of one answer; `release` is idempotent."""

    def __init__(self, admission: Admission, lease: Lease | None) -> None:
        self.admission = admission
        self.lease = lease
        self.released = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.admission.inflight -= 1
        ACTIVE_STREAMS.dec()
        if self.lease is not None:
            await self.admission.limiter.release(self.lease)


class Admission:
    def __init__(
        self,
        auth: Authenticator,
        limiter: Limiter,
        max_inflight: int,
        app_state: Any,
        *,
        throttle: FailedAuthThrottle | None = None,
        call_rate_multiplier: int = 0,
    ) -> None:
        self.auth = auth
        self.limiter = limiter
        self.max_inflight = max_inflight
        self.inflight = 0
        self.app_state = app_state  # `draining` is set there on SIGTERM (ragline_common.service)
        self.throttle = throttle or FailedAuthThrottle(0, 60.0)
        self.call_rate_multiplier = call_rate_multiplier

    @staticmethod
    def client(request: Request) -> str:
        """The client's address: the peer, or the one a trusted proxy names in
        X-Forwarded-For (uvicorn resolves it with the TRUSTED_PROXIES setting; auth.py),
        cut to the length of an IPv6 address: whatever it is, it is a key in memory."""
        return request.client.host[:45] if request.client else "unknown"

    def authenticate(self, request: Request) -> Caller:
        """The key's caller, or 401; a client that failed too often lately gets 429."""
        if self.auth.anonymous is not None:
            return self.auth.anonymous
        client = self.client(request)
        self.throttle.check(client)
        try:
            return self.auth.authenticate(request.headers.get("authorization"))
        except ApiError:
            self.throttle.failed(client)
            raise

    async def caller(self, request: Request, scope: Scope) -> Caller:
        caller = self.authenticate(request)
        tenant_var.set(caller.tenant)
        await self.limiter.acquire_call(
            caller, caller.requests_per_minute * self.call_rate_multiplier
        )
        caller.require(scope)
        return caller

    async def admit_stream(self, caller: Caller) -> Ticket:
        if getattr(self.app_state, "draining", False):
            raise ApiError(
                503, "shutting_down", "this gateway replica is shutting down; retry",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        if self.inflight >= self.max_inflight:
            raise ApiError(
                503, "overloaded", "this gateway replica is at its stream limit; retry shortly",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        self.inflight += 1
        ACTIVE_STREAMS.inc()
        ticket = Ticket(self, None)
        try:
            ticket.lease = await self.limiter.acquire(caller, stream=True)
        except BaseException:
            await ticket.release()
            raise
        return ticket

    async def admit_request(self, caller: Caller) -> None:
        """A request that is not an answer stream (document management): rate only."""
        await self.limiter.acquire(caller, stream=False)


# Declared so that the OpenAPI document names the scheme; the check itself is ours.
_bearer = HTTPBearer(auto_error=False, description="ragline API key")


async def chat_caller(
    request: Request, _: HTTPAuthorizationCredentials | None = Security(_bearer)
) -> Caller:
    """A dependency, so that a request without a key gets 401 before its body is judged."""
    admission: Admission = request.app.state.admission
    return await admission.caller(request, "chat")


async def admin_caller(
    request: Request, _: HTTPAuthorizationCredentials | None = Security(_bearer)
) -> Caller:
    admission: Admission = request.app.state.admission
    caller = await admission.caller(request, "admin")
    await admission.admit_request(caller)
    return caller


async def admin_reader(
    request: Request, _: HTTPAuthorizationCredentials | None = Security(_bearer)
) -> Caller:
    """A cheap admin read (a job's progress, the job and collection lists): charged only
    to the key's calls per minute, not to its requests per minute, or a client polling
    its own ingest would use up the rate its questions need (`ragline ingest` of 2,000
    documents had the same key's chat at 429 within 20 s)."""
    admission: Admission = request.app.state.admission
    return await admission.caller(request, "admin")
