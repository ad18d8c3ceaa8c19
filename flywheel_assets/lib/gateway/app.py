"""The OpenAI-compatible HTTP API over `Gateway`, on Starlette + uvicorn.

Why Starlette and uvicorn: both are what dagster-webserver already runs on, so the gateway
adds no server dependency and no second version of one; Starlette is a small, well-kept
ASGI toolkit (streaming responses for server-sent events, lifespan, a test client), and
the API is four routes whose validation is written out below, so FastAPI would add
a layer without removing code.

    POST /v1/chat/completions   messages, tools, tool_choice, temperature, max_tokens, user, stream
    GET  /v1/models             the versions that serve traffic now
    POST /v1/feedback           accepted | retry | edited | error | thumbs_up | thumbs_down | rating
    GET  /healthz               no key needed

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for any
malformed request, 401 without a live key, 404 for feedback on an unknown trajectory,
413 past `max_body_bytes`, 429 past the key's rate, 502 when the upstream fails, 503
when the journal cannot write, 504 past `request_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from datetime import datetime, timezone

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flywheel_assets.lib.gateway.backends import BackendError
from flywheel_assets.lib.gateway.service import Gateway, GatewayError

log = logging.getLogger("flywheel.gateway")
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required")


def create_app(gateway: Gateway) -> Starlette:
    stop = threading.Event()

    def lander() -> None:
        while not stop.wait(gateway.settings.flush_interval_s):
            try:
                gateway.flush()
            except Exception:  # noqa: BLE001 — logged, and retried at the next interval
                log.exception("landing failed; the journal keeps everything, retrying")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=lander, name="gateway-lander", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)
            await asyncio.to_thread(gateway.close)

    async def chat_completions(request: Request) -> Response:
        tenant = gateway.tenant(request.headers.get("authorization"), admit=True)
        body = await _json_body(request, gateway.settings.max_body_bytes)
        args = _chat_arguments(body, gateway.settings.max_tokens)
        user = args.pop("user") or request.headers.get("x-flywheel-user")
        served = await gateway.chat(tenant, user or "anonymous", session_hint=request.headers.get("x-flywheel-session"),
                                    task_type=request.headers.get("x-flywheel-task-type") or "chat",
                                    at=_client_time(request, gateway), user_named=bool(user), **args)
        headers = {"x-flywheel-model-version": served.version}
        if served.trajectory_id:
            headers |= {"x-flywheel-trajectory-id": served.trajectory_id, "x-flywheel-session-id": served.session_id}
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage")) \
                if isinstance(body.get("stream_options"), dict) else False
            return StreamingResponse(_chunks(completion_id, created, served, usage), media_type="text/event-stream",
                                     headers=headers | {"cache-control": "no-cache"})
        c = served.completion
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": served.version,
            "choices": [{"index": 0, "message": served.answer, "finish_reason": c.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                      "total_tokens": c.prompt_tokens + c.completion_tokens},
        }, headers=headers)

    async def models(request: Request) -> Response:
        tenant = gateway.tenant(request.headers.get("authorization"))
        live = await asyncio.to_thread(gateway.live_versions, tenant)
        return JSONResponse({"object": "list", "data": [
            {"id": r["version"], "object": "model", "created": int(r["changed_at"].timestamp()),
             "owned_by": "flywheel", "status": r["status"], "traffic_share": r["traffic_share"]} for r in live]})

    async def feedback(request: Request) -> Response:
        tenant = gateway.tenant(request.headers.get("authorization"), admit=True)
        body = await _json_body(request, gateway.settings.max_body_bytes)
        return JSONResponse(await gateway.feedback(tenant, body, _client_time(request, gateway)))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "backend": gateway.backend.name, "open_conversations":
                             len(gateway.tracker.open()), "landed": gateway.landed, "recovered": gateway.recovered})

    async def on_gateway_error(request: Request, error: GatewayError) -> Response:
        return _error(error.status, error.message, error.kind, error.param)

    async def on_backend_error(request: Request, error: BackendError) -> Response:
        return _error(502, str(error), "upstream_error")

    async def on_unexpected(request: Request, error: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path, exc_info=error)
        return _error(500, f"internal error: {type(error).__name__}: {error}", "server_error")

    return Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/feedback", feedback, methods=["POST"]),
                Route("/healthz", healthz, methods=["GET"])],
        exception_handlers={GatewayError: on_gateway_error, BackendError: on_backend_error,
                            404: lambda r, e: _error(404, f"no route {r.method} {r.url.path}", "not_found_error"),
                            405: lambda r, e: _error(405, f"{r.method} is not allowed on {r.url.path}",
                                                     "invalid_request_error"),
                            Exception: on_unexpected},
        lifespan=lifespan)


def _client_time(request: Request, gateway: Gateway) -> float | None:
    """`x-flywheel-time` (ISO 8601), where `gateway.trust_client_time` allows it: demo mode's
    simulated users live on the flywheel clock, days ahead of the wall clock. Else now."""
    value = request.headers.get("x-flywheel-time")
    if value is None or not gateway.settings.trust_client_time:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise GatewayError(400, f"x-flywheel-time must be ISO 8601, got {value!r}", param="x-flywheel-time") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


async def _json_body(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise GatewayError(413, f"request body over the limit of {limit} bytes", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"request body over the limit of {limit} bytes", "request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_no_constant)
        # lone surrogates (valid JSON escapes, invalid text) would fail later, in the journal
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError, RecursionError) as error:
        raise GatewayError(400, f"the body is not valid JSON text ({type(error).__name__})") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the body must be a JSON object")
    # null is as good as absent, as in OpenAI's API
    return {name: value for name, value in body.items() if value is not None}


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _chat_arguments(body: dict, max_tokens_cap: int) -> dict:
    """The validated arguments of a chat call: every malformed field is a 400 naming it."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "messages must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise GatewayError(400, f"messages[{index}] must be an object with role in {ROLES}", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # text parts are joined: the models here read text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise GatewayError(400, f"messages[{index}].content: only text parts are served", param="messages")
            messages[index] = message = {**message, "content": "".join(p["text"] for p in content)}
        elif content is not None and not isinstance(content, str):
            raise GatewayError(400, f"messages[{index}].content must be a string, a list of text parts or null",
                               param="messages")
        calls = message.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in calls)):
            raise GatewayError(400, f"messages[{index}].tool_calls must be a list of function calls",
                               param="messages")
    if messages[-1]["role"] == "assistant":
        raise GatewayError(400, "the last message is the assistant's: nothing to answer", param="messages")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise GatewayError(400, "tools must be a list of {type: function, function: {name, parameters}}",
                           param="tools")
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and tool_choice not in TOOL_CHOICES and not (
            isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict)):
        raise GatewayError(400, f"tool_choice must be one of {TOOL_CHOICES} or a named function",
                           param="tool_choice")
    temperature = body.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise GatewayError(400, "temperature must be a number from 0 to 2", param="temperature")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", max_tokens_cap))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_cap:
        raise GatewayError(400, f"max_tokens must be an integer from 1 to {max_tokens_cap} (gateway.max_tokens)",
                           param="max_tokens")
    if body.get("n", 1) != 1:
        raise GatewayError(400, "only n = 1 is served", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise GatewayError(400, "stream must be true or false", param="stream")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not user):
        raise GatewayError(400, "user must be a non-empty string", param="user")
    return {"messages": messages, "tools": None if tool_choice == "none" else tools, "tool_choice": tool_choice,
            "max_tokens": max_tokens, "temperature": float(temperature), "user": user}


async def _chunks(completion_id: str, created: int, served, include_usage: bool = False):
    """The answer as OpenAI's chat.completion.chunk events. The whole turn is generated (and
    journalled) before the first byte: batched generation has no per-token stream."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                      "model": served.version, "choices": [
                                          {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]},
                                     ensure_ascii=False) + "\n\n"

    c = served.completion
    yield chunk({"role": "assistant", "content": ""})
    if c.content:
        for start in range(0, len(c.content), 64):
            yield chunk({"content": c.content[start:start + 64]})
    for index, call in enumerate(c.tool_calls):
        yield chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                     "function": {"name": call["function"]["name"], "arguments": ""}}]})
        yield chunk({"tool_calls": [{"index": index, "function": {"arguments": call["function"]["arguments"]}}]})
    yield chunk({}, c.finish_reason)
    if include_usage:  # stream_options.include_usage: a last chunk with no choices and the usage
        yield "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                     "model": served.version, "choices": [], "usage": {
                                         "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                                         "total_tokens": c.prompt_tokens + c.completion_tokens}}) + "\n\n"
    yield "data: [DONE]\n\n"
