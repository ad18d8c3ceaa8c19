"""curated_trajectories refreshed from what changed, equal to curating everything again.

A curated row follows its trajectory_scores row (tier, weight, split, ...), its logged
conversation and its user's latest edit; its dedup status follows the rows its text
resembles. A refresh (lib/feedback/refresh.py's watermarks) takes the trajectories whose
score row changed, that were newly logged or newly edited, and

- rebuilds the conversation (messages, scrubbing, LSH keys) of the new and newly edited
  ones (reading their history once); a known one keeps its stored messages and takes its new
  score fields;
- re-runs de-duplication over every stored row linked to them as find_duplicates links two
  rows (a shared LSH band key, looked up in `lsh_keys`, then MinHash signatures agreeing at
  the threshold), from their texts as they are now and as they were, followed link by link
  until nothing new joins. That set holds whole duplicate groups, old and new, and greedy
  de-duplication decides a group from its own rows only, so the statuses are the ones a
  full run gives (flywheel_assets_tests/curation/test_refresh_curated.py compares them);
- writes the rows that changed (a rescore that moves nothing curated writes nothing) and the
  linked ones whose status changed, rewriting only their days' partitions (created_day).

Rows deleted (forget, retention) are deleted from the bronze inputs too, which the
watermarks notice: the refresh then recomputes in full.
"""

from __future__ import annotations

import math
from itertools import chain

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from flywheel_assets.lib.arrays import distinct, items_among
from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation.curate import (
    CONTENT_FIELDS, SCORE_FIELDS, Signatures, content_fields, curate, mark_duplicates, score_fields, user_edits,
)
from flywheel_assets.lib.curation.dedup import similar
from flywheel_assets.lib.feedback.refresh import Feed, Refresh, StaleWatermark, fingerprint
from flywheel_assets.lib.feedback.refresh_scores import Outcome, run_refresh
from flywheel_assets.lib.lake import Lake, conform
from flywheel_assets.lib.storage.key_index import keyed
from flywheel_assets.lib.tables import CURATED_TRAJECTORIES, SESSION_EVENTS, TRAJECTORIES, TRAJECTORY_SCORES

SCORES = Feed(TRAJECTORY_SCORES, "updated_at", append_only=False)
LOGGED = Feed(TRAJECTORIES, "ingested_at")
EDITS = Feed(SESSION_EVENTS, "ingested_at")  # only its output_edited events are kept
_EDITED = "event_type = 'output_edited' AND trajectory_id IS NOT NULL"
_EDIT_COLUMNS = ["trajectory_id", "event_id", "event_type", "data_json", "ts"]
# Part of the fingerprint: raise it when what a stored row holds would come out otherwise
# (to_messages, scrubbing, _dedup_text, the LSH hashing), so stored rows are rebuilt in full once
# (a scrubbing fix reaches the history; old lsh_keys never meet new ones).
CURATION_FORMAT = 1
_CONVERSATION = ["trajectory_id", "turns", "tool_calls", "tools_json", "user_prompt"]


