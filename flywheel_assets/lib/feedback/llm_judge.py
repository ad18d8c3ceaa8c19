"""Optional LLM judge through any OpenAI-compatible chat completions endpoint.

Standard library only, so that turning the judge on needs no new dependency. The
model grades a conversation 1-10 against a fixed rubric; the grade is mapped
linearly to [-1, 1] (1 -> -1, 10 -> 1) to sit beside the other scores.
"""

from __future__ import annotations

import json
from typing import Any

from flywheel_assets.lib.config import LLMJudgeConfig
from flywheel_assets.lib.openai_compat import EndpointError, post_json, reply_json

MIN_GRADE = 1
MAX_GRADE = 10

RUBRIC = f"""You grade one conversation between a user and an AI agent that may call tools.
Judge the agent's work only, against this rubric:
- Did it understand and accomplish what the user asked?
- Were its tool calls appropriate, well-formed and their results used correctly?
- Is the final answer correct, complete and clearly stated, without invented facts?
- Did it avoid needless repetition, loops and irrelevant detours?
Grade with an integer from {MIN_GRADE} (useless or harmful) to {MAX_GRADE} (excellent).
Reply with only a JSON object: {{"score": <integer {MIN_GRADE}-{MAX_GRADE}>, "reason": "<one sentence>"}}"""


class LLMJudgeError(RuntimeError):
    """The endpoint could not be reached or did not return a usable grade."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"LLM judge at {endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


def grade_to_score(grade: float) -> float:
    """Map a 1-10 grade linearly onto [-1, 1]."""
    return 2.0 * (grade - MIN_GRADE) / (MAX_GRADE - MIN_GRADE) - 1.0


def render_conversation(messages: list[dict]) -> str:
    """Chat messages as plain text, one block per message, tool calls spelled out."""
    blocks = []
    for message in messages:
        lines = [f"[{message.get('role', 'unknown')}]"]
        text = _text(message.get("content"))
        if text:
            lines.append(text)
        for call in message.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else {}
            lines.append(f"-> call {function.get('name')}({_text(function.get('arguments'))})")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return json.dumps(content, ensure_ascii=False)


class LLMJudge:
    def __init__(self, config: LLMJudgeConfig, *, backoff_s: float = 1.0):
        if not config.url or not config.url.startswith(("http://", "https://")):
            raise LLMJudgeError(str(config.url), "url must be set and start with http:// or https://")
        self.config = config
        self.endpoint = f"{config.url.rstrip('/')}/chat/completions"
        self.backoff_s = backoff_s

    def score(self, messages: list[dict]) -> tuple[float, str]:
        """(score in [-1, 1], the model's reason) for one conversation."""
        body = {
            "model": self.config.model,
            "messages": [
                {"role": "system", "content": RUBRIC},
                {"role": "user", "content": render_conversation(messages)},
            ],
            "temperature": 0,
            "response_format": {"type": "json_object"},
        }
        return self._parse(self._post(body))

    def score_many(self, items: list[tuple[str, list[dict]]]) -> list[dict]:
        """One row per trajectory; a failure fills `error` and leaves the score null."""
        rows = []
        for trajectory_id, messages in items:
            try:
                score, reason = self.score(messages)
                rows.append({"trajectory_id": trajectory_id, "llm_score": score, "llm_reason": reason, "error": None})
            except LLMJudgeError as exc:
                rows.append({"trajectory_id": trajectory_id, "llm_score": None, "llm_reason": None, "error": exc.reason})
        return rows

    def _post(self, body: dict) -> bytes:
        try:
            return post_json(self.endpoint, body, api_key=self.config.api_key, timeout_s=self.config.timeout_s,
                             backoff_s=self.backoff_s)
        except EndpointError as error:
            raise LLMJudgeError(self.endpoint, error.reason) from error

    def _parse(self, raw: bytes) -> tuple[float, str]:
        try:
            verdict = reply_json(raw)
            grade = verdict["score"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise LLMJudgeError(self.endpoint, f"malformed response ({exc!r}): {raw[:300]!r}") from exc
        if isinstance(grade, bool) or not isinstance(grade, (int, float)) or not MIN_GRADE <= grade <= MAX_GRADE:
            raise LLMJudgeError(self.endpoint, f"score {grade!r} is not a number from {MIN_GRADE} to {MAX_GRADE}")
        reason = verdict.get("reason")
        return grade_to_score(float(grade)), reason if isinstance(reason, str) else ""


def judge_new(judge: "LLMJudge", trajectories: list[dict], judged: set[str], budget: int,
              now) -> tuple[list[dict], list[dict]]:
    """Grade the trajectories not judged yet, newest first, at most `budget` of them, on scrubbed
    text: (rows for llm_judgments, failures). A trajectory is graded once per judge model; a
    failure is not stored, so it is tried again by a later run.

    `trajectories` are dicts with trajectory_id, created_at, turns and tool_calls."""
    from flywheel_assets.lib.curation.curate import to_messages
    from flywheel_assets.lib.curation.scrub import scrub_messages

    pending = [t for t in trajectories if t["trajectory_id"] not in judged]
    pending.sort(key=lambda t: (t["created_at"], t["trajectory_id"]), reverse=True)
    rows, failures = [], []
    for trajectory in pending[:max(budget, 0)]:
        messages, redacted = scrub_messages(to_messages(trajectory["turns"], trajectory["tool_calls"]))
        try:
            score, reason = judge.score(messages)
        except LLMJudgeError as error:
            failures.append({"trajectory_id": trajectory["trajectory_id"], "error": error.reason})
            continue
        rows.append({"trajectory_id": trajectory["trajectory_id"], "model": judge.config.model, "llm_score": score,
                     "llm_reason": reason, "pii_redacted": sum(redacted.values()), "judged_at": now})
    return rows, failures
