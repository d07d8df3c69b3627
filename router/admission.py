"""Admission control: how many requests the router takes on at once, and how many may wait.

At most `max_running` requests are in the engine at once (running in the batch, or queued for
its next step); at most `max_waiting` more wait for one of those places, first come first
served. A request beyond that is refused at once with `Overloaded`, before any work is spent on
it, so that an overloaded router answers quickly instead of growing memory and latency. No gRPC
and no torch here; one event loop uses it.

    ticket = admission.enter()   # Overloaded when every place and every waiting place is taken
    try:
        ...                      # check and tokenize the request meanwhile
        await ticket.admitted()  # a place in the engine (cancel the task to stop waiting)
        ...                      # run it
    finally:
        ticket.leave()           # gives the place to the next waiting request
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Overloaded(Exception):
    """Every place and every waiting place is taken; the message names the limits."""


class Ticket:
    """One request's claim: admitted at once, or waiting in line (see `Admission.enter`)."""

    def __init__(self, admission: Admission, future: asyncio.Future) -> None:
        self._admission = admission
        self._future = future  # done with None once this request holds a place
        self._left = False

    async def admitted(self) -> None:
        """Returns once the request holds a place in the engine."""
        await self._future

    @property
    def holds_place(self) -> bool:
        return self._future.done() and not self._future.cancelled()

    def leave(self) -> None:
        """Gives the place back, or the waiting place; idempotent."""
        if self._left:
            return
        self._left = True
        if self.holds_place:
            self._admission._release()
        else:
            self._future.cancel()
            self._admission._drop(self._future)


class Admission:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError(
                f"need max_running >= 1 and max_waiting >= 0, got {max_running}, {max_waiting}"
            )
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0  # requests holding a place
        self._waiting: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for a place."""
        return len(self._waiting)

    def enter(self) -> Ticket:
        """A ticket holding a place now or waiting in line; Overloaded when both are full."""
        future = asyncio.get_running_loop().create_future()
        if self.running < self.max_running and not self._waiting:
            self.running += 1
            future.set_result(None)
        elif len(self._waiting) < self.max_waiting:
            self._waiting.append(future)
        else:
            raise Overloaded(
                f"the router is at capacity: {self.running} requests running and "
                f"{len(self._waiting)} waiting (--max-concurrent-requests {self.max_running}, "
                f"--max-waiting {self.max_waiting}); retry later"
            )
        return Ticket(self, future)

    def _release(self) -> None:
        while self._waiting:  # hand the place over to the first one still waiting
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.running -= 1

    def _drop(self, future: asyncio.Future) -> None:
        with contextlib.suppress(ValueError):  # not there: handed a place and released since
            self._waiting.remove(future)
