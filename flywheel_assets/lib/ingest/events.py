"""Session events: validate and normalise a batch of raw lines in one DuckDB pass.

JSON is parsed once per line by DuckDB (yyjson), every key is extracted with one
json_extract call, and each line gets either a row or a quarantine reason. A Python
json.loads per line is ~20x slower and would cap ingestion near 130k events/s.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

# (key, JSON path, required, expected json_type family)
_KEYS = (
    ("event_id", "$.event_id", False, "string"),
    ("session_id", "$.session_id", True, "string"),
    ("user_id", "$.user_id", True, "string"),
    ("tenant_id", "$.tenant_id", False, "string"),
    ("event_type", "$.event_type", True, "string"),
    ("ts", "$.ts", True, "string"),
    ("trajectory_id", "$.trajectory_id", False, "string"),
    ("data_trajectory_id", "$.data.trajectory_id", False, "string"),
    ("data", "$.data", False, "object"),
    ("edit_ratio", "$.data.edit_ratio", False, "number"),
)
_TYPES = {"string": "('VARCHAR')", "object": "('OBJECT')", "number": "('BIGINT','UBIGINT','DOUBLE')"}


_ARTICLE = {"string": "a", "object": "an", "number": "a"}


def _json_kind(value: str) -> str:
    return (f"CASE json_type({value}) WHEN 'VARCHAR' THEN 'string' WHEN 'DOUBLE' THEN 'number' "
            f"WHEN 'BIGINT' THEN 'integer' WHEN 'UBIGINT' THEN 'integer' ELSE lower(json_type({value})) END")


def _index(key: str) -> int:
    return [k for k, *_ in _KEYS].index(key) + 1


def _value(key: str) -> str:
    return f"v[{_index(key)}]"


def _reason_cases() -> str:
    cases = [
        "WHEN problem IS NOT NULL THEN problem || '|' || CASE problem WHEN 'oversized' THEN 'line longer than the configured max_line_bytes' ELSE 'line is not valid UTF-8' END",
        "WHEN NOT json_valid(raw) THEN 'malformed_json|line is not valid JSON'",
        "WHEN json_type(raw::JSON) <> 'OBJECT' THEN 'not_an_object|line is JSON ' || json_type(raw::JSON) || ', not an object'",
    ]
    for key, _, required, family in _KEYS:
        value = _value(key)
        shown = "data.trajectory_id" if key == "data_trajectory_id" else ("data.edit_ratio" if key == "edit_ratio" else key)
        if required:
            cases.append(f"WHEN {value} IS NULL OR json_type({value}) = 'NULL' THEN 'missing_key|{shown} is required'")
        if key == "edit_ratio":
            continue  # checked below, only for output_edited
        cases.append(
            f"WHEN {value} IS NOT NULL AND json_type({value}) NOT IN ('NULL') AND json_type({value}) NOT IN {_TYPES[family]} "
            f"THEN 'wrong_type|{shown} must be {_ARTICLE[family]} {family}, got ' || {_json_kind(value)}"
        )
    ratio = _value("edit_ratio")
    cases += [
        f"WHEN {_value('session_id')}->>'$' = '' THEN 'invalid_value|session_id is empty'",
        f"WHEN {_value('user_id')}->>'$' = '' THEN 'invalid_value|user_id is empty'",
        f"WHEN try_cast({_value('ts')}->>'$' AS TIMESTAMPTZ) IS NULL THEN 'invalid_value|ts is not an ISO-8601 timestamp: ' || ({_value('ts')}->>'$')",
        f"WHEN {_value('event_type')}->>'$' = 'output_edited' AND ({ratio} IS NULL OR json_type({ratio}) = 'NULL') "
        "THEN 'missing_key|output_edited needs data.edit_ratio'",
        f"WHEN {_value('event_type')}->>'$' = 'output_edited' AND json_type({ratio}) NOT IN {_TYPES['number']} "
        f"THEN 'wrong_type|data.edit_ratio must be a number, got ' || ({ratio}::VARCHAR)",
        f"WHEN {_value('event_type')}->>'$' = 'output_edited' AND NOT (({ratio})::DOUBLE BETWEEN 0 AND 1) "
        f"THEN 'invalid_value|data.edit_ratio must be within [0, 1], got ' || ({ratio}::VARCHAR)",
    ]
    return "CASE " + " ".join(cases) + " END"


_PATHS = "[" + ", ".join(f"'{path}'" for _, path, _, _ in _KEYS) + "]"

_PARSE_SQL = f"""
WITH extracted AS (
    SELECT source_line, raw, problem, raw_truncated,
           CASE WHEN problem IS NULL AND json_valid(raw) AND json_type(raw::JSON) = 'OBJECT'
                THEN json_extract(raw::JSON, {_PATHS}) END AS v
    FROM lines
)
SELECT source_line, raw, raw_truncated, v, {_reason_cases()} AS reason
FROM extracted
"""

_GOOD_SQL = f"""
SELECT
    coalesce({_value('event_id')}->>'$',
             md5(concat_ws('|', {_value('session_id')}->>'$', {_value('user_id')}->>'$',
                 {_value('event_type')}->>'$', {_value('ts')}->>'$',
                 coalesce({_value('trajectory_id')}->>'$', {_value('data_trajectory_id')}->>'$', ''),
                 coalesce({_value('data')}::VARCHAR, '')))) AS event_id,
    {_value('session_id')}->>'$' AS session_id,
    coalesce({_value('trajectory_id')}->>'$', {_value('data_trajectory_id')}->>'$') AS trajectory_id,
    {_value('user_id')}->>'$' AS user_id,
    coalesce({_value('tenant_id')}->>'$', 'default') AS tenant_id,
    {_value('event_type')}->>'$' AS event_type,
    CAST({_value('ts')}->>'$' AS TIMESTAMPTZ) AS ts,
    CASE WHEN {_value('event_type')}->>'$' = 'output_edited' THEN ({_value('edit_ratio')})::DOUBLE END AS edit_ratio,
    coalesce({_value('data')}::VARCHAR, '{{}}') AS data_json,
    $source_file AS source_file,
    source_line,
    now() AS ingested_at
FROM parsed WHERE reason IS NULL
QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY source_line) = 1
"""

_BAD_SQL = """
SELECT md5($source_file || ':' || source_line::VARCHAR) AS quarantine_id,
       'events' AS kind,
       split_part(reason, '|', 1) AS reason_code,
       substr(reason, strpos(reason, '|') + 1) AS reason,
       raw, raw_truncated, $source_file AS source_file, source_line, now() AS ingested_at
FROM parsed WHERE reason IS NOT NULL
"""


def parse_event_lines(con: duckdb.DuckDBPyConnection, lines: pa.Table, source_file: str) -> tuple[pa.Table, pa.Table]:
    """(valid events, quarantined lines) for one batch from read_line_batches.

    Duplicate event_ids inside the batch keep their first line; duplicates against
    rows already in the lake are removed by the caller.
    """
    con.execute("SET TimeZone = 'UTC'")
    con.register("lines", lines)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE parsed AS {_PARSE_SQL}")
        good = con.execute(_GOOD_SQL, {"source_file": source_file}).to_arrow_table()
        bad = con.execute(_BAD_SQL, {"source_file": source_file}).to_arrow_table()
    finally:
        con.unregister("lines")
        con.execute("DROP TABLE IF EXISTS parsed")
    return good, bad
