"""The gateway's state and rules, apart from HTTP: keys, limits, routing, the tracker, the
journal, the backend, and landing. `app.py` maps it onto the OpenAI API."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from difflib import SequenceMatcher

from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.experiments.registry import ModelRegistry, RegistryError
from flywheel_assets.lib.gateway.backends import Completion, make_backend
from flywheel_assets.lib.gateway.conversations import Tracker, event_record, once_id
from flywheel_assets.lib.gateway.journal import Journal
from flywheel_assets.lib.gateway.keys import KeyStore, digest
from flywheel_assets.lib.lake import Lake

# /v1/feedback types → (event type, one per trajectory?). accepted/retry/error are facts about
# an answer: sent twice they count once. Thumbs and ratings keep their latest value.
EDIT_LIMIT = 20_000  # characters of edited_text: the edit ratio is a quadratic comparison
FEEDBACK = {
    "accepted": ("output_accepted", True),
    "retry": ("retry_requested", True),
    "error": ("error_reported", True),
    "edited": ("output_edited", False),
    "thumbs_up": ("thumbs_up", False),  # a user may change their mind: the latest counts
    "thumbs_down": ("thumbs_down", False),
    "rating": ("rating", False),
    "continued": ("session_continued", True),  # the user went on (the gateway also sees it in a re-sent conversation)
}


class GatewayError(Exception):
    """An OpenAI-style error: HTTP status, type, message."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass
class Served:
    completion: Completion
    version: str
    trajectory_id: str | None  # None for a do_not_log tenant
    session_id: str | None
    answer: dict


