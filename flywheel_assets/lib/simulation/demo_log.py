"""A deterministic demo usage log: what a month of a tool-using agent leaves behind.

~1200 sessions of the task environment's requests (tasks.generate_tasks, all 8
phrasings, never an evaluation prompt) served by base-v0: the scripted expert's
conversations with real tool results, realistic failures, the seed's feedback events,
duplicates, PII, and about 1-2% of malformed lines of every kind the ingester must
quarantine.
`python -m flywheel_assets.lib.simulation.demo_log` rewrites data/demo/.
"""

from __future__ import annotations

import gzip
import json
import string
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from random import Random

from flywheel_assets.lib.simulation.hermes import to_hermes
from flywheel_assets.lib.simulation.tasks import Task, expert_messages, generate_tasks
from flywheel_assets.lib.simulation.tools import CAPITALS, DATA_DIR, TOOLS, WEATHER, run_tool

START = datetime(2026, 11, 1, tzinfo=timezone.utc)
FAILURES = ("wrong_answer", "malformed_args", "unoffered_tool", "tool_error", "empty_final", "loop")
MODEL = "base-v0"
# Malformed line kinds and the quarantine reason_code the ingester should give each.
REASON_CODES = {
    "malformed_json": "malformed_json", "not_an_object": "not_an_object", "missing_session_id": "missing_key",
    "session_id_number": "wrong_type", "ts_not_a_date": "invalid_value", "edit_ratio_string": "wrong_type",
    "edit_ratio_out_of_range": "invalid_value", "not_utf8": "not_utf8", "oversized": "oversized",
    "unknown_format": "unknown_format", "conversations_not_a_list": "wrong_type",
    "created_at_not_a_date": "invalid_value",
}
BAD_EVENTS = {"malformed_json": 8, "not_an_object": 5, "missing_session_id": 6, "session_id_number": 5,
              "ts_not_a_date": 5, "edit_ratio_string": 4, "edit_ratio_out_of_range": 4, "not_utf8": 4}
BAD_TRAJECTORIES = {"malformed_json": 6, "not_an_object": 3, "unknown_format": 5,
                    "conversations_not_a_list": 3, "created_at_not_a_date": 3, "not_utf8": 3}
OPENAI_SYSTEM = "You are a helpful assistant. Use the provided tools to answer exactly."
_CONDITIONS = sorted({report["condition"] for report in WEATHER.values()})


def _plan(rng: Random, task: Task) -> dict:
    """A user request: its prompt, the expert's calls as (name, arguments text, result), a right and a wrong answer."""
    messages = expert_messages(task, rng)
    results = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
    calls = [(c["function"]["name"], c["function"]["arguments"], results[c["id"]])
             for m in messages for c in m.get("tool_calls") or []]
    answer = messages[-1]["content"]
    return {"prompt": task.prompt, "calls": calls, "answer": answer, "wrong": _wrong(rng, task, answer, calls[-1][2])}


def _wrong(rng: Random, task: Task, answer: str, result: str) -> str:
    """The answer with its verified part replaced by a plausible wrong value."""
    if task.task_type == "weather_of_capital":
        condition = json.loads(result)["condition"]
        other = rng.choice([c for c in _CONDITIONS if c != condition])
        return answer.replace(f"{condition} and", f"{other} and")
    if task.task_type == "capital_lookup":
        wrong = rng.choice(sorted(set(CAPITALS.values()) - {result}))
    elif task.task_type == "unit_conversion":
        wrong = str(round(float(result) * 1.1 + 1, 2))
    elif task.task_type == "text_ops":
        wrong = str(int(result) + rng.choice((-1, 1))) if result.isdigit() else json.loads(task.calls[0][1])["text"]
    else:
        off_by = rng.choice((-10, -1, 1, 10, 100))
        wrong = str(int(result) + off_by if int(result) + off_by >= 0 else int(result) - off_by)  # "-5" holds "5"
    head, _, tail = answer.rpartition(result)
    return head + wrong + tail


