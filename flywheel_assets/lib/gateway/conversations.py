"""One trajectory per agent conversation, out of stateless HTTP calls.

An agent re-sends its whole conversation with every call: user → the model's tool call →
the tool's result → … → the final answer. The tracker recognises each call by its
messages (a canonical hash, ignoring call ids and spacing the clients may change):

* the messages extend what was served before, with tool results after a tool call: the
  same conversation goes on, the same trajectory;
* they are exactly what was asked before (the conversation re-sent without its last
  assistant turn): a retry. `retry_requested` names the first answer's trajectory, which
  lands as it was (superseded); the new answer starts a new trajectory in the same session;
* they extend a final answer with a further user turn: `session_continued`, and a new
  trajectory in the same session;
* anything else starts a new session (or joins the one the client names).

A trajectory is final when its last answer calls no tool; one left on a tool call lands
as it is once idle for `conversation_idle_s`. The tracker only decides; the gateway writes
its records to the journal before answering. Thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Conversation:
    trajectory_id: str
    session_id: str
    tenant: str
    user: str
    model_version: str = ""
    messages: list[dict] = field(default_factory=list)  # through the latest served answer
    tools: list[dict] | None = None
    task_type: str = "chat"
    created_at: str = ""
    touched: float = 0.0  # time.time() of the latest call
    final: bool = False  # the latest answer calls no tool
    landed: bool = False  # written to the landing zone; kept a while to recognise retries
    revision: int = 0  # bumped at every change: the journal keeps the highest
    in_flight: int = 0  # calls on it being answered now: it does not land meanwhile

    def record(self) -> dict:
        """What the journal keeps of it: enough to land it and to rebuild the tracker."""
        return {"kind": "conversation", "trajectory_id": self.trajectory_id, "session_id": self.session_id,
                "tenant": self.tenant, "user": self.user, "model_version": self.model_version,
                "messages": self.messages, "tools": self.tools, "task_type": self.task_type,
                "created_at": self.created_at, "touched": self.touched, "final": self.final,
                "revision": self.revision, "landed": self.landed}

    @classmethod
    def from_record(cls, record: dict) -> Conversation:
        return cls(**{k: v for k, v in record.items() if k not in ("kind", "in_flight")})

    def final_answer(self) -> str:
        last = next((m for m in reversed(self.messages) if m.get("role") == "assistant"), None)
        return _text(last.get("content")) if last else ""


@dataclass(frozen=True)
class Call:
    """What the tracker made of one chat call, before the model answers."""

    conversation: Conversation
    events: list[dict]  # retry_requested / session_continued, as journal records
    retried: Conversation | None = None  # the answer this call asks again for: final once served
    changed: list[dict] = field(default_factory=list)  # records of other conversations it changed


def prefix_keys(messages: list[dict], tenant: str = "", user: str = "") -> list[str]:
    """keys[i] = a hash of who sent messages[:i + 1] and what they say: roles, text, tool
    names and arguments (not call ids). Two users asking the same are two conversations.
    One running hash over the messages: every prefix costs one message's hashing."""
    running = hashlib.sha256(json.dumps([tenant, user]).encode())
    keys = []
    for message in messages:
        calls = [[(c.get("function") or {}).get("name"), _arguments((c.get("function") or {}).get("arguments"))]
                 for c in message.get("tool_calls") or []]
        canonical = [message.get("role"), _text(message.get("content")).strip(), calls]
        running.update(b"\x1e" + json.dumps(canonical, sort_keys=True, ensure_ascii=False,
                                              default=str).encode("utf-8", "surrogatepass"))
        keys.append(running.copy().hexdigest())
    return keys


def event_record(conversation: Conversation, event_type: str, data: dict | None = None,
                 event_id: str | None = None, at: float | None = None) -> dict:
    """An event for the landing zone (the client's line format), as a journal record. One-off
    signals get an id derived from what they are about, so sending one twice counts once."""
    return {"kind": "event", "event_id": event_id or uuid.uuid4().hex, "session_id": conversation.session_id,
            "trajectory_id": conversation.trajectory_id, "user_id": conversation.user,
            "tenant_id": conversation.tenant, "event_type": event_type, "data": data or {},
            "ts": _iso(time.time() if at is None else at)}


