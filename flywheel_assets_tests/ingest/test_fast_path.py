"""The fast event path gives exactly what the reference (line-by-line) path gives.

read_line_batches (Arrow) against read_line_batches_python, parse_event_lines (one
from_json per line) against parse_event_lines_reference (every line through the
reason CASE), and a whole ingest_landing run against the sequential loop it replaced.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter

import duckdb
import pyarrow as pa
import pytest

from flywheel_assets.lib.config import load_config
from flywheel_assets.lib.ingest import landing
from flywheel_assets.lib.ingest.events import parse_event_lines, parse_event_lines_reference, with_event_hash
from flywheel_assets.lib.ingest.landing import read_line_batches, read_line_batches_python
from flywheel_assets.lib.ingest.parsing import parse_python
from flywheel_assets.lib.ingest.pipeline import (
    TARGETS, IngestReport, ingest_landing, pending_files,
)
from flywheel_assets.lib.lake import Lake, utcnow
from flywheel_assets.lib.tables import INGESTED_FILES, QUARANTINE, SESSION_EVENTS, TRAJECTORIES, ANNOTATIONS

STRINGS = ["a", "s1", "u\u00e9", 'x"y', "back\\slash", "data", '"data"', "t/1", "\u2028", "output_edited",
           "e\u0000z", "\U0001d11e", "  ", "\u007f\u0085"]
GOOD_TS = ["2026-11-26T10:00:00Z", "2026-11-26T10:00:00.123456Z", "2026-11-26 10:00:00Z",
           "2026-11-26T10:00:00+02:00", "2026-11-26T10:00:00.5-05:30"]
ODD_TS = ["2026-11-26 10:00:00", "2026-11-26", "yesterday", "", "2026-13-01T00:00:00Z",
          "2026-11-26T10:00:00 America/New_York", "2026-11-26 10:00:00 Europe/Paris", "epoch", "infinity",
          "2026-11-26T10:00:00 garbage", "2026-11-26T25:00:00Z"]
RATIOS = ["0", "1", "0.25", "1.0", "0.5e0", "-0.0", "0.0000001", "5E-1", "0.30000000000000004", "1e-300"]
BAD_RATIOS = ["1.7", "-0.1", "NaN", "Infinity", "-Infinity", '"0.5"', "null", "true", "[0.5]", "12345678901234567890123"]
BAD_LINES = ["{not json", "[1, 2, 3]", "null", '"str"', "5", "{}", '{"a":1}x', '{"session_id":"a",}', "{'a':1}",
             "[]", "true", '{"session_id": "s", "user_id": "u", "event_type": "x", "ts": "2026-11-26T10:00:00Z"} junk']


def _text(rng: random.Random) -> str:
    return json.dumps(rng.choice(STRINGS), ensure_ascii=rng.random() < 0.5)


def _any(rng: random.Random) -> str:
    return rng.choice([_text(rng), "42", "-1.5e3", "null", "true", "{}", '{"a": [1, "b"]}', "[1, 2]"])


def _pick(rng: random.Random, good: list, bad: list, p_bad: float):
    return rng.choice(bad) if rng.random() < p_bad else rng.choice(good)


def event_line(rng: random.Random, ids: int = 40) -> str:
    """One events line: mostly valid, each key with some chance of every way to be wrong."""
    p = rng.choice([0.0, 0.0, 0.05, 0.3])
    if rng.random() < p / 3:
        return rng.choice(BAD_LINES)
    fields = {
        "event_id": _pick(rng, [f'"ev-{rng.randrange(ids)}"', None, f'"e{rng.randrange(ids)}"', '"e\\u0031"'],
                          ["null", "5", '""', '"a\\"b"', "{}"], p),
        "session_id": _pick(rng, [_text(rng), '"s1"', '"s\\u00e9"'], [None, "null", "42", '""', _any(rng)], p),
        "user_id": _pick(rng, [_text(rng), '"u1"'], [None, "null", "true", '""', _any(rng)], p),
        "tenant_id": _pick(rng, [None, _text(rng), '"acme"'], ["null", "3", _any(rng)], p),
        "event_type": _pick(rng, ['"output_edited"', '"output_accepted"', '"retry_requested"', '""',
                                  '"output_\\u0065dited"'], [None, "null", "7"], p),
        "ts": _pick(rng, [json.dumps(t) for t in GOOD_TS], [json.dumps(rng.choice(ODD_TS)), None, "null", "1732600000"], p),
        "trajectory_id": _pick(rng, [None, _text(rng), '"t1"'], ["null", "9", "{}", _any(rng)], p),
    }
    data: list[str] = []
    if rng.random() < 0.7:
        data.append(f'"edit_ratio": {_pick(rng, RATIOS, BAD_RATIOS, p)}')
    if rng.random() < 0.3:
        data.append(f'"trajectory_id": {_pick(rng, [_text(rng), "null"], ["5", "{}"], p)}')
    if rng.random() < 0.3:
        data.append(f'"note": {_any(rng)}')
    if data and rng.random() < 0.05:
        data.append(data[0])  # duplicate key: the first one counts
    rng.shuffle(data)
    fields["data"] = _pick(rng, ["{" + ", ".join(data) + "}", "{}", None, '{"x": {"y": [1, 2.50, "\\u00e9"]}}'],
                           ["null", "[]", '"x"', "5"], p)
    items = [(key, value) for key, value in fields.items() if value is not None]
    rng.shuffle(items)
    if rng.random() < 0.05:
        items.append((rng.choice(items)[0], _any(rng)))  # duplicate top-level key
    if rng.random() < 0.03:
        items.append(("d\\u0061ta", "null"))  # a key that is "data" once unescaped
    if rng.random() < 0.03:
        items.append(("note", '"mentions \\"data\\" here"'))
    separator, colon = rng.choice([(",", ":"), (", ", ": ")])
    text = "{" + separator.join(f'"{key}"{colon}{value}' for key, value in items) + "}"
    if rng.random() < 0.05:
        text = "  " + text + " \t"
    if rng.random() < 0.02:
        text = text[:-1] + ",}"
    return text


def _rows(table: pa.Table, key: str, drop=("ingested_at",)) -> list[dict]:
    table = table.drop_columns([c for c in drop if c in table.column_names])
    if "ts" in table.column_names:  # "infinity" is out of datetime's range
        table = table.set_column(table.column_names.index("ts"), "ts", table.column("ts").cast(pa.int64()))
    return sorted(table.to_pylist(), key=lambda row: (row[key], row.get("source_line") or 0))


@pytest.mark.parametrize("seed", range(12))
def test_parse_event_lines_matches_the_reference(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 7, 300, 2500])
    numbers = sorted(rng.sample(range(1, 3 * n + 1), n))
    problems = [rng.choice([None] * 20 + ["oversized", "not_utf8"]) for _ in range(n)]
    lines = pa.Table.from_arrays(
        [pa.array(numbers, pa.int64()), pa.array([event_line(rng) for _ in range(n)], pa.string()),
         pa.array(problems, pa.string()), pa.array([p == "oversized" for p in problems])],
        schema=landing.LINE_SCHEMA)
    con = duckdb.connect()
    good, bad = parse_event_lines(con, lines, "events/f.jsonl")
    ref_good, ref_bad = parse_event_lines_reference(con, lines, "events/f.jsonl")
    ref_good = with_event_hash(con, ref_good).select(good.column_names)  # the key index's hash, given too
    assert good.schema == ref_good.schema
    assert bad.schema == ref_bad.schema
    assert _rows(good, "source_line") == _rows(ref_good, "source_line")
    assert _rows(bad, "source_line") == _rows(ref_bad, "source_line")


def test_a_zone_named_timestamp_does_not_change_the_next_rows():
    """DuckDB's ICU cast kept the zone of '... Europe/Paris' for later zone-less values."""
    base = {"session_id": "s", "user_id": "u", "event_type": "output_accepted"}
    texts = ["2026-11-26 10:00:00 Asia/Tokyo", "2026-11-26 10:00:00", "2026-11-26T10:00:00Z", "2026-11-26 10:00:00"]
    lines = pa.Table.from_arrays(
        [pa.array(range(1, 5), pa.int64()), pa.array([json.dumps({**base, "ts": t, "event_id": f"e{i}"})
                                                for i, t in enumerate(texts)]),
         pa.nulls(4, pa.string()), pa.array([False] * 4)], schema=landing.LINE_SCHEMA)
    for parse in (parse_event_lines, parse_event_lines_reference):
        good, _ = parse(duckdb.connect(), lines, "events/f.jsonl")
        hours = {r["source_line"]: r["ts"].hour for r in good.to_pylist()}
        assert hours == {1: 1, 2: 10, 3: 10, 4: 10}


