"""The gateway's settings (`flywheel serve`, README: Gateway): part of the one configuration
object (lib/config.py re-exports them)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class UpstreamConfig(BaseModel):
    """The gateway's upstream backend: an OpenAI-compatible server that serves every registry
    version under its own model name (an inference server started with LoRA support)."""

    base_url: str | None = None  # e.g. http://127.0.0.1:8001/v1; None: the embedded backend
    api_key: str | None = None
    model_name: str = "{version}"  # the upstream model name of a registry version
    timeout_s: float = Field(60.0, gt=0)


class GatewayConfig(BaseModel):
    """`flywheel serve`: the OpenAI-compatible door for real agents (README: Gateway)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(1_000_000, ge=1024)  # 413 past it
    rate_limit_per_minute: float = Field(600.0, gt=0)  # per API key; 429 past it (burst = one minute's worth / 6)
    request_timeout_s: float = Field(120.0, gt=0)  # 504 past it
    max_tokens: int = Field(256, ge=1)  # the largest max_tokens a request may ask for; also the default
    # the embedded backend: one model per version, at most this many loaded (least recently used leaves)
    max_loaded_models: int = Field(3, ge=1)
    batch_window_ms: float = Field(10.0, ge=0)  # how long a batch waits for more requests after its first
    max_batch_size: int = Field(32, ge=1)
    conversation_idle_s: float = Field(600.0, gt=0)  # a conversation left on a tool call lands after this
    flush_interval_s: float = Field(2.0, gt=0)  # finished conversations and events go to the landing zone
    do_not_log: list[str] = Field(default_factory=list)  # tenants served, nothing of their traffic written
    # honour the x-flywheel-time header (the moment of a call): only for demo mode's simulated users,
    # who live on the flywheel clock; a real client's calls are stamped with the gateway's own clock
    trust_client_time: bool = False
    router_refresh_s: float = Field(5.0, gt=0)  # how long a snapshot of the registry's routing is used
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    source: str = "gateway"  # the landing files' name prefix
