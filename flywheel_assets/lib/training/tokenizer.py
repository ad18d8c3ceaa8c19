"""The embedded model's tokenizer, trained locally with `tokenizers`.

A WordPiece vocabulary large enough that every word, entity and integer 0..999 of
the corpus is ONE token, with single characters as the fallback for anything new.
FINDINGS.md: a 2M-parameter model fails at copying multi-token numbers and unseen
words; copying one token is easy. (Byte-level BPE split 663 into pieces and the
model altered digits between question, tool call and answer.)
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from flywheel_assets.lib.training.chat_format import END, PAD, SPECIAL_TOKENS, UNK
from flywheel_assets.lib.training.chat_template import EMBEDDED_CHAT_TEMPLATE

CONTINUING = "##"  # WordPiece's mark for a piece inside a word


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 16000, whole_numbers: int = -1) -> PreTrainedTokenizerFast:
    """The same corpus gives the same tokenizer, in every process. `tokenizers`' WordPiece
    trainer alone does not (tokenizers#1794): it numbers the `##x` continuation pieces in
    hash-map order, and those numbers break ties between equally frequent merges, so two
    runs kept different subwords and the base model's weights differed. Here every `##x`
    is numbered up front, in sorted order (handed to the trainer as special tokens), and
    the trained vocabulary is then loaded into a plain WordPiece model where they are
    ordinary pieces again."""
    corpus = list(corpus)
    numbers = [str(n) for n in range(whole_numbers + 1)]  # 0..whole_numbers each seen whole (Domain.whole_numbers)
    alphabet = sorted(set(string.printable.strip()).union(*map(set, corpus)) - set(string.whitespace))
    trainer_tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=64))
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=1,
        special_tokens=SPECIAL_TOKENS + [CONTINUING + c for c in alphabet],
        initial_alphabet=alphabet, show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(numbers + corpus, trainer)
    tokenizer = Tokenizer(models.WordPiece(trainer_tokenizer.get_vocab(with_added_tokens=True), unk_token=UNK,
                                           max_input_chars_per_word=64))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, eos_token=END,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, UNK, END)],
        padding_side="left",
    )
    fast.chat_template = EMBEDDED_CHAT_TEMPLATE  # saved with it: any chat client renders our format
    return fast