def _random_bytes(rng: random.Random, n: int) -> bytes:
    alphabet = [b"a", b"{", b"}", b" ", b"\t", b"\r", b"\n", b"\n", b"\n", b"\x0b", b"\x0c", b"\xff",
                "\u00e9".encode(), "\u00e9".encode()[:1], b'"', b"\\", b"\x00", "\u20ac".encode(), b"xyz"]
    return b"".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("seed", range(6))
def test_read_line_batches_matches_the_reference(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    for i in range(150):
        data = _random_bytes(rng, rng.choice([0, 1, 2, 5, 40, 600]))
        gz = rng.random() < 0.2
        path = tmp_path / (f"f{i}.jsonl" + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        monkeypatch.setattr(landing, "_BLOCK_BYTES", rng.choice([1, 2, 3, 7, 64, 1 << 20]))
        max_line_bytes, batch_lines = rng.choice([1, 3, 10, 1000]), rng.choice([1, 2, 3, 50, 1000])
        fast = list(read_line_batches(path, max_line_bytes, batch_lines))
        reference = list(read_line_batches_python(path, max_line_bytes, batch_lines))
        assert [b.schema for b in fast] == [b.schema for b in reference]
        assert [b.to_pylist() for b in fast] == [b.to_pylist() for b in reference], (data, max_line_bytes, batch_lines)


# -- the whole ingest against the sequential loop it replaced ------------------------


def _reference_ingest(config, lake) -> IngestReport:
    """ingest_landing as it was: one batch after the other, the reference readers and
    parsers, keys deduplicated with an anti join, one commit per batch and table."""
    report = IngestReport()
    con = duckdb.connect()
    con.execute("CREATE TEMP TABLE seen_events (event_id VARCHAR)")
    if lake.exists(SESSION_EVENTS):
        lake.register(con, SESSION_EVENTS, "existing_events")
        con.execute("INSERT INTO seen_events SELECT event_id FROM existing_events")
    sets = {t.name: set(lake.read(t, columns=[t.key[0]]).column(t.key[0]).to_pylist())
            for t in (TRAJECTORIES, ANNOTATIONS, QUARANTINE)}

    def only_new(table, rows):
        if rows.num_rows == 0:
            return rows
        if table is SESSION_EVENTS:
            con.register("incoming", rows)
            fresh = con.execute("SELECT * FROM incoming ANTI JOIN seen_events USING (event_id)").to_arrow_table()
            con.unregister("incoming")
            return fresh.select(rows.column_names)
        mask = [k not in sets[table.name] for k in rows.column(table.key[0]).to_pylist()]
        return rows.filter(pa.array(mask))

    def remember(table, rows):
        if table is SESSION_EVENTS:
            con.register("incoming", rows)
            con.execute("INSERT INTO seen_events SELECT event_id FROM incoming")
            con.unregister("incoming")
        else:
            sets[table.name].update(rows.column(table.key[0]).to_pylist())

    for landing_file in pending_files(config, lake):
        table = TARGETS[landing_file.kind]
        rows_new = duplicates = lines = 0
        quarantined: Counter = Counter()
        for batch in read_line_batches_python(landing_file.path, config.ingest.max_line_bytes,
                                              config.ingest.batch_lines):
            lines += batch.num_rows
            if landing_file.kind == "events":
                good, bad = parse_event_lines_reference(con, batch, landing_file.relative)
            else:
                good, bad = parse_python(batch, landing_file)
            fresh = only_new(table, good)
            known_bad = only_new(QUARANTINE, bad)
            # repeats of an earlier line of the batch (the parser keeps the first), of stored
            # rows, and of lines quarantined before
            duplicates += (batch.num_rows - good.num_rows - bad.num_rows) + (good.num_rows - fresh.num_rows) \
                + (bad.num_rows - known_bad.num_rows)
            bad = known_bad
            if fresh.num_rows:
                lake.append(table, fresh)
            if bad.num_rows:
                lake.append(QUARANTINE, bad)
            remember(table, fresh)
            remember(QUARANTINE, bad)
            rows_new += fresh.num_rows
            quarantined.update(bad.column("reason_code").to_pylist())
        report.rows_new[landing_file.kind] += rows_new
        report.duplicates[landing_file.kind] += duplicates
        report.quarantined.update(quarantined)
        lake.append(INGESTED_FILES, pa.Table.from_pylist([{
            "source_file": landing_file.relative, "kind": landing_file.kind, "size_bytes": landing_file.size_bytes,
            "mtime_ns": landing_file.mtime_ns, "lines": lines, "rows_new": rows_new, "rows_duplicate": duplicates,
            "rows_quarantined": sum(quarantined.values()), "ingested_at": utcnow()}], schema=INGESTED_FILES.schema))
        report.files.append({"file": landing_file.relative, "lines": lines, "new": rows_new,
                             "duplicates": duplicates, "quarantined": sum(quarantined.values())})
    return report


def _landing_files(rng: random.Random, size: int) -> dict[str, bytes]:
    """A landing zone with every kind of line, blank lines, CRLF, gz, repeats across files."""
    lines = [event_line(rng, ids=40) for _ in range(size)]
    lines += [json.dumps({"event_id": f"ev-{i}", "session_id": "s", "user_id": "u",
                          "event_type": "output_accepted", "ts": "2026-11-26T10:00:00Z"}) for i in range(30)]
    lines += BAD_LINES + ['{"session_id": "s\xff\xfe"}', json.dumps({"session_id": "s", "data": {"blob": "x" * 500}}),
              json.dumps({"session_id": "s", "user_id": "u", "event_type": "x", "ts": "2026-11-26T10:00:00Z",
                          "data": {"blob": "\u00e9" * 300}})]
    rng.shuffle(lines)
    files: dict[str, bytes] = {}
    chunks = [lines[i:i + size // 5] for i in range(0, len(lines), size // 5)]
    for k, chunk in enumerate(chunks):
        body = b""
        for line in chunk:
            raw = line.encode("utf-8", "surrogateescape") if "\xff" not in line else line.encode("latin-1")
            body += raw + rng.choice([b"\n"] * 6 + [b"\r\n", b"\n\n", b"\n  \n", b"\n\t\r\n", b"\n\x0c\n"])
        if k % 3 == 1:
            body = body.rstrip(b"\n")  # no newline after the last line
        name = f"events/part-{k:02d}.jsonl" + (".gz" if k % 4 == 2 else "")
        files[name] = gzip.compress(body) if name.endswith(".gz") else body
    files["events/again.jsonl"] = files["events/part-00.jsonl"]  # the same lines dropped again
    files["events/empty.jsonl"] = b""
    files["events/blank.jsonl"] = b"\n \n\r\n"
    label = b'{"trajectory_id": "h1", "score": 1, "annotated_at": "2026-11-26T10:00:00Z"}'
    files["annotations/labels.jsonl"] = label + b'\n{"score": 1}\n\n' + label + b"\n"
    return files


@pytest.mark.parametrize("batch_lines,block_bytes,size", [(7, 97, 300), (64, 1 << 20, 1000), (500_000, 1 << 24, 1000)])
def test_ingest_gives_the_tables_the_reference_loop_gives(tmp_path, monkeypatch, batch_lines, block_bytes, size):
    monkeypatch.delenv("FLYWHEEL_LAKE_URI", raising=False)
    monkeypatch.setattr(landing, "_BLOCK_BYTES", block_bytes)
    files = _landing_files(random.Random(batch_lines), size)
    results = []
    for name, ingest in (("fast", ingest_landing), ("reference", _reference_ingest)):
        config = load_config(home=tmp_path / name)
        config.ingest.batch_lines = batch_lines
        config.ingest.max_line_bytes = 400
        for position, (relative, body) in enumerate(files.items()):
            path = config.landing / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            stamp = 1_700_000_000_000_000_000 + position * 1_000_000  # the order files are ingested in
            os.utime(path, ns=(stamp, stamp))
        lake = Lake(config)
        report = ingest(config, lake) if ingest is _reference_ingest else ingest(config, lake, log=lambda _: None)
        if ingest is ingest_landing:
            assert ingest_landing(config, lake, log=lambda _: None).files == []  # the ledger knows them all
        results.append((report, {
            "events": _rows(lake.read(SESSION_EVENTS), "event_id"),
            "quarantine": _rows(lake.read(QUARANTINE), "quarantine_id"),
            "ledger": _rows(lake.read(INGESTED_FILES), "source_file"),
            "annotations": _rows(lake.read(ANNOTATIONS), "annotation_id"),
        }))
    (fast, fast_tables), (reference, reference_tables) = results
    assert fast.files == reference.files
    assert (fast.rows_new, fast.duplicates, fast.quarantined) == (reference.rows_new, reference.duplicates,
                                                                  reference.quarantined)
    for name in fast_tables:
        assert fast_tables[name] == reference_tables[name], name
    assert len(fast_tables["events"]) > 50 and len(fast_tables["quarantine"]) > 20
    assert fast.duplicates["events"] > 0 and set(fast.quarantined) >= {
        "malformed_json", "not_an_object", "missing_key", "wrong_type", "invalid_value", "not_utf8", "oversized"}
