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

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from flywheel_assets.lib.arrays import distinct, items_among, rows_at
from flywheel_assets.lib.config import FlywheelConfig
from flywheel_assets.lib.curation.curate import (
    CONTENT_FIELDS, SCORE_FIELDS, Signatures, content_fields, curate, mark_duplicates, score_fields, user_edits,
    with_contents,
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
_SEED = ["trajectory_id", "messages_json", "lsh_keys"]


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
        affected = pc.unique(_ids(rescored, logged, edited))
        con.register("affected", pa.table({"key": affected.take(pc.array_sort_indices(affected))}))
        scores = keyed(con, lake, TRAJECTORY_SCORES, "trajectory_id", "affected", list(SCORE_FIELDS),
                       versions[TRAJECTORY_SCORES.name])
        old = conform(keyed(con, lake, CURATED_TRAJECTORIES, "trajectory_id", "affected"), CURATED_TRAJECTORIES)
        if gone := pc.sum(pc.invert(pc.is_in(old.column("trajectory_id"), value_set=_ids(scores)))).as_py():
            raise StaleWatermark(f"{gone} curated rows lost their score row")
        signatures = Signatures(config)
        rows = _changed_rows(con, lake, config, refresh, scores, old, _ids(edited), logged, signatures)
        linked = _linked(con, lake, config, pa.concat_tables([rows.select(_SEED), old.select(_SEED)]),
                         _ids(rows, old), signatures)
        marked = mark_duplicates(pa.concat_tables([rows, linked]), config, signatures)
        # only what changed: a rescore that moved nothing curated here, and a linked row whose status
        # held, stay as stored
        rows, now_linked = marked.slice(0, rows.num_rows), marked.slice(rows.num_rows)
        written = pa.concat_tables([rows.filter(_differs(rows, old)),
                                    now_linked.filter(_differs(now_linked, linked, ["dedup_status", "duplicate_of"]))])
        rewritten = old.filter(pc.is_in(old.column("trajectory_id"), value_set=_ids(written)))
        return written, _days(written) | _days(rewritten)

    curation = config.curation
    settings = fingerprint("curated_trajectories", CURATION_FORMAT, curation.holdout_fraction,
                           curation.near_duplicate_jaccard, curation.seed, config.tenancy.model_dump())
    return run_refresh(lake, CURATED_TRAJECTORIES, (SCORES, LOGGED, EDITS), settings, full, body)


def _changed_rows(con, lake: Lake, config: FlywheelConfig, refresh: Refresh, scores: pa.Table, old: pa.Table,
                  newly_edited: pa.Array, logged: pa.Table, signatures: Signatures) -> pa.Table:
    """The new curated rows (CURATED_TRAJECTORIES, not yet de-duplicated) of the scored
    trajectories among those affected (a trajectory not yet scored, or scored but not yet logged,
    waits, as it does in a full run). The conversations to rebuild are the new and newly edited
    ones, read from the newly `logged` rows, the history only for the others; the others keep
    their stored content."""
    ids = _ids(scores)
    rebuild_keys = ids.filter(pc.or_(pc.invert(pc.is_in(ids, value_set=_ids(old))),
                                     pc.is_in(ids, value_set=newly_edited)))
    conversations = logged.filter(pc.is_in(logged.column("trajectory_id"), value_set=rebuild_keys))
    conversations = conversations.select(_CONVERSATION)
    earlier = rebuild_keys.filter(pc.invert(pc.is_in(rebuild_keys, value_set=_ids(conversations))))
    if len(earlier):
        con.register("earlier", pa.table({"key": earlier}))
        history = keyed(con, lake, TRAJECTORIES, "trajectory_id", "earlier", _CONVERSATION,
                        refresh.versions[TRAJECTORIES.name])
        conversations = pa.concat_tables([conversations, history.select(_CONVERSATION)], promote_options="permissive")
    con.register("rebuild", pa.table({"key": rebuild_keys}))
    edits = user_edits(keyed(con, lake, SESSION_EVENTS, "trajectory_id", "rebuild", _EDIT_COLUMNS,
                             refresh.versions[SESSION_EVENTS.name]))
    built = content_fields(conversations, edits, config, signatures)
    kept = old.filter(pc.invert(pc.is_in(old.column("trajectory_id"), value_set=_ids(built))))
    schema = pa.schema([CURATED_TRAJECTORIES.schema.field(name) for name in ["trajectory_id", *CONTENT_FIELDS]])
    contents = pa.concat_tables([built.select(schema.names).cast(schema), kept.select(schema.names)])
    return conform(with_contents(score_fields(scores, config), contents), CURATED_TRAJECTORIES)


def _linked(con, lake: Lake, config: FlywheelConfig, seeds: pa.Table, known: pa.Array,
            signatures: Signatures) -> pa.Table:
    """The stored rows (CURATED_TRAJECTORIES, other than those `known`) a seed row (trajectory_id,
    messages_json, lsh_keys) resembles as find_duplicates links two rows (a shared LSH band key,
    then signatures agreeing at the threshold), and the rows those resemble, and so on: with the
    seeds, whole duplicate groups."""
    threshold = config.curation.near_duplicate_jaccard
    frontier, found, fetched, fetched_ids = seeds, [], [], set()
    while frontier.num_rows:
        keys = pc.list_flatten(frontier.column("lsh_keys")).to_numpy()
        rows_of_keys = np.repeat(np.arange(frontier.num_rows),
                                 pc.fill_null(pc.list_value_length(frontier.column("lsh_keys")), 0).to_numpy())
        frontier_keys = distinct(keys)
        con.register("frontier", pa.table({"key": frontier_keys}))
        # the stored rows holding one of those band keys (the key index finds their files)
        stored = keyed(con, lake, CURATED_TRAJECTORIES, "lsh_keys", "frontier", ["trajectory_id", "lsh_keys"])
        stored = stored.filter(pc.invert(pc.is_in(stored.column("trajectory_id"), value_set=_ids(known, *found))))
        if not stored.num_rows:
            break
        shared = _keys_among(stored, frontier_keys)
        # the frontier's texts holding each key a stored row shares (one check per distinct text pair:
        # copies of one text share their keys and their verdict)
        matched = np.isin(keys, np.fromiter(set().union(*shared.values()), np.int64))
        owner_rows = distinct(rows_of_keys[matched])
        owner_texts = rows_at(frontier.column("messages_json"), owner_rows).to_pylist()
        position = {text: index for index, text in enumerate(dict.fromkeys(owner_texts))}
        text_at = dict(zip(owner_rows.tolist(), map(position.__getitem__, owner_texts)))
        owners: dict[int, set[int]] = {}
        for key, row in zip(keys[matched].tolist(), rows_of_keys[matched].tolist()):
            owners.setdefault(key, set()).add(text_at[row])
        # signatures of those texts only (a text that shares no key needs none)
        text_signatures = signatures.of(list(position))
        if unfetched := sorted(set(shared) - fetched_ids):
            con.register("candidates", pa.table({"key": pa.array(unfetched, pa.string())}))
            fetched.append(conform(keyed(con, lake, CURATED_TRAJECTORIES, "trajectory_id", "candidates"),
                                   CURATED_TRAJECTORIES))
            fetched_ids.update(unfetched)
        every = pa.concat_tables(fetched)
        candidates = every.filter(pc.is_in(every.column("trajectory_id"),
                                           value_set=pa.array(list(shared), pa.string())))
        ids, texts = (candidates.column(name).to_pylist() for name in ("trajectory_id", "messages_json"))
        verdicts: dict[tuple[str, frozenset], bool] = {}
        similar_rows = []
        for index, (trajectory_id, text, signature) in enumerate(zip(ids, texts, signatures.of(texts))):
            partners = frozenset(owner for key in shared[trajectory_id] for owner in owners[key])
            verdict = (text, partners)
            if verdict not in verdicts:
                verdicts[verdict] = bool(similar(text_signatures[sorted(partners)], signature, threshold).any())
            if verdicts[verdict]:
                similar_rows.append(index)
        frontier = rows_at(candidates, similar_rows)
        found.append(frontier)
    return pa.concat_tables(found) if found else CURATED_TRAJECTORIES.schema.empty_table()


def _keys_among(stored: pa.Table, keys: np.ndarray) -> dict[str, set[int]]:
    """trajectory_id -> the lsh_keys of that stored row that are among `keys`."""
    rows, items = items_among(stored.column("lsh_keys"), pl.Series(keys, dtype=pl.Int64))
    ids = stored.column("trajectory_id").to_pylist()
    shared: dict[str, set[int]] = {}
    for row, key in zip(rows.tolist(), items.to_list()):
        shared.setdefault(ids[row], set()).add(key)
    return shared


def _differs(rows: pa.Table, stored: pa.Table, names: list[str] | None = None) -> pa.ChunkedArray:
    """Whether each row (CURATED_TRAJECTORIES) is not stored, or differs from its stored row in a
    column (`names`; all but updated_at when None); NaN equals NaN."""
    names = names or [name for name in CURATED_TRAJECTORIES.schema.names if name not in ("trajectory_id", "updated_at")]
    new = pl.from_arrow(rows.select(["trajectory_id", *names]))
    was = pl.from_arrow(stored.select(["trajectory_id", *names])).with_columns(stored_=pl.lit(True))
    joined = new.join(was, on="trajectory_id", how="left", suffix="_was", maintain_order="left")
    differs = pl.col("stored_").is_null()
    for name in names:
        differs = differs | pl.col(name).eq_missing(pl.col(f"{name}_was")).not_()
    return pa.chunked_array([joined.select(differs).to_series().to_arrow()])


def _ids(*sources: pa.Table | pa.Array) -> pa.Array:
    """The trajectory_id columns of tables (and arrays of ids), as one string array."""
    chunks = [chunk.cast(pa.string()) for source in sources
              for chunk in ([source] if isinstance(source, pa.Array) else source.column("trajectory_id").chunks)]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def _days(rows: pa.Table) -> set:
    return set(pc.unique(rows.column("created_day")).to_pylist())
