import random

import pytest

from flywheel_assets.lib.curation.dedup import find_duplicates, lsh_bands, minhash_signatures, normalize

CALCULATOR_CHAT = (
    'user: What is {a} + {b}? assistant: <tool_call>{{"name": "calculator", "arguments": '
    '{{"expression": "{a} + {b}"}}}}</tool_call> tool: {total} assistant: The answer is {total}.'
)
LONG_TEXT_WORDS = [f"word{i}" for i in range(200)]


def long_text(replace_at: int | None = None) -> str:
    words = list(LONG_TEXT_WORDS)
    if replace_at is not None:
        words[replace_at] = "changed"
    return " ".join(words)


def shingle_jaccard(first: str, second: str) -> float:
    def shingles(text: str) -> set[tuple[str, ...]]:
        words = normalize(text).split()
        return set(zip(words, words[1:], words[2:]))

    a, b = shingles(first), shingles(second)
    return len(a & b) / len(a | b)


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("Hello,   World!", "hello world"),
        ("What is 663+859?", "what is 663 859"),
        ("  Tabs\tand\nnewlines ", "tabs and newlines"),
        ("snake_case-name", "snake case name"),
        ("Ünïcode STRASSE straße", "ünïcode strasse straße"),
        ("", ""),
    ],
)
def test_normalize(text, normalized):
    assert normalize(text) == normalized


@pytest.mark.parametrize(
    "num_perm, threshold, bands_rows",
    [(64, 0.9, (9, 7)), (64, 0.5, (32, 2)), (128, 0.8, (21, 6)), (16, 0.9, (5, 3))],
)
def test_lsh_bands_take_the_most_rows_that_keep_99_percent_recall(num_perm, threshold, bands_rows):
    assert lsh_bands(num_perm, threshold) == bands_rows


def test_exact_duplicate_ignores_case_whitespace_and_punctuation():
    result = find_duplicates(["a", "b", "c"], ["Hello   World", "hello world!", "hello there world"], [1.0, 1.0, 1.0])
    assert result == [("kept", None), ("exact_duplicate", "a"), ("kept", None)]


def test_highest_priority_is_kept():
    result = find_duplicates(["x", "y", "z"], ["same text here"] * 3, [0.1, 0.9, 0.5])
    assert result == [("exact_duplicate", "y"), ("kept", None), ("exact_duplicate", "y")]


def test_priority_tie_keeps_the_smallest_id_wherever_it_stands():
    result = find_duplicates(["b", "a"], ["same text here", "same text here"], [0.5, 0.5])
    assert result == [("exact_duplicate", "a"), ("kept", None)]


def test_one_word_changed_in_a_long_text_is_a_near_duplicate():
    changed = long_text(replace_at=100)
    assert shingle_jaccard(long_text(), changed) == pytest.approx(195 / 201)
    result = find_duplicates(["a", "b"], [long_text(), changed], [0.0, 1.0])
    assert result == [("near_duplicate", "b"), ("kept", None)]


def test_calculator_chats_that_differ_only_in_numbers_are_kept_apart():
    first = CALCULATOR_CHAT.format(a=663, b=859, total=1522)
    second = CALCULATOR_CHAT.format(a=663, b=858, total=1521)
    assert shingle_jaccard(first, second) == pytest.approx(11 / 31)
    assert find_duplicates(["a", "b"], [first, second], [1.0, 1.0]) == [("kept", None), ("kept", None)]


def test_exact_copy_of_a_near_duplicate_points_at_the_kept_row():
    texts = [long_text(), long_text(replace_at=100), long_text(replace_at=100).upper()]
    result = find_duplicates(["kept", "near", "copy"], texts, [2.0, 1.0, 0.0])
    assert result == [("kept", None), ("near_duplicate", "kept"), ("near_duplicate", "kept")]


@pytest.mark.parametrize(
    "texts, statuses",
    [
        (["hi there", "hi there!"], ["kept", "exact_duplicate"]),
        (["hi there", "hi where"], ["kept", "kept"]),
        (["ok", "ok ok ok ok"], ["kept", "kept"]),
    ],
)
def test_short_texts_are_one_shingle(texts, statuses):
    assert [status for status, _ in find_duplicates(["a", "b"], texts, [1.0, 0.0])] == statuses


def test_signatures_agree_only_as_far_as_the_texts_do():
    signatures = minhash_signatures([normalize(long_text()), normalize(long_text()), "something else entirely"], 64, 0)
    assert signatures.shape == (3, 64)
    assert (signatures[0] == signatures[1]).all()
    assert (signatures[0] == signatures[2]).sum() == 0


