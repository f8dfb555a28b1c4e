"""Server-sent event responses that a client cannot stall.

A streamed answer is read from the device only as fast as the client takes it: while a
send waits for the client's socket to drain, the job's attempt — and its device slot —
waits too. A client that stops reading without closing its connection would hold that
device for as long as it liked. ``PacedStreamingResponse`` drops such a client once one
send has waited ``stall_timeout_s``: the body is closed, which cancels the job on its
device (uncharged unless the answer was already complete), and the connection is closed.

It also watches for the client going away, as Starlette's ``StreamingResponse`` does,
with one plain task instead of a task group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("swarmgate.api")


class PacedStreamingResponse(StreamingResponse):
    def __init__(self, content: Any, *, stall_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.stall_timeout_s = stall_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        sending_since: float | None = None
        stalled = False
        check_every = self.stall_timeout_s / 4

        async def paced(message: Message) -> None:
            nonlocal sending_since
            sending_since = loop.time()
            await send(message)
            sending_since = None

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streamer = loop.create_task(self.stream_response(paced))
        listener = loop.create_task(listen())
        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal timer, stalled
            if sending_since is not None and loop.time() - sending_since >= self.stall_timeout_s:
                stalled = True
                streamer.cancel()
                return
            timer = loop.call_later(check_every, check)

        timer = loop.call_later(check_every, check)
        try:
            await asyncio.wait((streamer, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if timer is not None:
                timer.cancel()
            listener.cancel()
            if not streamer.done():
                streamer.cancel()  # the client went away, or this request was cancelled
            with contextlib.suppress(asyncio.CancelledError):
                await streamer
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()  # ends the job if it still runs: the device is told to stop
        if stalled:
            log.warning(
                "a client read nothing for %.0f s; its stream was dropped", self.stall_timeout_s
            )
        elif not listener.done() and self.background is not None:
            await self.background()