class Gateway:
    def __init__(self, config: FlywheelConfig, backend=None, clock=time.time):
        self.config, self.settings, self.clock = config, config.gateway, clock
        folder = config.home / "gateway"
        self.keys = KeyStore(folder / "keys.json")
        self.tracker = Tracker(self.settings.conversation_idle_s, clock)
        self.journal = Journal(folder / "journal", config.home, self.settings.source)
        self.backend = backend or make_backend(config.home, self.settings)
        self.registry = ModelRegistry(Lake(config), tenancy=config.tenancy)
        self._routing: tuple[float, object, dict[str, dict]] | None = None
        self._routing_lock = threading.Lock()
        self._events: list[dict] = []
        self._events_lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._flush_lock = threading.Lock()
        self.landed = {"trajectories": 0, "events": 0, "files": 0}
        self.recovered = self._recover()

    # -- who, how much

    def tenant(self, authorization: str | None, admit: bool = False) -> str:
        """The tenant of the call's key (401 without a live one); with `admit`, also counted
        against the key's rate (429 past it)."""
        key = authorization[7:].strip() if authorization and authorization[:7].lower() == "bearer " else None
        tenant = self.keys.tenant_of(key)
        if tenant is None:
            raise GatewayError(401, "missing or invalid API key: send `Authorization: Bearer fw-…` "
                               "(create one with `flywheel keys create --tenant NAME`)",
                               "authentication_error")
        if admit:
            self._admit(digest(key))
        return tenant

    def _admit(self, key_digest: str) -> None:
        """A token bucket per key (by its hash: however the header is spelt, one bucket; only
        live keys get one): rate_limit_per_minute, bursts of a sixth of it."""
        rate = self.settings.rate_limit_per_minute / 60.0
        burst = max(1.0, self.settings.rate_limit_per_minute / 6.0)
        now = time.monotonic()
        tokens, at = self._buckets.get(key_digest, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[key_digest] = (tokens, now)
            raise GatewayError(429, f"rate limit of {self.settings.rate_limit_per_minute:g} requests a minute "
                               "for this key reached; retry shortly", "rate_limit_error")
        self._buckets[key_digest] = (tokens - 1.0, now)

    def logged(self, tenant: str) -> bool:
        return tenant not in self.settings.do_not_log

    # -- routing

    def routing(self) -> tuple[object, dict[str, dict]]:
        """(route(user, tenant), live registry rows by version), refreshed every router_refresh_s."""
        with self._routing_lock:
            if self._routing is None or time.monotonic() > self._routing[0]:
                current = self.registry.current()  # one read: the router and the rows agree
                try:
                    router = self.registry.router(current)
                except RegistryError as error:  # no champion yet: `make dev` registers the base first
                    raise GatewayError(503, f"nothing to serve: {error}", "service_unavailable") from error
                rows = {r["version"]: r for r in current}
                self._routing = (time.monotonic() + self.settings.router_refresh_s, router, rows)
            return self._routing[1], self._routing[2]

    def live_versions(self, tenant: str | None = None) -> list[dict]:
        """The versions serving the tenant's lane (lib/tenancy.py): what serves its users outside
        the arms, with the share they leave it, then its canary and treatment; no other lane's."""
        _, rows = self.routing()
        current = list(rows.values())
        lane = self.registry.tenancy.lane(tenant)
        live = self.registry.serving(current, lane)
        arms = live["canary"] + live["treatment"]
        champion = self.registry.lane_champion(lane, current)
        share = max(0.0, 1.0 - sum(r["traffic_share"] for r in arms))
        return ([{**champion, "status": "champion", "traffic_share": share}] if champion else []) + arms

    # -- a chat call

    async def chat(self, tenant: str, user: str, messages: list[dict], tools: list[dict] | None, *,
                   max_tokens: int, temperature: float, tool_choice=None, session_hint: str | None = None,
                   task_type: str = "chat", at: float | None = None, user_named: bool = True) -> Served:
        router, rows = await asyncio.to_thread(self.routing)
        version = router(user, tenant)
        call = self.tracker.begin(tenant, user, messages, session_hint, task_type, at, infer=user_named) \
            if self.logged(tenant) else None
        try:
            completion = await asyncio.wait_for(
                self.backend.complete(rows[version], messages, tools, max_tokens=max_tokens,
                                      temperature=temperature, tool_choice=tool_choice),
                timeout=self.settings.request_timeout_s)
        except BaseException as error:
            if call is not None:
                self.tracker.release(call)
            if isinstance(error, TimeoutError):
                raise GatewayError(504, f"the model did not answer within {self.settings.request_timeout_s:g} s",
                                   "timeout_error") from None
            raise
        answer = {"role": "assistant", "content": completion.content}
        if completion.tool_calls:
            answer["tool_calls"] = completion.tool_calls
        if call is None:
            return Served(completion, version, None, None, answer)
        record, undo = self.tracker.served(call, messages, answer, model_version=version, tools=tools)
        try:
            await self._durably([record, *call.changed], call.events)
        except GatewayError:
            undo()  # the client gets a 503, not this answer: nothing of it remains
            raise
        return Served(completion, version, call.conversation.trajectory_id, call.conversation.session_id, answer)

    # -- feedback

    async def feedback(self, tenant: str, body: dict, at: float | None = None) -> dict:
        trajectory_id = body.get("trajectory_id")
        if not isinstance(trajectory_id, str) or not trajectory_id:
            raise GatewayError(400, "trajectory_id (from the x-flywheel-trajectory-id header) is required",
                               param="trajectory_id")
        kind = body.get("type")
        if kind not in FEEDBACK:
            raise GatewayError(400, f"type must be one of {', '.join(FEEDBACK)}, got {kind!r}", param="type")
        if kind == "edited" and isinstance(body.get("edited_text"), str) and len(body["edited_text"]) > EDIT_LIMIT:
            raise GatewayError(400, f"edited_text is over {EDIT_LIMIT} characters", param="edited_text")
        if not self.logged(tenant):
            return {"accepted": True, "logged": False}
        conversation = self.tracker.get(trajectory_id)
        if conversation is None or conversation.tenant != tenant:
            raise GatewayError(404, f"no recent trajectory {trajectory_id} for this key's tenant (feedback is "
                               f"taken within conversation_idle_s = {self.settings.conversation_idle_s:g} s of "
                               "the last call)", "not_found_error", "trajectory_id")
        event_type, once = FEEDBACK[kind]
        data: dict = {}
        if kind == "edited":
            edited = body.get("edited_text")
            if not isinstance(edited, str):
                raise GatewayError(400, "edited feedback needs edited_text, the answer as the user left it",
                                   param="edited_text")
            # quadratic in the worst case: off the event loop, on texts of at most EDIT_LIMIT characters
            similarity = await asyncio.to_thread(
                lambda: SequenceMatcher(None, conversation.final_answer()[:EDIT_LIMIT], edited, autojunk=False).ratio())
            data = {"edit_ratio": round(1.0 - similarity, 4), "edited_answer": edited}
        elif kind == "rating":
            rating = body.get("rating")
            if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
                raise GatewayError(400, f"rating must be an integer from 1 to 5, got {rating!r}", param="rating")
            data = {"rating": rating}
        if isinstance(body.get("comment"), str):
            data["comment"] = body["comment"][:2000]
        event = event_record(conversation, event_type, data, once_id(trajectory_id, event_type) if once else None, at)
        await self._durably([], [event])
        return {"accepted": True, "event_id": event["event_id"], "event_type": event_type, **data}

    # -- landing

    def flush(self) -> dict:
        """Land what is due: final conversations, idle ones, events. Open conversations stay
        in the journal's checkpoint (across a restart too)."""
        taken: dict = {}

        def collect():
            due = self.tracker.due()
            with self._events_lock:
                events, self._events = self._events, []
            taken.update(due=due, events=events)
            landing = {c.trajectory_id for c in due}
            # kept across a restart: the open ones, and the landed ones still remembered (feedback
            # and follow-ups on them are recognised after a restart too)
            kept = [c.record() for c in self.tracker.open() if c.trajectory_id not in landing]
            kept += [c.record() for c in self.tracker.remembered()] + [c.record() | {"landed": True} for c in due]
            return [c.record() for c in due], events, kept

        with self._flush_lock:  # the lander thread and close() never land at once
            try:
                files = self.journal.land(collect)
            except BaseException:
                with self._events_lock:  # back in the queue: the journal still has them too
                    self._events = taken.get("events", []) + self._events
                raise
            self.tracker.mark_landed(taken["due"])
        self.landed["trajectories"] += len(taken["due"])
        self.landed["events"] += len(taken["events"])
        self.landed["files"] += len(files)
        return {"trajectories": len(taken["due"]), "events": len(taken["events"]), "files": len(files)}

    def close(self) -> None:
        self.flush()
        self.journal.close()
        self.backend.close()

    async def _durably(self, conversations: list[dict], events: list[dict]) -> None:
        # events are queued before the write, so that a seal between the two cannot drop them
        with self._events_lock:
            self._events.extend(events)
        try:
            await asyncio.to_thread(self.journal.append, [*conversations, *events])
        except OSError as error:
            with self._events_lock:
                self._events = [e for e in self._events if e not in events]
            raise GatewayError(503, f"the gateway cannot write its journal ({error}); nothing was served",
                               "service_unavailable") from error

    def _recover(self) -> dict:
        """After a restart (or a kill -9): open conversations back in the tracker; finished ones
        and every journalled event land again (the ingester skips ids it already has)."""
        conversations, events = self.journal.recover()
        for record in conversations:
            self.tracker.restore(record)  # a landed one is remembered, not landed again
        with self._events_lock:
            self._events.extend(events)
        counts = {"conversations": sum(not r.get("landed") for r in conversations), "events": len(events)}
        if conversations or events:
            self.flush()
        return counts
