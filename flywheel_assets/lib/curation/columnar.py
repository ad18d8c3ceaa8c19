"""Plain conversations curated in Arrow, byte for byte as the per-row path in curate.py does it.

Most logged conversations are plain: turns with a role each and no tool calls. Their chat
messages are their turns as {"role", "content"}, so the JSON that json.dumps(messages,
ensure_ascii=False) writes, the conversation text de-duplication reads, the strings the
scrubbing gate reads and the normalized text (for ASCII text) can all be built for every
row at once. Anything else (tool calls, an edited answer, a control character JSON writes
as \\uXXXX, non-ASCII text to normalize, a gate that fires) goes the per-row way;
flywheel_assets_tests/curation/test_columnar.py checks both give the same.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from flywheel_assets.lib.arrays import per_row

# what json.dumps escapes with a short escape; the other control characters become \uXXXX
_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\b", "\\b"), ("\f", "\\f"))
_OTHER_CONTROL = r"[\x00-\x07\x0b\x0e-\x1f]"
_NOT_ASCII = r"[^\x00-\x7f]"
_ASCII_SPACE = r"[\t\n\x0b\x0c\r\x1c-\x1f ]+"  # what str.split() and re's \s take for space in ASCII


def plain_conversations(conversations: pa.Table) -> pl.DataFrame:
    """Per row of `conversations` (turns, tool_calls): plain, and where plain messages_json,
    joined (scrub.py's _joined: the message strings, a line each), text (curate.py's
    _conversation_text) and normalized (dedup.normalize of text, where text is ASCII)."""
    frame = pl.from_arrow(conversations.select(["turns", "tool_calls"]), rechunk=False)
    turn = pl.element()
    role, content = turn.struct.field("role"), turn.struct.field("content")
    item = pl.concat_str([pl.lit('{"role": '), _quoted(role), pl.lit(', "content": '),
                          pl.when(content.is_null()).then(pl.lit("null")).otherwise(_quoted(content)), pl.lit("}")])
    built = frame.select(
        plain=pl.col("turns").is_not_null() & pl.col("tool_calls").list.len().fill_null(0).eq(0)
        & pl.col("turns").list.eval(role.is_null().any()).list.first().not_().fill_null(True),
        messages_json=pl.lit("[") + pl.col("turns").list.eval(item).list.join(", ") + pl.lit("]"),
        joined=pl.col("turns").list.eval(content).list.drop_nulls().list.join("\n"),
        text=pl.col("turns").list.eval(pl.concat_str([role, pl.lit(": "), content.fill_null("")])
                                       .filter(role != "system")).list.join("\n"),
    )
    built = built.with_columns(plain=pl.col("plain") & pl.col("messages_json").str.contains(_OTHER_CONTROL).not_())
    return built.with_columns(
        pl.when(pl.col("plain")).then(pl.col(name)) for name in ("messages_json", "joined", "text")
    ).with_columns(normalized=pl.when(pl.col("text").str.contains(_NOT_ASCII).not_()).then(
        pl.col("text").str.to_lowercase().str.replace_all("[^a-z0-9]+", " ").str.strip_chars(" ")))


def _quoted(text: pl.Expr) -> pl.Expr:
    for char, escaped in _ESCAPES:
        text = text.str.replace_all(char, escaped, literal=True)
    return pl.lit('"') + text + pl.lit('"')


def prompt_keys(prompts: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    """curate.py's prompt_key of each ASCII prompt (a missing one: the key of ""): the md5 of the
    prompt stripped, in lower case, each run of space one space; null for the others, left to
    prompt_key."""
    prompt = pl.Series(prompts)
    texts = pl.select(pl.when(prompt.fill_null("").str.contains(_NOT_ASCII).not_()).then(
        prompt.fill_null("").str.replace_all(_ASCII_SPACE, " ").str.strip_chars(" ").str.to_lowercase())
    ).to_series().to_arrow()
    return per_row("md5(value)", texts).cast(pa.string())
