"""A fast stub OpenAI upstream for benchmarks: canned answers, raw ASGI, no framework.

``python bench/stub_upstream.py --port P [--chunks 200] [--interval-ms 0]``. Non-streamed
requests get one canned completion; streamed ones get ``--chunks`` content chunks (one ASGI send
each, as vLLM sends one per token; ``--interval-ms`` apart, as a model paces them, else as fast
as they go), then usage (when asked) and ``[DONE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson

MODEL = "student"
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def _completion() -> bytes:
    content = "<think>\n标题提到球队和比赛，属于体育。\n</think>\n\n体育"
    return orjson.dumps(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50},
        }
    )


def _events(chunks: int, usage: bool) -> list[bytes]:
    head = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    words = ["<think>", "\n"] + ["想"] * max(chunks - 6, 0) + ["\n", "</think>", "\n\n", "体育"]
    words = words[:chunks]
    out = []
    for i, word in enumerate(words):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        out.append({**head, "choices": [choice]})
    out.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        counts = {"prompt_tokens": 30, "completion_tokens": chunks, "total_tokens": 30 + chunks}
        out.append({**head, "choices": [], "usage": counts})
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in out] + [b"data: [DONE]\n\n"]


class Stub:
    def __init__(self, chunks: int, interval: float = 0.0) -> None:
        self.interval = interval  # seconds between stream chunks: a model's pace
        self.completion = _completion()
        self.stream_plain = _events(chunks, usage=False)
        self.stream_usage = _events(chunks, usage=True)
        self.models = orjson.dumps(
            {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "stub"}]}
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"].endswith("/models"):
            return await self._json(send, self.models)
        if scope["path"] == "/health":
            return await self._json(send, b"{}")
        request = orjson.loads(body) if body else {}
        if not request.get("stream"):
            return await self._json(send, self.completion)
        options = request.get("stream_options") or {}
        events = self.stream_usage if options.get("include_usage") else self.stream_plain
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
            if self.interval:
                await asyncio.sleep(self.interval)
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _json(send, body: bytes) -> None:
        headers = [_JSON, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument(
        "--interval-ms", type=float, default=0.0, help="pause between stream chunks"
    )
    args = parser.parse_args()
    uvicorn.run(
        Stub(args.chunks, args.interval_ms / 1e3),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
