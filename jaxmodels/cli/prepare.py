"""`jaxmodels prepare`: a text corpus tokenized into shards for data.source=tokens."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.data.prepare import SHARD_TOKENS, prepare

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels prepare INPUT [INPUT ...] --out DIR [--field text]
             [--tokenizer char|byte|FILE | --train-tokenizer bpe --vocab-size N]
             [--val-fraction F] [--workers W] [--shard-tokens T]

Tokenizes a corpus into DIR for data.source=tokens: flat uint16 (or uint32)
token shards and index.json. INPUTs are text files (one document each), .jsonl
files (one document per line, its --field), directories or globs (quote them).
Documents are separated by the tokenizer's end-of-text token.
  --tokenizer: byte (default) or char, or a local tokenizer file: a Hugging Face
    tokenizer.json, a SentencePiece .model or a tiktoken .tiktoken file
  --train-tokenizer bpe: train a byte-level BPE of --vocab-size (default 8192)
    ids on the corpus first, saved as DIR/tokenizer.json
  --val-fraction: the last share of the tokens validates (default 0.005)
  --workers: tokenizing processes (default: the CPU count; 0: this process)
  --shard-tokens: ids per shard file (default 2**28)
"""
  a = parse_args(prog, args, [("inputs", dict(nargs="+")), ("--out", dict(required=True)),
                              ("--field", dict(default="text")), ("--tokenizer", dict(default="byte")),
                              ("--train-tokenizer", dict(default="")), ("--vocab-size", dict(type=int, default=8192)),
                              ("--val-fraction", dict(type=float, default=0.005)),
                              ("--workers", dict(type=int, default=None)),
                              ("--shard-tokens", dict(type=int, default=SHARD_TOKENS))])
  prepare(a.inputs, a.out, tokenizer=a.tokenizer, train_tokenizer=a.train_tokenizer, vocab_size=a.vocab_size,
          field=a.field, val_fraction=a.val_fraction, workers=a.workers, shard_tokens=a.shard_tokens)
  return 0