def once_id(trajectory_id: str, event_type: str) -> str:
    return hashlib.sha256(f"{trajectory_id}:{event_type}".encode()).hexdigest()[:32]


class Tracker:
    def __init__(self, idle_s: float = 600.0, clock=time.time):
        self.idle_s, self.clock = idle_s, clock
        self._lock = threading.Lock()
        self._by_id: dict[str, Conversation] = {}
        self._answered: dict[str, str] = {}  # prefix key of the messages through an answer → trajectory_id
        self._asked: dict[str, str] = {}  # prefix key of the messages a call sent → trajectory_id
        self._keys: dict[str, list[tuple[dict, str]]] = {}  # trajectory_id → its index entries

    def begin(self, tenant: str, user: str, messages: list[dict], session_hint: str | None = None,
              task_type: str = "chat", at: float | None = None, infer: bool = True) -> Call:
        """What this call is; `at` (epoch seconds) stamps what it creates, else now. Without
        `infer` (no user named: many people may stand behind one key) no retry and no
        follow-up is inferred; a tool loop still goes on in its trajectory."""
        keys = prefix_keys(messages, tenant, user)
        with self._lock:
            events: list[dict] = []
            retried = self._live(self._asked.get(keys[-1]), tenant, user) if infer else None
            if retried is not None:
                events.append(event_record(retried, "retry_requested", at=at,
                                           event_id=once_id(retried.trajectory_id, "retry_requested")))
                return Call(self._new(tenant, user, retried.session_id, task_type, at), events, retried)
            previous, added = self._longest_answered_prefix(keys, messages, tenant, user)
            if previous is not None:
                if not previous.final and not previous.landed:
                    previous.in_flight += 1  # it must not land while this call is answered
                    return Call(previous, events)  # tool results (or a user aside) after a tool call
                if infer:
                    if any(m.get("role") == "user" for m in added):
                        events.append(event_record(previous, "session_continued", at=at,
                                                   event_id=once_id(previous.trajectory_id, "session_continued")))
                    return Call(self._new(tenant, user, previous.session_id, task_type, at), events)
            return Call(self._new(tenant, user, session_hint or uuid.uuid4().hex, task_type, at), events)

    def release(self, call: Call) -> None:
        """A call that failed: the conversation it would have gone on may land again."""
        with self._lock:
            call.conversation.in_flight = max(0, call.conversation.in_flight - 1)

    def served(self, call: Call, request: list[dict], answer: dict, *, model_version: str,
               tools: list[dict] | None) -> tuple[dict, Callable[[], None]]:
        """Note the answer given to `request`: (the conversation's journal record, undo). The
        gateway journals the record and calls undo() when that fails: the client got no
        answer, so nothing may remain of it. (The state changes before the write, so that a
        landing between the two cannot miss it.)"""
        conversation = call.conversation
        with self._lock:
            before = {name: getattr(conversation, name) for name in ("messages", "model_version", "tools",
                                                                    "touched", "final", "revision")}
            retried_before = (call.retried.final, call.retried.revision) if call.retried is not None else None
            new = conversation.trajectory_id not in self._by_id
            if call.retried is not None and not call.retried.final:
                call.retried.final = True  # the answer the user turned down lands as it was
                call.retried.revision += 1
                call.changed.append(call.retried.record())
            self._by_id.setdefault(conversation.trajectory_id, conversation)
            conversation.in_flight = max(0, conversation.in_flight - 1) if not new else 0
            conversation.messages = [*request, answer]
            conversation.model_version, conversation.tools = model_version, tools or conversation.tools
            conversation.touched = self.clock()
            conversation.final = not answer.get("tool_calls")
            conversation.revision += 1
            who = conversation.tenant, conversation.user
            indexed = len(self._keys.get(conversation.trajectory_id, []))
            self._index(conversation, self._asked, prefix_keys(request, *who)[-1])
            self._index(conversation, self._answered, prefix_keys(conversation.messages, *who)[-1])
            record = conversation.record()

        def undo() -> None:
            with self._lock:
                for name, value in before.items():
                    setattr(conversation, name, value)
                if retried_before is not None:
                    call.retried.final, call.retried.revision = retried_before
                entries = self._keys.get(conversation.trajectory_id, [])
                for index, digest in entries[indexed:]:
                    if index.get(digest) == conversation.trajectory_id:
                        del index[digest]
                del entries[indexed:]
                if new:
                    self._by_id.pop(conversation.trajectory_id, None)
                    self._keys.pop(conversation.trajectory_id, None)
        return record, undo

    def get(self, trajectory_id: str) -> Conversation | None:
        with self._lock:
            return self._by_id.get(trajectory_id)

    def due(self) -> list[Conversation]:
        """Conversations to land now: final ones, and those idle past idle_s."""
        now = self.clock()
        with self._lock:
            return [c for c in self._by_id.values() if not c.landed and c.messages and not c.in_flight
                    and (c.final or now - c.touched > self.idle_s)]

    def open(self) -> list[Conversation]:
        with self._lock:
            return [c for c in self._by_id.values() if not c.landed and c.messages]

    def remembered(self) -> list[Conversation]:
        """Landed but not forgotten yet: a restart keeps them, for feedback and follow-ups."""
        with self._lock:
            return [c for c in self._by_id.values() if c.landed]

    def mark_landed(self, conversations: list[Conversation]) -> None:
        """After their landing files are written; long-idle landed ones are forgotten."""
        now = self.clock()
        with self._lock:
            for conversation in conversations:
                conversation.landed = True
            for stale in [c for c in self._by_id.values() if c.landed and now - c.touched > self.idle_s]:
                self._forget(stale)

    def restore(self, record: dict) -> Conversation:
        """A conversation from the journal (after a restart), indexed as if just served."""
        conversation = Conversation.from_record(record)
        with self._lock:
            if (known := self._by_id.get(conversation.trajectory_id)) is not None:
                self._forget(known)
            self._by_id[conversation.trajectory_id] = conversation
            keys = prefix_keys(conversation.messages, conversation.tenant, conversation.user)
            for index, message in enumerate(conversation.messages):
                if message.get("role") == "assistant" and index:
                    self._index(conversation, self._asked, keys[index - 1])
                    self._index(conversation, self._answered, keys[index])
        return conversation

    def __len__(self) -> int:
        return len(self._by_id)

    def _live(self, trajectory_id: str | None, tenant: str, user: str) -> Conversation | None:
        """A conversation of this user only: another user asking the same is not a retry."""
        conversation = self._by_id.get(trajectory_id) if trajectory_id else None
        return conversation if conversation is not None and (conversation.tenant, conversation.user) == (tenant, user) \
            else None

    def _longest_answered_prefix(self, keys: list[str], messages: list[dict], tenant: str,
                                 user: str) -> tuple[Conversation | None, list[dict]]:
        for cut in range(len(messages) - 1, 0, -1):
            if (found := self._live(self._answered.get(keys[cut - 1]), tenant, user)) is not None:
                return found, messages[cut:]
        return None, []

    def _new(self, tenant: str, user: str, session_id: str, task_type: str, at: float | None) -> Conversation:
        return Conversation(uuid.uuid4().hex, session_id, tenant, user, task_type=task_type,
                            created_at=_iso(self.clock() if at is None else at), touched=self.clock())

    def _index(self, conversation: Conversation, index: dict, digest: str) -> None:
        index[digest] = conversation.trajectory_id
        self._keys.setdefault(conversation.trajectory_id, []).append((index, digest))

    def _forget(self, conversation: Conversation) -> None:
        self._by_id.pop(conversation.trajectory_id, None)
        for index, digest in self._keys.pop(conversation.trajectory_id, []):
            if index.get(digest) == conversation.trajectory_id:
                del index[digest]


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _arguments(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments.strip()
    return arguments


def _iso(seconds: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")
