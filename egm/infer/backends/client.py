"""Async client for an OpenAI-compatible chat server, with the paper's request and concurrency.

The request (EGM.md section 3): one user turn, no system prompt; the content is the image as a
base64 data URL with detail "high", then the text. Decoding: temperature, top_p, top_k,
repetition_penalty, presence_penalty and max_tokens from the config (greedy in the paper). At most
`concurrency` requests are in flight (64 in the paper); each request's latency is the wall time
from sending it until its full answer is back (queueing on the server included), and its token
count is the server's `usage.completion_tokens`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes
import time
from collections.abc import Callable
from dataclasses import dataclass

from egm.infer.base import Completion, Request
from egm.options import SamplingOptions

log = logging.getLogger(__name__)

# Sampling fields that vLLM and SGLang accept beside the OpenAI ones (the OpenAI client sends them
# through `extra_body`, which lands at the top level of the JSON body, as here).
EXTENSION_FIELDS = ("top_k", "repetition_penalty")
# Their neutral values: a server without the extensions may only drop a field at this value.
NEUTRAL = {"top_k": (None, 0, -1), "repetition_penalty": (1.0,)}


class ServerError(RuntimeError):
    """A request failed; the message says why and what happened to the run's finished requests."""


class ServerDied(ServerError):
    """The server process is gone (or stopped answering) in the middle of a run."""