def refresh_curated_trajectories(lake: Lake, config: FlywheelConfig, full: bool = False) -> Outcome:
    def body(refresh: Refresh, con: duckdb.DuckDBPyConnection):
        versions = refresh.versions
        rescored = refresh.read_new(SCORES, ["trajectory_id"])
        # (in a full recompute these reads are the whole history: the conversations and edits it curates)
        logged = refresh.read_new(LOGGED, _CONVERSATION)
        edited = refresh.read_new(EDITS, _EDIT_COLUMNS, where=_EDITED)
        if refresh.full:
            rows = curate(lake.read(TRAJECTORY_SCORES, list(SCORE_FIELDS), version=versions[TRAJECTORY_SCORES.name]),
                          logged, config, user_edits(edited))
            return rows, set(rows.column("created_day").to_pylist())
        newly_edited = set(edited.column("trajectory_id").to_pylist())
        affected = set(rescored.column("trajectory_id").to_pylist()) | set(logged.column("trajectory_id").to_pylist()) \
            | newly_edited
        con.register("affected", pa.table({"key": pa.array(sorted(affected), pa.string())}))
        scores = keyed(con, lake, TRAJECTORY_SCORES, "trajectory_id", "affected", list(SCORE_FIELDS),
                       versions[TRAJECTORY_SCORES.name]).to_pylist()
        old = {row["trajectory_id"]: row for row in keyed(con, lake, CURATED_TRAJECTORIES, "trajectory_id",
                                                          "affected").to_pylist()}
        if gone := set(old) - {score["trajectory_id"] for score in scores}:
            raise StaleWatermark(f"{len(gone)} curated rows lost their score row")
        signatures = Signatures(config)
        rows = _changed_rows(con, lake, config, refresh, scores, old, newly_edited, logged, signatures)
        linked = _linked(con, lake, config, [*rows.values(), *old.values()], set(rows) | set(old), signatures)
        mark_duplicates([*rows.values(), *linked], config, signatures)
        # only what changed: a rescore that moved nothing curated here, and a linked row whose status
        # held, stay as stored
        written = [row for row in rows.values() if _differs(row, old.get(row["trajectory_id"]))] \
            + [row for row in linked if (row["dedup_status"], row["duplicate_of"])
               != (row["was_status"], row["was_duplicate_of"])]
        table = conform(pa.Table.from_pylist(written), CURATED_TRAJECTORIES) if written \
            else CURATED_TRAJECTORIES.schema.empty_table()
        return table, _days(written) | _days(old[row["trajectory_id"]] for row in written if row["trajectory_id"] in old)

    curation = config.curation
    settings = fingerprint("curated_trajectories", CURATION_FORMAT, curation.holdout_fraction,
                           curation.near_duplicate_jaccard, curation.seed, config.tenancy.model_dump())
    return run_refresh(lake, CURATED_TRAJECTORIES, (SCORES, LOGGED, EDITS), settings, full, body)


def _changed_rows(con, lake: Lake, config: FlywheelConfig, refresh: Refresh, scores: list[dict],
                  old: dict[str, dict], newly_edited: set[str], logged: pa.Table,
                  signatures: Signatures) -> dict[str, dict]:
    """The new curated rows of the scored trajectories among those affected (a trajectory not yet
    scored, or scored but not yet logged, waits, as it does in a full run). The conversations
    to rebuild come from the newly `logged` rows, the history only for the others."""
    rebuild = sorted(score["trajectory_id"] for score in scores
                     if score["trajectory_id"] not in old or score["trajectory_id"] in newly_edited)
    rebuild_keys = pa.array(rebuild, pa.string())
    conversations = logged.filter(pc.is_in(logged.column("trajectory_id"), value_set=rebuild_keys))
    if earlier := sorted(set(rebuild) - set(conversations.column("trajectory_id").to_pylist())):
        con.register("earlier", pa.table({"key": pa.array(earlier, pa.string())}))
        history = keyed(con, lake, TRAJECTORIES, "trajectory_id", "earlier", _CONVERSATION,
                        refresh.versions[TRAJECTORIES.name])
        conversations = pa.concat_tables([conversations.select(_CONVERSATION), history.select(_CONVERSATION)],
                                         promote_options="permissive")
    con.register("rebuild", pa.table({"key": rebuild_keys}))
    edits = user_edits(keyed(con, lake, SESSION_EVENTS, "trajectory_id", "rebuild", _EDIT_COLUMNS,
                             refresh.versions[SESSION_EVENTS.name]))
    built = content_fields(conversations, edits, config, signatures)
    contents = dict(zip(conversations.column("trajectory_id").to_pylist(), built))
    for trajectory_id, row in old.items():
        contents.setdefault(trajectory_id, {name: row[name] for name in CONTENT_FIELDS})
    rows = score_fields([score for score in scores if score["trajectory_id"] in contents], config)
    for row in rows:
        row.update(contents[row["trajectory_id"]])
    return {row["trajectory_id"]: row for row in rows}


