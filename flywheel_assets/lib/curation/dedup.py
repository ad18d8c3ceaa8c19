"""Exact and near-duplicate detection for training texts.

Exact duplicates are texts equal after normalisation. Near duplicates are texts whose
word 3-shingle sets have an estimated Jaccard similarity at or above a threshold,
estimated with MinHash and found with LSH banding, so no step compares all pairs.

Numbers are ordinary words here, so a shingle holding one carries it: two tool-use
conversations that differ only in their operands and result differ in every shingle
around each number, and stay apart at the default threshold. (In a text of w words,
one changed word leaves a Jaccard of (w - 5) / (w + 1): below 0.9 until w reaches 59.)

Within a duplicate group the row with the highest priority is kept (ties: smallest id).
Rows are visited in that order and each joins the best kept row it resembles, so every
`duplicate_of` names a kept row that the duplicate itself is similar to.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import pyarrow.compute as pc

from flywheel_assets.lib.arrays import distinct

_PUNCTUATION = re.compile(r"[^\w\s]|_")
_SHINGLE_WORDS = 3
# LSH bands are shaped so that a pair exactly at the threshold becomes a candidate with
# at least this probability; candidates are then checked against the full signature.
_LSH_RECALL = 0.99
_PAIR_CHUNK = 100_000
_HASH_BLOCK = 500_000  # hashes a thread holds: 4 MB, about what a core caches here (4M was ~30% slower)
_HASH_THREADS = min(4, os.cpu_count() or 1)
_TEXT_CHUNK = 4_000_000  # characters of text whose words and shingles are held at once
NUM_PERM = 64

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_WORD_WEIGHTS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9))


def normalize(text: str) -> str:
    """Lower case, punctuation turned into spaces, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still finds 99% of pairs at the threshold.

    More rows per band means fewer dissimilar pairs become candidates.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= _LSH_RECALL:
            best = (bands, rows)
    return best


