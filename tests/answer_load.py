"""Answers asked from many threads at once, for the tests that kill something under load
(test_chaos, test_gateway_retriever_replicas, test_retriever_replicas): what each caller
got, as an `Outcome`, with the time it ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import httpx
import orjson


@dataclass(frozen=True)
class Outcome:
    """What a caller got: an HTTP status (0: no connection), and how it ended."""

    status: int
    end: str  # done | error:<code> | <error code of a non-200> | cut | refused
    degraded: tuple[str, ...] = ()

    @property
    def server_error(self) -> bool:
        return self.status >= 500 and self.status != 503


WHOLE = Outcome(200, "done")


def error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "not-the-envelope"


def native_chat(client: httpx.Client, question: str) -> Outcome:
    """One `/api/chat` answer, read to its end (`client` has the base URL)."""
    with client.stream("POST", "/api/chat", json={"message": question}) as response:
        if response.status_code != 200:
            response.read()
            return Outcome(response.status_code, error_code(response))
        name, last = "", None
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:") and name in ("done", "error"):
                last = (name, orjson.loads(line[5:]))
        if last is None:
            return Outcome(200, "cut")
        if last[0] == "error":
            return Outcome(200, f"error:{last[1]['code']}")
        return Outcome(200, "done", tuple(last[1]["degraded"]))


def guarded(call: Callable[[], Outcome]) -> Outcome:
    """A call whose connection failures are outcomes too."""
    try:
        return call()
    except httpx.ConnectError:
        return Outcome(0, "refused")
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        return Outcome(0, "cut")


# (client, caller index, call number) -> what that call got
Ask = Callable[[httpx.Client, int, int], Outcome]


class BackgroundLoad:
    """`callers` threads, each asking one answer after another until stopped (or for
    `limit_s`, whatever happens); `outcomes` holds (end time, outcome) of every call. A
    caller refused pauses 0.1 s before the next, as a client would back off."""

    def __init__(
        self, url: str, callers: int, ask: Ask, limit_s: float = 300, timeout: float = 120
    ) -> None:
        self.url, self.ask, self.limit_s, self.timeout = url, ask, limit_s, timeout
        self.outcomes: list[tuple[float, Outcome]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(callers)]

    def _run(self, i: int) -> None:
        deadline = time.monotonic() + self.limit_s
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            n = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                outcome = guarded(partial(self.ask, client, i, n))
                self.outcomes.append((time.monotonic(), outcome))
                n += 1
                if outcome != WHOLE:
                    self._stop.wait(0.1)

    def since(self, moment: float) -> int:
        return sum(t > moment for t, _ in list(self.outcomes))

    def __enter__(self) -> BackgroundLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 60)
