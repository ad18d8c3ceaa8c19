"""The journal alone: what a restart finds after a crash at each step, and group commit."""

from __future__ import annotations

import json
import threading

from flywheel_assets.lib.gateway.conversations import Conversation, event_record
from flywheel_assets.lib.gateway.journal import Journal, JournalError


def _conversation(n: int, final: bool, revision: int = 1) -> dict:
    record = Conversation(f"t{n}", f"s{n}", "acme", "u", "v1", [{"role": "user", "content": f"q{n}"},
                                                                  {"role": "assistant", "content": f"a{n}"}],
                          final=final, revision=revision, created_at="2026-12-04T00:00:00Z").record()
    return record


def test_a_crash_before_landing_keeps_everything_and_a_torn_line_is_skipped(tmp_path):
    journal = Journal(tmp_path / "j", tmp_path)
    event = event_record(Conversation("t1", "s1", "acme", "u"), "output_accepted")
    journal.append([_conversation(1, True), _conversation(2, False), event])
    journal.append([_conversation(2, True, revision=2)])
    journal.close()  # lands nothing: on disk as after a kill -9 (which also frees the lock)
    segment = max((tmp_path / "j").glob("s*.jsonl"))
    with open(segment, "ab") as handle:
        handle.write(b'{"kind": "conversation", "trajectory_id": "t3", "mess')  # killed mid-write, never acknowledged
    # a kill -9 here: the next process finds it all, the latest revision of each conversation
    conversations, events = Journal(tmp_path / "j", tmp_path).recover()
    assert {c["trajectory_id"]: (c["final"], c["revision"]) for c in conversations} == {"t1": (True, 1), "t2": (True, 2)}
    assert [e["event_id"] for e in events] == [event["event_id"]]


def test_landing_keeps_only_what_is_still_open_and_an_older_checkpoint_never_wins(tmp_path):
    journal = Journal(tmp_path / "j", tmp_path)
    journal.append([_conversation(1, True), _conversation(2, False)])
    files = journal.land(lambda: ([_conversation(1, True)], [], [_conversation(2, False)]))
    assert [p.parent.name for p in files] == ["trajectories"]
    assert json.loads(files[0].read_text())["trajectory_id"] == "t1"
    journal.append([_conversation(2, True, revision=2)])  # after the checkpoint: the newer state
    journal.close()
    conversations, _ = Journal(tmp_path / "j", tmp_path).recover()
    assert [(c["trajectory_id"], c["revision"]) for c in conversations] == [("t2", 2)]


def test_concurrent_appends_share_fsyncs(tmp_path):
    journal = Journal(tmp_path / "j", tmp_path)
    threads = [threading.Thread(target=journal.append, args=([_conversation(n, True)],)) for n in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    journal.close()
    conversations, _ = Journal(tmp_path / "j", tmp_path).recover()  # what a restart finds
    assert len(conversations) == 64 and journal.fsyncs < 64


def test_one_gateway_per_journal_and_a_bad_record_fails_only_its_own_write(tmp_path):
    journal = Journal(tmp_path / "j", tmp_path)
    try:
        Journal(tmp_path / "j", tmp_path)
    except JournalError as error:
        assert "another gateway" in str(error)
    else:
        raise AssertionError("a second journal on the same folder was allowed")
    for bad in ({"kind": "event", "x": float("nan")}, {"kind": "event", "x": "\ud800"}):
        try:
            journal.append([bad])
        except JournalError:
            pass
        else:
            raise AssertionError(f"{bad} was written")
    journal.append([_conversation(1, True)])  # the writer lives on
    journal.close()
    assert [c["trajectory_id"] for c in Journal(tmp_path / "j", tmp_path).recover()[0]] == ["t1"]