_BAD_ARGS = {"calculator": {"expression": "12 / 4"}, "lookup_capital": {"country": "Atlantis"},
             "convert_units": {"value": 3, "from_unit": "stone", "to_unit": "kg"},
             "text_transform": {"text": "hello world", "operation": "title"}}


def _steps(rng: Random, plan: dict, failure: str | None) -> tuple[list[tuple[str, str, str]], str | None, bool]:
    """(calls as (name, arguments JSON text, result), final answer, completed) for one failure mode."""
    calls = plan["calls"]
    sorry = "Sorry, I could not complete that request."
    if failure == "wrong_answer":
        return calls, plan["wrong"], True
    if failure == "malformed_args":
        name, arguments, _ = calls[0]
        broken = arguments[:-rng.randint(1, 6)]
        return [(name, broken, run_tool(name, broken))], sorry, True
    if failure == "unoffered_tool":
        arguments = json.dumps({"query": plan["prompt"]})
        return [("web_search", arguments, run_tool("web_search", arguments))], sorry, True
    if failure == "tool_error":
        name = calls[0][0]
        return [(name, json.dumps(_BAD_ARGS[name]), run_tool(name, _BAD_ARGS[name]))], sorry, True
    if failure == "empty_final":
        return calls, "", True
    if failure == "loop":
        return [calls[0]] * rng.randint(3, 5), None, False  # cut off at the turn limit, no final turn
    return calls, plan["answer"], True


def _openai(rng: Random, prompt: str, steps, final: str | None) -> list[dict]:
    messages = [{"role": "system", "content": OPENAI_SYSTEM}, {"role": "user", "content": prompt}]
    for name, arguments, result in steps:
        call_id = f"call_{rng.getrandbits(48):012x}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": result})
    return messages if final is None else messages + [{"role": "assistant", "content": final}]


def _pii(rng: Random) -> str:
    key = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(40))
    return rng.choice((
        f" My email is jordan.{rng.randint(10, 99)}@example.com if you need it.",
        f" Call me back at +1 415-555-{rng.randint(1000, 9999)}.",
        " Charge it to my card 4111 1111 1111 1111, expiry 12/29.",
        f" I'm on 10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)} behind the VPN.",
        f" The tool might need my key sk-proj-{key}.",
    ))


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _hex(rng: Random, bits: int) -> str:
    return f"{rng.getrandbits(bits):0{bits // 4}x}"