def generated_corpus(seed: int) -> tuple[list[str], list[str], list[float]]:
    rng = random.Random(seed)
    vocabulary = [f"v{i}" for i in range(300)]
    texts = []
    for row in range(300):
        if row % 3 == 1:
            texts.append(texts[-1].upper())
        elif row % 3 == 2:
            words = texts[-2].split()
            words[-1] = "tail"
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choices(vocabulary, k=120)))
    ids = [f"id{row:04d}" for row in range(len(texts))]
    return ids, texts, [rng.random() for _ in texts]


def test_every_duplicate_points_at_a_kept_row():
    ids, texts, priority = generated_corpus(seed=1)
    result = dict(zip(ids, find_duplicates(ids, texts, priority)))
    kept = {row_id for row_id, (status, _) in result.items() if status == "kept"}
    assert len(kept) == 100
    assert all(duplicate_of in kept for status, duplicate_of in result.values() if status != "kept")


def test_result_is_deterministic_and_independent_of_row_order():
    ids, texts, priority = generated_corpus(seed=2)
    expected = find_duplicates(ids, texts, priority)
    assert find_duplicates(ids, texts, priority) == expected

    shuffled = list(range(len(ids)))
    random.Random(0).shuffle(shuffled)
    result = find_duplicates([ids[i] for i in shuffled], [texts[i] for i in shuffled], [priority[i] for i in shuffled])
    assert result == [expected[i] for i in shuffled]


def test_empty_input_and_mismatched_lengths():
    assert find_duplicates([], [], []) == []
    with pytest.raises(ValueError):
        find_duplicates(["a"], ["text", "more"], [1.0])


@pytest.mark.parametrize(("hash_block", "text_chunk"), [(1, 10**9), (7, 10**9), (500, 10**9), (500, 1), (7, 300)])
def test_signatures_do_not_depend_on_how_the_hashing_is_split(monkeypatch, hash_block, text_chunk):
    from flywheel_assets.lib.curation import dedup

    rng = random.Random(3)
    texts = [" ".join(f"w{rng.randrange(300)}" for _ in range(rng.randrange(0, 60))) for _ in range(200)] + ["a b"]
    monkeypatch.setattr(dedup, "_TEXT_CHUNK", 10**9)
    whole = minhash_signatures(texts, 64, 0)  # every hash of a text in one block, every text in one chunk
    monkeypatch.setattr(dedup, "_HASH_BLOCK", hash_block)
    monkeypatch.setattr(dedup, "_TEXT_CHUNK", text_chunk)  # texts (of at least one) of up to this many characters
    assert (minhash_signatures(texts, 64, 0) == whole).all()


def plain_signature(text: str, num_perm: int, seed: int) -> list[int]:
    """MinHash as the module documents it, one text and one shingle at a time, in Python integers."""
    import zlib

    from flywheel_assets.lib.curation import dedup

    def mix(value: int) -> int:
        value = ((value ^ (value >> 30)) * int(dedup._MIX_1)) % 2**64
        value = ((value ^ (value >> 27)) * int(dedup._MIX_2)) % 2**64
        return value ^ (value >> 31)

    words = text.split() if len(text.split()) >= 3 else [text]
    hashes = [zlib.crc32(word.encode("utf-8", "surrogatepass")) for word in words]
    width = 3 if len(words) >= 3 else 1
    shingles = {mix(sum(word * int(weight) for word, weight in zip(hashes[start:start + width], dedup._WORD_WEIGHTS))
                    % 2**64) >> 32 for start in range(len(words) - width + 1)}
    rng = __import__("numpy").random.default_rng(seed)
    multipliers = rng.integers(0, 2**64, size=num_perm, dtype="uint64") | 1
    offsets = rng.integers(0, 2**64, size=num_perm, dtype="uint64")
    return [min(((int(a) * shingle + int(b)) % 2**64) >> 32 for shingle in shingles)
            for a, b in zip(multipliers, offsets)]


@pytest.mark.parametrize("surrogate", [False, True])
def test_signatures_equal_a_plain_one_text_at_a_time_minhash(surrogate):
    rng = random.Random(4)
    texts = ["", "a", "a b", "a b c", "été à la plage", "ß straße 東京 タワー", "x" * 40]
    texts += [" ".join(f"w{rng.randrange(40)}" for _ in range(rng.randrange(0, 12))) for _ in range(60)]
    texts = [normalize(text) for text in texts] + (["a\ud800 b c"] if surrogate else [])  # Arrow cannot hold it
    signatures = minhash_signatures(texts, 16, 5)
    assert [row.tolist() for row in signatures] == [plain_signature(text, 16, 5) for text in texts]