def _linked(con, lake: Lake, config: FlywheelConfig, seeds: list[dict], known: set[str],
            signatures: Signatures) -> list[dict]:
    """The stored rows (other than `known`) a seed row resembles as find_duplicates judges it (a
    shared LSH band key, then signatures agreeing at the threshold), and the rows those resemble,
    and so on: with the seeds, whole duplicate groups. Each carries its stored status as
    was_status and was_duplicate_of."""
    threshold = config.curation.near_duplicate_jaccard
    frontier, found, fetched = seeds, {}, {}
    while frontier:
        # one check per distinct text pair: copies of one text share their keys and their verdict
        position = {text: index for index, text in enumerate(dict.fromkeys(row["messages_json"] for row in frontier))}
        counts = np.fromiter((len(row["lsh_keys"] or ()) for row in frontier), np.int64, len(frontier))
        keys = np.fromiter(chain.from_iterable(row["lsh_keys"] or () for row in frontier), np.int64, counts.sum())
        texts = np.repeat(np.fromiter((position[row["messages_json"]] for row in frontier), np.int64, len(frontier)),
                          counts)
        frontier_keys = distinct(keys)
        con.register("frontier", pa.table({"key": frontier_keys}))
        # the stored rows holding one of those band keys (the key index finds their files)
        stored = keyed(con, lake, CURATED_TRAJECTORIES, "lsh_keys", "frontier", ["trajectory_id", "lsh_keys"])
        stored = stored.filter(pc.invert(pc.is_in(stored.column("trajectory_id"),
                                                  value_set=pa.array(sorted(known | set(found)), pa.string()))))
        if not stored.num_rows:
            break
        shared = _keys_among(stored, frontier_keys)
        # the frontier's texts holding each key a stored row shares
        matched = np.isin(keys, np.fromiter(set().union(*shared.values()), np.int64))
        owners: dict[int, set[int]] = {}
        for key, text in zip(keys[matched].tolist(), texts[matched].tolist()):
            owners.setdefault(key, set()).add(text)
        # signatures of those texts only (a text that shares no key needs none)
        partner_texts = sorted(set().union(*owners.values()))
        slot = {text: index for index, text in enumerate(partner_texts)}
        text_of = list(position)
        text_signatures = signatures.of([{"messages_json": text_of[text]} for text in partner_texts])
        if unfetched := sorted(set(shared) - set(fetched)):
            con.register("candidates", pa.table({"key": pa.array(unfetched, pa.string())}))
            fetched.update((row["trajectory_id"], row) for row in
                           keyed(con, lake, CURATED_TRAJECTORIES, "trajectory_id", "candidates").to_pylist())
        candidates = [fetched[trajectory_id] for trajectory_id in sorted(shared)]
        verdicts: dict[tuple[str, frozenset], bool] = {}
        frontier = []
        for row, signature in zip(candidates, signatures.of(candidates)):
            partners = frozenset(index for key in shared[row["trajectory_id"]] for index in owners[key])
            verdict = (row["messages_json"], partners)
            if verdict not in verdicts:
                verdicts[verdict] = bool(similar(text_signatures[[slot[text] for text in sorted(partners)]], signature,
                                                 threshold).any())
            if verdicts[verdict]:
                row["was_status"], row["was_duplicate_of"] = row["dedup_status"], row["duplicate_of"]
                found[row["trajectory_id"]] = row
                frontier.append(row)
    return list(found.values())


def _keys_among(stored: pa.Table, keys: np.ndarray) -> dict[str, set[int]]:
    """trajectory_id -> the lsh_keys of that stored row that are among `keys`."""
    rows, items = items_among(stored.column("lsh_keys"), pl.Series(keys, dtype=pl.Int64))
    ids = stored.column("trajectory_id").to_pylist()
    shared: dict[str, set[int]] = {}
    for row, key in zip(rows.tolist(), items.to_list()):
        shared.setdefault(ids[row], set()).add(key)
    return shared


def _differs(row: dict, stored: dict | None) -> bool:
    if stored is None:
        return True
    for name in CURATED_TRAJECTORIES.schema.names:
        if name == "updated_at":
            continue
        new, was = row.get(name), stored.get(name)
        if new != was and not (isinstance(new, float) and isinstance(was, float) and math.isnan(new) and math.isnan(was)):
            return True
    return False


def _days(rows) -> set:
    return {row["created_day"] for row in rows}