def _dump(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


_COMPLAINTS = {"wrong_answer": "the answer is wrong", "malformed_args": "it errored out", "loop": "it got stuck",
               "unoffered_tool": "it tried a tool that does not exist", "tool_error": "the tool failed",
               "empty_final": "no answer at all", None: "not what I asked"}


class _Session:
    """One user session: 1-3 attempts at one request (a retry makes a new trajectory) and its events."""

    def __init__(self, rng: Random, user: tuple[str, str], log: dict):
        self.rng, self.log = rng, log
        self.ids = {"session_id": f"sess-{_hex(rng, 48)}", "user_id": user[0], "tenant_id": user[1]}
        self.moment = START + timedelta(seconds=rng.randrange(24 * 86400 - 3600))

    def event(self, event_type: str, trajectory_id: str | None = None, data: dict | None = None) -> None:
        rng, data = self.rng, dict(data or {})
        self.moment += timedelta(seconds=rng.randint(2, 120))
        line = {} if rng.random() < 0.1 else {"event_id": _hex(rng, 128)}  # the ingester derives missing ids
        line["session_id"] = self.ids["session_id"]
        if trajectory_id and rng.random() < 0.15:
            data["trajectory_id"] = trajectory_id
        elif trajectory_id:
            line["trajectory_id"] = trajectory_id
        line.update(user_id=self.ids["user_id"], tenant_id=self.ids["tenant_id"], event_type=event_type,
                    ts=_iso(self.moment), data=data)
        self.log["events"].append(line)

    def trajectory(self, plan: dict, task_type: str, fmt: str, failure: str | None, may_repeat: bool = False) -> str:
        rng, log = self.rng, self.log
        record = {"trajectory_id": f"traj-{_hex(rng, 64)}", **self.ids, "task_type": task_type,
                  "model_version": MODEL, "is_synthetic": False, "origin": "usage", "created_at": _iso(self.moment)}
        if may_repeat and failure is None and log["clean"] and rng.random() < 0.02:
            fmt, task_type, content = rng.choice(log["clean"])  # same conversation, served again
            record.update(task_type=task_type, **content)
            log["stats"]["exact_duplicates"] += 1
        else:
            prompt = plan["prompt"]
            if rng.random() < 0.015:
                prompt += _pii(rng)
                log["stats"]["with_pii"] += 1
            steps, final, completed = _steps(rng, plan, failure)
            messages = _openai(rng, prompt, steps, final)
            if fmt == "hermes":
                content = {"completed": completed, "conversations": to_hermes(messages)}
            else:
                content = {"messages": messages, "tools": TOOLS}
            record.update(content)
            if failure is None:
                log["clean"].append((fmt, task_type, content))
        log["trajectories"].append((fmt, record))
        log["failures"][record["trajectory_id"]] = failure
        log["stats"][f"failure:{failure or 'none'}"] += 1
        self.moment += timedelta(seconds=rng.randint(5, 90))
        return record["trajectory_id"]

    def play(self, task: Task) -> None:
        rng, task_type = self.rng, task.task_type
        plan, fmt = _plan(rng, task), "hermes" if rng.random() < 0.35 else "openai"
        attempts = rng.choices((1, 2, 3), weights=(45, 35, 20))[0]
        for _ in range(attempts - 1):
            failure = rng.choices(FAILURES, weights=(40, 15, 10, 15, 10, 10))[0]
            trajectory_id = self.trajectory(plan, task_type, fmt, failure)
            if rng.random() < 0.3:
                self.event("error_reported", trajectory_id, {"message": _COMPLAINTS[failure]})
            self.event("retry_requested", trajectory_id)
        failure = None if rng.random() < 0.85 else rng.choice(FAILURES)
        # A session without retries may be served a conversation seen before, verbatim.
        trajectory_id = self.trajectory(plan, task_type, fmt, failure, may_repeat=attempts == 1)
        roll = rng.random()
        accepted = roll < 0.8 if failure is None else (failure == "wrong_answer" and roll < 0.25)
        if accepted:
            self.event("output_accepted", trajectory_id)
        if failure is None and (roll < 0.25 or 0.8 <= roll < 0.92):
            self.event("output_edited", trajectory_id, {"edit_ratio": round(rng.betavariate(2, 5), 3)})
        if failure is not None and not accepted and rng.random() < 0.5:
            self.event("error_reported", trajectory_id, {"message": _COMPLAINTS[failure]})
        if rng.random() < (0.55 if accepted else 0.1):
            for _ in range(rng.randint(1, 2)):
                self.event("session_continued", trajectory_id if rng.random() < 0.5 else None)
        if rng.random() < 0.02:
            self.event("thumbs_viewed", trajectory_id, {"surface": "sidebar"})


def _bad_event(rng: Random, kind: str, sample: dict) -> bytes:
    line = json.loads(json.dumps(sample)) | {"event_id": _hex(rng, 128)}
    if kind == "malformed_json":
        return _dump(line)[: -rng.randint(5, 30)]
    if kind == "not_an_object":
        return _dump([line["event_type"], line["session_id"], line["ts"]])
    if kind == "not_utf8":
        return _dump(line)[:-1] + b', "comment": "caf\xff\xfe"}'
    if kind == "missing_session_id":
        del line["session_id"]
    elif kind == "session_id_number":
        line["session_id"] = rng.randint(1000, 99999)
    elif kind == "ts_not_a_date":
        line["ts"] = rng.choice(("yesterday", "2026-13-45T99:00:00Z", "soon"))
    elif kind.startswith("edit_ratio"):
        line.update(event_type="output_edited", data={"edit_ratio": "lots" if kind == "edit_ratio_string" else 1.7})
    elif kind == "oversized":
        line["data"] = {"comment": "x" * 1_100_000}
    return _dump(line)


def _bad_trajectory(rng: Random, kind: str, sample: dict) -> bytes:
    line = json.loads(json.dumps(sample)) | {"trajectory_id": f"traj-{_hex(rng, 64)}"}
    key = "conversations" if "conversations" in line else "messages"
    if kind == "malformed_json":
        text = _dump(line)
        return text[: len(text) // 2]
    if kind == "not_an_object":
        return _dump(line[key])
    if kind == "not_utf8":
        return _dump(line)[:-1] + b', "note": "\xff\xfe"}'
    if kind == "unknown_format":
        turns = line.pop(key)
        line.pop("tools", None)
        first, last = turns[1], turns[-1]
        line.update(prompt=first.get("value", first.get("content")), completion=last.get("value", last.get("content")))
    elif kind == "conversations_not_a_list":
        line[key] = "user: " + str(line[key][1])
    elif kind == "created_at_not_a_date":
        line["created_at"] = "last tuesday"
    elif kind == "oversized":
        line[key][1]["value"] += " Please also read this log: " + "lorem ipsum dolor " * 70_000
    return _dump(line)


def _with_bad_lines(rng: Random, lines: list[bytes], bad: list[bytes]) -> list[bytes]:
    lines = list(lines)
    for line in bad:
        lines.insert(rng.randrange(len(lines) + 1), line)
    return lines


def _split(counts: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Every kind in both files of a pair: the larger half in the first."""
    return {k: n - n // 2 for k, n in counts.items()}, {k: n // 2 for k, n in counts.items()}


def _annotations(rng: Random, log: dict) -> list[dict]:
    notes = {None: "correct and concise", **{k: f"bad: {v}" for k, v in _COMPLAINTS.items() if k}}
    records = sorted((record for _, record in log["trajectories"]), key=lambda r: r["trajectory_id"])
    picked = rng.sample(records, min(38, len(records)))
    labels = []
    for record in picked + picked[:2]:  # the first two are labelled twice; the later label wins
        failure = log["failures"][record["trajectory_id"]]
        score = rng.uniform(0.6, 1.0) if failure is None else rng.uniform(-1.0, -0.3)
        at = datetime.fromisoformat(record["created_at"].replace("Z", "+00:00")) + timedelta(hours=rng.randint(24, 72))
        at += timedelta(days=1) if len(labels) >= len(picked) else timedelta(0)
        labels.append({"trajectory_id": record["trajectory_id"], "score": round(score, 2),
                       "annotator": rng.choice(("alice", "bhavin", "chen")), "note": notes[failure],
                       "annotated_at": _iso(min(at, datetime(2026, 11, 25, 23, tzinfo=timezone.utc)))})
    return labels


def _write(path: Path, lines: list[bytes]) -> int:
    data = b"".join(line + b"\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path.stat().st_size


def write_demo_log(out_dir: Path, seed: int = 7, n_sessions: int = 1200) -> dict:
    """Write the demo landing files under out_dir and return (and write to MANIFEST.json) their counts."""
    rng, out_dir = Random(seed), Path(out_dir)
    users = [(f"user-{i:04d}", "acme" if rng.random() < 0.6 else "globex") for i in range(300)]
    log = {"events": [], "trajectories": [], "clean": [], "failures": {}, "stats": Counter()}
    # All 8 phrasings: real users ask in ways the cold-start data never shows. Never an evaluation prompt.
    tasks = generate_tasks(n_sessions, seed=seed)
    rng.shuffle(tasks)
    for task in tasks:
        _Session(rng, rng.choice(users), log).play(task)
    events = sorted(log["events"], key=lambda e: e["ts"])
    part1 = [e for e in events if e["ts"] < "2026-11-13T12:00:00Z"]
    part2 = [e for e in events if e["ts"] >= "2026-11-13T12:00:00Z"]
    resent = part1[-40:]  # an agent re-sent its last batch: the same lines land twice
    files: dict[str, list[bytes]] = {
        "events/usage-events-part1.jsonl": [_dump(e) for e in part1],
        "events/usage-events-part2.jsonl.gz": [_dump(e) for e in resent + part2],
    }
    by_time = sorted(log["trajectories"], key=lambda t: t[1]["created_at"])
    hermes = [r for fmt, r in by_time if fmt == "hermes"]
    big = [r for r in hermes if rng.random() < 0.01]
    files["trajectories/usage-hermes.jsonl"] = [_dump(r) for r in hermes if r not in big]
    files["trajectories/usage-hermes-big.jsonl.gz"] = [_dump(r) for r in big]
    openai = [r for fmt, r in by_time if fmt == "openai"]
    files["trajectories/usage-openai.jsonl.gz"] = [_dump(r) for r in openai]
    first_events, second_events = _split(BAD_EVENTS)
    first_trajectories, second_trajectories = _split(BAD_TRAJECTORIES)
    plan = {"events/usage-events-part1.jsonl": (first_events, _bad_event, events),
            "events/usage-events-part2.jsonl.gz": (second_events | {"oversized": 1}, _bad_event, events),
            "trajectories/usage-hermes.jsonl": (first_trajectories, _bad_trajectory, hermes),
            "trajectories/usage-openai.jsonl.gz": (second_trajectories, _bad_trajectory, openai),
            "trajectories/usage-hermes-big.jsonl.gz": ({"oversized": 1}, _bad_trajectory, hermes)}
    malformed: dict[str, dict[str, int]] = {}
    for name, (counts, make, pool) in plan.items():
        bad = [make(rng, kind, rng.choice(pool)) for kind, n in sorted(counts.items()) for _ in range(n)]
        files[name] = _with_bad_lines(rng, files[name], bad)
        malformed[name] = {kind: n for kind, n in counts.items() if n}
    files["annotations/labels.jsonl"] = [_dump(a) for a in _annotations(rng, log)]
    sizes = {name: _write(out_dir / name, lines) for name, lines in sorted(files.items())}
    stats = log["stats"]
    manifest = {
        "seed": seed, "sessions": n_sessions, "users": len({e["user_id"] for e in events}),
        "tenants": dict(sorted(Counter(e["tenant_id"] for e in events).items())),
        "events": len(events), "event_lines_resent": len(resent),
        "events_by_type": dict(sorted(Counter(e["event_type"] for e in events).items())),
        "events_without_event_id": sum("event_id" not in e for e in events),
        "events_with_trajectory_id_in_data": sum("trajectory_id" in e["data"] for e in events),
        "trajectories": len(log["trajectories"]),
        "trajectories_by_format": dict(sorted(Counter(f for f, _ in log["trajectories"]).items())),
        "trajectories_by_task_type": dict(sorted(Counter(r["task_type"] for _, r in log["trajectories"]).items())),
        "trajectories_by_failure": {k.split(":")[1]: v for k, v in sorted(stats.items()) if k.startswith("failure:")},
        "trajectories_with_pii": stats["with_pii"], "exact_duplicate_trajectories": stats["exact_duplicates"],
        "annotations": len(files["annotations/labels.jsonl"]),
        "lines_by_file": {name: len(lines) for name, lines in sorted(files.items())},
        "malformed_lines_by_file": malformed,
        "malformed_lines_by_kind": dict(sorted(sum((Counter(c) for c in malformed.values()), Counter()).items())),
        "expected_reason_code": REASON_CODES, "bytes_by_file": sizes,
    }
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    print(json.dumps(write_demo_log(DATA_DIR / "demo"), indent=2))