def image_data_url(path: str) -> str:
    """The image file's own bytes as a base64 data URL (no re-encoding: the server sees the file).

    The authors label every image `image/jpeg` (sglang_infer.py line 15); for the COCO images,
    all JPEG, the URL is byte for byte theirs. Other files get their own type: both servers
    decode the bytes whatever the label says, and a label that names the true type misleads none."""
    with open(path, "rb") as handle:
        data = handle.read()
    mime = _sniff_mime(data) or mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _sniff_mime(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def chat_messages(image_url: str, prompt: str, assistant_prefix: str = "") -> list[dict]:
    """One user turn, no system prompt: the image (detail "high"), then the text; with an
    `assistant_prefix`, a final assistant message holding it, for the server to continue."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url, "detail": "high"}},
                {"type": "text", "text": prompt},
            ],
        }
    ]
    if assistant_prefix:
        messages.append({"role": "assistant", "content": assistant_prefix})
    return messages


def sampling_fields(sampling: SamplingOptions, extensions: bool = True) -> dict:
    """The decoding part of the request body.

    `extensions=False` is for servers that reject vLLM/SGLang's top_k and repetition_penalty
    (`transformers serve`); they are dropped only where their value changes nothing (greedy
    decoding ignores top_k; a repetition penalty of 1 is none), else this is an error.
    """
    fields = {
        "max_tokens": int(sampling.max_tokens),
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "presence_penalty": float(sampling.presence_penalty),
        "top_k": int(sampling.top_k) if sampling.top_k is not None else None,
        "repetition_penalty": float(sampling.repetition_penalty),
    }
    seed = sampling.extra.get("seed")
    if seed is not None:
        fields["seed"] = int(seed)
    if fields["top_k"] is None:
        del fields["top_k"]
    if not extensions:
        for name in EXTENSION_FIELDS:
            if name not in fields:
                continue
            value = fields.pop(name)
            ignorable = value in NEUTRAL[name] or (name == "top_k" and sampling.temperature == 0)
            if not ignorable:
                raise ValueError(f"this server does not accept {name}; {name}={value} would be silently lost")
    return fields


def request_body(model: str, image_url: str, prompt: str, sampling: SamplingOptions, extensions: bool = True,
                 assistant_prefix: str = "", max_tokens: int | None = None, stop: tuple[str, ...] = ()) -> dict:
    """The chat request. An `assistant_prefix` goes as a final assistant message that the server
    continues (vLLM's and SGLang's `continue_final_message`, without a new generation prompt);
    `stop` strings are kept at the end of the answer (vLLM: include_stop_str_in_output, SGLang:
    no_stop_trim; each server ignores the other's field)."""
    # The authors' request (sglang_infer.py lines 101-117): these fields and no others; the
    # OpenAI client they used sends no `stream` key, and neither do we.
    body = {"model": model, "messages": chat_messages(image_url, prompt, assistant_prefix),
            **sampling_fields(sampling, extensions)}
    if max_tokens is not None:
        body["max_tokens"] = int(max_tokens)
    if assistant_prefix:
        if not extensions:
            raise ValueError("this server cannot continue an assistant message (continue_final_message is a "
                             "vLLM/SGLang extension)")
        body.update(continue_final_message=True, add_generation_prompt=False)
    if stop:
        body["stop"] = list(stop)
        if extensions:
            body.update(include_stop_str_in_output=True, no_stop_trim=True)
    return body


def answer_text(message: dict) -> str:
    """The whole answer, reasoning included (the paper parses both).

    vLLM and SGLang started without a reasoning parser (as here) return everything in `content`.
    Servers that split a Qwen3 thinking block off into `reasoning_content` (or `reasoning`) get it
    rejoined in the model's own layout: `{reasoning}\\n</think>\\n\\n{answer}`.
    """
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    if not reasoning:
        return content
    if not content:
        return reasoning  # the model never closed its reasoning
    return f"{reasoning}\n</think>\n\n{content}"


@dataclass
class RunStats:
    wall_s: float
    finished: int
    max_in_flight: int


class OpenAIChatClient:
    """Sends requests to `{base_url}/chat/completions` with at most `concurrency` in flight.

    `health()` (optional) returns None while the server is fine, else a sentence saying what
    happened to it (the managed server returns its exit code and log path).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        sampling: SamplingOptions,
        concurrency: int = 64,
        timeout_s: float = 3600.0,
        extensions: bool = True,
        api_key: str | None = None,
        health: Callable[[], str | None] | None = None,
        transport=None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.sampling = sampling
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.extensions = extensions
        self.api_key = api_key
        self.health = health or (lambda: None)
        self.transport = transport
        sampling_fields(sampling, extensions)  # refuse a setting this server would drop, now

    def run(self, requests: list[Request], on_done: Callable[[int, Completion], None], concurrency: int | None = None) -> RunStats:
        """Answer every request; `on_done(index, completion)` is called as each one finishes.

        On the first failure the requests still in flight are cancelled and ServerError (or
        ServerDied) is raised; everything handed to `on_done` before that stays handed over.
        """
        return asyncio.run(self._run(requests, on_done, concurrency or self.concurrency))

    async def _run(self, requests, on_done, concurrency: int) -> RunStats:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        timeout = httpx.Timeout(self.timeout_s, connect=30.0)
        kwargs = {"transport": self.transport} if self.transport is not None else {}
        state = {"in_flight": 0, "max_in_flight": 0, "finished": 0}
        queue: asyncio.Queue = asyncio.Queue()
        for item in enumerate(requests):
            queue.put_nowait(item)
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits, timeout=timeout, **kwargs) as client:

            async def worker():
                while True:
                    try:
                        index, req = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    completion = await self._one(client, req, state)
                    state["finished"] += 1
                    on_done(index, completion)

            tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(requests)))]
            try:
                done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                failed = [t for t in done if t.exception() is not None]
                if failed:
                    raise failed[0].exception()
            except BaseException as err:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if isinstance(err, ServerError):
                    raise type(err)(
                        f"{err} ({state['finished']} of {len(requests)} requests had finished and were kept)"
                    ) from err
                raise
        return RunStats(wall_s=time.perf_counter() - t0, finished=state["finished"], max_in_flight=state["max_in_flight"])

    async def _one(self, client, req: Request, state: dict) -> Completion:
        import httpx

        body = request_body(self.model, image_data_url(req.image_path), req.prompt, self.sampling, self.extensions,
                            assistant_prefix=req.assistant_prefix, max_tokens=req.max_tokens, stop=tuple(req.stop))
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        t0 = time.perf_counter()
        try:
            response = await client.post("/chat/completions", json=body)
            latency = time.perf_counter() - t0
        except httpx.TransportError as err:
            reason = self.health()
            if reason:
                raise ServerDied(f"request {req.id}: the server went away: {reason}") from err
            raise ServerError(f"request {req.id}: {type(err).__name__}: {err or 'connection failed'} ({self.base_url})") from err
        finally:
            state["in_flight"] -= 1
        if response.status_code != 200:
            reason = self.health()
            if reason:
                raise ServerDied(f"request {req.id}: HTTP {response.status_code}; the server went away: {reason}")
            raise ServerError(f"request {req.id}: HTTP {response.status_code} from {self.base_url}: {response.text[:500]}")
        payload = response.json()
        try:
            message = payload["choices"][0]["message"]
            tokens = int(payload["usage"]["completion_tokens"])
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ServerError(f"request {req.id}: unexpected response (no message or usage): {str(payload)[:500]}") from err
        return Completion(text=answer_text(message), completion_tokens=tokens, latency_s=latency)
