"""An ASGI middleware around every request: a cap on the body size (413 before the app sees the body), a deadline
(504), and metrics (count, status, latency by route template). Pure ASGI, so it adds no per-request thread hop."""

from __future__ import annotations

import asyncio
import json
import time

from .metrics import Metrics

_BODY_METHODS = {"POST", "PUT", "PATCH"}


async def _send_json(send, status: int, detail: str, *, close: bool = False) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, *, metrics: Metrics, max_body: int, deadline_s: float):
        self.app, self.metrics, self.max_body, self.deadline_s = app, metrics, int(max_body), float(deadline_s)

    async def _read_body(self, receive) -> tuple[list[dict], bool]:
        """The request's body messages, or ``too_big`` once it passes the cap (the rest is read and dropped up to a
        few times the cap, so the client can still read the 413 instead of a reset connection)."""
        messages, size, too_big = [], 0, False
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                messages.append(msg)
                return messages, too_big
            size += len(msg.get("body", b""))
            if not too_big:
                if size > self.max_body:
                    too_big, messages = True, []
                else:
                    messages.append(msg)
            if not msg.get("more_body", False) or size > 4 * self.max_body:
                return messages, too_big

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = {"status": 500, "started": False}

        async def send_tracked(msg):
            if msg["type"] == "http.response.start":
                state["status"], state["started"] = msg["status"], True
            await send(msg)

        try:
            if scope.get("method") in _BODY_METHODS:
                length = dict(scope.get("headers") or []).get(b"content-length")
                limit_mb = self.max_body / 2**20
                if length is not None and (not length.isdigit() or int(length) > self.max_body):
                    if not length.isdigit():
                        return await _send_json(send_tracked, 400, "bad Content-Length header", close=True)
                    await self._read_body(receive)
                    return await _send_json(send_tracked, 413, f"the upload is {int(length) / 2**20:.1f} MB, over "
                                            f"the {limit_mb:g} MB limit (--max-upload-mb)", close=True)
                messages, too_big = await self._read_body(receive)
                if too_big:
                    return await _send_json(send_tracked, 413, f"the upload is over the {limit_mb:g} MB limit "
                                            "(--max-upload-mb)", close=True)
                replay = iter(messages)

                async def receive_replayed():
                    try:
                        return next(replay)
                    except StopIteration:
                        return await receive()  # after the body: wait for the disconnect as usual
                receive = receive_replayed
            try:
                await asyncio.wait_for(self.app(scope, receive, send_tracked), self.deadline_s)
            except asyncio.TimeoutError:
                if not state["started"]:
                    await _send_json(send_tracked, 504, f"the request took longer than {self.deadline_s:g} s")
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("unmatched" if state["status"] == 404 else "other")
            self.metrics.observe_request(label, scope.get("method", "?"), state["status"], time.perf_counter() - t0)