def _word_hashes(normalized: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The crc32 of every word of every text (a text of fewer than three words: the text as one
    word), concatenated as uint64, and each text's number of words. Texts are split in Arrow and
    each distinct word hashed once (Arrow's dictionary encoding); crc32 rather than hash():
    Python's string hash changes with every process."""
    if not normalized:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    try:
        texts = pl.Series(normalized, dtype=pl.String)
    except UnicodeEncodeError:  # a lone surrogate, which Arrow cannot hold: word by word in Python
        return _word_hashes_in_python(normalized)
    split = pl.DataFrame({"text": texts}).with_columns(words=pl.col("text").str.split(" ")).select(
        pl.when(pl.col("words").list.len() < _SHINGLE_WORDS).then(pl.concat_list("text"))
        .otherwise("words")).to_series()  # (an empty text: one empty word)
    lengths = split.list.len()
    words = pc.dictionary_encode(split.explode().to_arrow())
    hashes = np.fromiter((zlib.crc32(word.encode("utf-8")) for word in words.dictionary.to_pylist()), np.uint64,
                         len(words.dictionary))
    return hashes[words.indices.to_numpy()], lengths.to_numpy().astype(np.int64)


def _word_hashes_in_python(normalized: list[str]) -> tuple[np.ndarray, np.ndarray]:
    known: dict[str, int] = {}
    flat: list[int] = []
    lengths = np.empty(len(normalized), dtype=np.int64)
    for row, text in enumerate(normalized):
        words = text.split(" ")
        if len(words) < _SHINGLE_WORDS:
            words = [text]
        lengths[row] = len(words)
        for word in words:
            if (value := known.get(word)) is None:
                value = known[word] = zlib.crc32(word.encode("utf-8", "surrogatepass"))
            flat.append(value)
    return np.array(flat, dtype=np.uint64), lengths


def _mix(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, so that combined word hashes spread over all 64 bits."""
    values = (values ^ (values >> np.uint64(30))) * _MIX_1
    values = (values ^ (values >> np.uint64(27))) * _MIX_2
    return values ^ (values >> np.uint64(31))


def _shingles(normalized: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every text's word 3-shingles, concatenated, and where each text starts.

    A text of fewer than three words is one shingle: the whole text. The texts are normalized
    (normalize), so their words are what splitting at single spaces gives.
    """
    words, lengths = _word_hashes(normalized)
    short = lengths < _SHINGLE_WORDS  # (such a text is one word: itself)
    counts = np.where(short, 1, lengths - (_SHINGLE_WORDS - 1))
    # every word with the ones following it, then the positions that start a shingle: all but
    # the last two words of each longer text; a one-word text has no following words of its own
    padded = np.concatenate((words, np.zeros(_SHINGLE_WORDS - 1, dtype=np.uint64)))
    combined = words * _WORD_WEIGHTS[0]
    for offset in range(1, _SHINGLE_WORDS):
        combined += padded[offset:offset + len(words)] * _WORD_WEIGHTS[offset]
    word_starts = np.cumsum(lengths) - lengths
    combined[word_starts[short]] = words[word_starts[short]] * _WORD_WEIGHTS[0]
    starts_shingle = np.ones(len(words), dtype=bool)
    ends = (word_starts + lengths)[~short]
    for back in range(1, _SHINGLE_WORDS):
        starts_shingle[ends - back] = False
    return _mix(combined[starts_shingle]) >> np.uint64(32), np.cumsum(counts) - counts


def minhash_signatures(normalized: list[str], num_perm: int, seed: int) -> np.ndarray:
    """(len(normalized), num_perm) uint32 MinHash signatures of the texts' shingle sets.

    Permutation i is the multiply-add-shift hash ((a_i * x + b_i) mod 2^64) >> 32.
    """
    rng = np.random.default_rng(seed)
    multipliers = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
    offsets = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
    signatures = np.empty((len(normalized), num_perm), dtype=np.uint32)
    # texts of about _TEXT_CHUNK characters at a time: their words and shingles are what is held
    read = np.cumsum(np.fromiter(map(len, normalized), np.int64, len(normalized)))  # characters up to each text's end
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        first = 0
        while first < len(normalized):
            before = int(read[first - 1]) if first else 0
            end = max(first + 1, int(np.searchsorted(read, before + _TEXT_CHUNK, side="right")))
            _hash_into(signatures[first:end], normalized[first:end], multipliers, offsets, pool)
            first = end
    return signatures


def _hash_into(signatures: np.ndarray, normalized: list[str], multipliers: np.ndarray, offsets: np.ndarray,
               pool: ThreadPoolExecutor) -> None:
    """minhash_signatures of some texts, written into `signatures` (their rows)."""
    shingles, starts = _shingles(normalized)
    num_perm = len(multipliers)
    ends = np.append(starts[1:], len(shingles))

    def hash_block(task: tuple[int, int, int, int]) -> None:
        first_text, end_text, first_perm, end_perm = task
        perms, texts = slice(first_perm, end_perm), slice(first_text, end_text)
        hashed = np.multiply.outer(multipliers[perms], shingles[starts[first_text]:ends[end_text - 1]])
        hashed += offsets[perms, None]
        hashed >>= np.uint64(32)
        signatures[texts, perms] = np.minimum.reduceat(hashed, starts[texts] - starts[first_text], axis=1).T

    # blocks of texts and permutations holding about _HASH_BLOCK hashes each (the memory a
    # thread holds), hashed side by side: numpy lets go of the GIL in its loops
    tasks, first_text = [], 0
    while first_text < len(normalized):
        end_text = max(first_text + 1, int(np.searchsorted(starts, starts[first_text] + _HASH_BLOCK)))
        block = max(1, _HASH_BLOCK // int(ends[end_text - 1] - starts[first_text]))
        tasks += [(first_text, end_text, first, min(first + block, num_perm)) for first in range(0, num_perm, block)]
        first_text = end_text
    list(pool.map(hash_block, tasks))


def _pairs_within_groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (i, j), i < j, of rows that share a key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    group_start = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    group_size = np.diff(np.concatenate((group_start, [len(keys)])))
    start_of = np.repeat(group_start, group_size)
    # Each sorted position pairs with every later position in its group.
    partners = start_of + np.repeat(group_size, group_size) - 1 - np.arange(len(keys))
    first = np.repeat(np.arange(len(keys)), partners)
    step = np.arange(partners.sum()) - np.repeat(np.cumsum(partners) - partners, partners) + 1
    left, right = order[first], order[first + step]
    return np.minimum(left, right), np.maximum(left, right)


def band_keys(signatures: np.ndarray, threshold: float) -> np.ndarray:
    """(rows, bands) uint64: a hash of each LSH band of each signature. Two rows are candidates
    when they share a band's key; the band's number is hashed in, so keys of different bands
    differ too (a lookup by key alone, as the incremental refresh does, stays within a band)."""
    rows_count, num_perm = signatures.shape
    bands, rows = lsh_bands(num_perm, threshold)
    keys = np.empty((rows_count, bands), dtype=np.uint64)
    for band in range(bands):
        key = np.full(rows_count, band + 1, dtype=np.uint64)
        for column in range(band * rows, (band + 1) * rows):
            key = _mix(key ^ signatures[:, column].astype(np.uint64))
        keys[:, band] = key
    return keys


def text_signatures(texts: list[str], num_perm: int = NUM_PERM, seed: int = 0) -> np.ndarray:
    """The MinHash signatures find_duplicates gives the texts."""
    if not texts:
        return np.empty((0, num_perm), dtype=np.uint32)
    return minhash_signatures([normalize(text) for text in texts], num_perm, seed)


def lsh_keys(signatures: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """band_keys viewed as int64 (Delta has no unsigned type)."""
    return band_keys(signatures, threshold).view(np.int64)


def similar(first: np.ndarray, second: np.ndarray, threshold: float) -> np.ndarray:
    """Whether signatures (the last axis) agree enough for find_duplicates to call two
    candidates near duplicates."""
    return (first == second).mean(axis=-1) >= threshold


def _similar_pairs(signatures: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows whose estimated Jaccard similarity is at least the threshold."""
    rows_count = len(signatures)
    keys = band_keys(signatures, threshold)
    lefts, rights = [], []
    for band in range(keys.shape[1]):
        left, right = _pairs_within_groups(keys[:, band])
        lefts.append(left)
        rights.append(right)
    pair_codes = distinct(np.concatenate(lefts) * rows_count + np.concatenate(rights))
    left, right = pair_codes // rows_count, pair_codes % rows_count
    keep = np.zeros(len(pair_codes), dtype=bool)
    for start in range(0, len(pair_codes), _PAIR_CHUNK):
        chunk = slice(start, start + _PAIR_CHUNK)
        keep[chunk] = similar(signatures[left[chunk]], signatures[right[chunk]], threshold)
    return left[keep], right[keep]


def _nearest_kept(signatures: np.ndarray, threshold: float) -> np.ndarray:
    """For rows already in keep order, the kept row each duplicates, or -1 when kept."""
    earlier, later = _similar_pairs(signatures, threshold)
    duplicate_of = np.full(len(signatures), -1, dtype=np.int64)
    # Sorted by the later row, a row's status is final before any later row consults it,
    # and its best-ranked kept neighbour comes first.
    for position in np.lexsort((earlier, later)):
        row, candidate = later[position], earlier[position]
        if duplicate_of[row] == -1 and duplicate_of[candidate] == -1:
            duplicate_of[row] = candidate
    return duplicate_of


def _keep_order(ids: list[str], priority: list[float]) -> list[int]:
    """Row indices, best first: highest priority, then smallest id. NaN ranks last."""

    def rank(row: int) -> tuple[float, str, int]:
        value = priority[row]
        return (-value if not math.isnan(value) else math.inf, ids[row], row)

    return sorted(range(len(ids)), key=rank)


def find_duplicates(
    ids: list[str],
    texts: list[str],
    priority: list[float],
    near_threshold: float = 0.9,
    num_perm: int = NUM_PERM,
    seed: int = 0,
    signatures: np.ndarray | None = None,
    normalized: list[str] | None = None,
) -> list[tuple[str, str | None]]:
    """(status, duplicate_of) per row: "kept", "exact_duplicate" or "near_duplicate".
    `signatures`: the texts' text_signatures(texts, num_perm, seed), and `normalized`: the texts
    normalized, when the caller has them."""
    if not len(ids) == len(texts) == len(priority):
        raise ValueError("ids, texts and priority must have the same length")
    if not ids:
        return []
    if normalized is None:
        normalized = [normalize(text) for text in texts]
    order = _keep_order(ids, priority)
    representative_of: dict[str, int] = {}
    exact_of = [0] * len(ids)
    for row in order:
        exact_of[row] = representative_of.setdefault(normalized[row], row)
    representatives = [row for row in order if exact_of[row] == row]
    signatures = minhash_signatures([normalized[row] for row in representatives], num_perm, seed) \
        if signatures is None else signatures[representatives]
    nearest = _nearest_kept(signatures, near_threshold)
    near_of = {
        row: representatives[nearest[rank]] for rank, row in enumerate(representatives) if nearest[rank] >= 0
    }
    results: list[tuple[str, str | None]] = []
    for row in range(len(ids)):
        representative = exact_of[row]
        if representative in near_of:
            # An exact copy of a near duplicate is a near duplicate of the same kept row.
            results.append(("near_duplicate", ids[near_of[representative]]))
        elif representative != row:
            results.append(("exact_duplicate", ids[representative]))
        else:
            results.append(("kept", None))
    return results
