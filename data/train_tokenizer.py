"""Train the default byte-level BPE ("bpe8k") on the embedded corpus.

    python -m data.train_tokenizer [--vocab-size 8192] [--out data/embedded/bpe8k.json]
"""
from __future__ import annotations

import argparse
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.corpus import iter_documents
from data.tokenizer import BPE8K_PATH, EOS


def train_bpe(texts, vocab_size: int = 8192) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenisation, no prefix space) with ``EOS`` as token 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--out", default=BPE8K_PATH)
    args = parser.parse_args(argv)
    tok = train_bpe((doc["text"] for doc in iter_documents()), args.vocab_size)
    tmp = args.out + ".tmp"
    tok.save(tmp, pretty=False)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
