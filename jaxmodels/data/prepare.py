"""`jaxmodels prepare`: a text corpus to flat token shards that `data.source=tokens` memory-maps.

Inputs are text files (each one document), JSON Lines files (`.jsonl`: one
document per line, its `field`), directories (every file inside) or globs.
Documents are tokenized in worker processes, in ~1 MB chunks cut at line ends,
and written in input order with the tokenizer's end-of-text id after each
document. The output directory holds:

  index.json        format, tokenizer, vocab_size, eot, dtype, token and document counts,
                    shards, and the train / validation split as segments [file, start, count]
  tokens_NNNNN.bin  flat arrays of token ids, uint16 when the vocabulary fits (< 65,536), else uint32,
                    little-endian, at most `shard_tokens` each
  tokenizer.json | tokenizer.model | NAME.tiktoken   the tokenizer (none for char and byte: index.json holds it)

The last `val_fraction` of the tokens validates. A byte-level BPE can be trained
on the corpus first (Hugging Face `tokenizers`, multithreaded in Rust; the `text`
extra, as are the subword tokenizers given by file).
"""

import json
import multiprocessing
import os
import sys
import time
from typing import Iterator

import numpy as np
from etils import epath

from jaxmodels.data import tokenizers
from jaxmodels.data.tokenizers import Vocab
from jaxmodels.runtime import extras, storage
from jaxmodels.runtime.errors import UserError

__all__ = ["CHUNK_BYTES", "documents", "expand_inputs", "FORMAT", "GLOB_CHARS", "INDEX_FILE", "prepare",
           "resolve_tokenizer", "SHARD_TOKENS", "ShardWriter", "tasks", "train_bpe"]

INDEX_FILE = "index.json"
FORMAT = "jaxmodels.tokens/1"
CHUNK_BYTES = 1 << 20  # text per worker task
SHARD_TOKENS = 1 << 28  # tokens per shard file (512 MiB of uint16)
GLOB_CHARS = "*?["


def expand_inputs(patterns: list[str]) -> list[epath.Path]:
  """The files named by `patterns` (files, directories, globs), in the given order, each sorted."""
  files = []
  for pattern in patterns:
    if any(c in pattern for c in GLOB_CHARS):
      parts = pattern.split("/")
      fixed = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
      base = storage.path("/".join(parts[:fixed]) or ".")
      found = sorted(p for p in base.glob("/".join(parts[fixed:])) if p.is_file())
    elif (p := storage.path(pattern)).is_dir():
      found = sorted(f for f in p.rglob("*") if f.is_file())
    else:
      found = [p] if p.is_file() else []
    if not found:
      raise UserError(f"input {pattern}: no such file (or the glob or directory matches none)")
    files.extend(found)
  return files


def documents(files: list[epath.Path], field: str) -> Iterator[tuple[str, bool, int]]:
  """(text, ends a document, bytes read) pieces of every document, each at most ~CHUNK_BYTES (cut at line ends)."""
  for path in files:
    with path.open("rb") as f:
      if path.name.endswith(".jsonl"):
        for lineno, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            text = json.loads(line)[field]
          except (ValueError, KeyError, TypeError):
            text = None
          if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: not a JSON object with a string field {field!r} (--field)")
          yield text, True, len(line)
        continue
      chunk, size = [], 0
      for line in f:
        chunk.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
          yield _decode(path, chunk), False, size
          chunk, size = [], 0
      yield _decode(path, chunk), True, size


def _decode(path, lines: list[bytes]) -> str:
  raw = b"".join(lines)
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text ({raw[e.start:e.start + 1]!r})") from None


def tasks(files, field: str) -> Iterator[tuple[list[tuple[str, bool]], int]]:
  """Documents grouped into worker tasks of about CHUNK_BYTES: ([(text, ends a document)], bytes)."""
  group, size = [], 0
  for text, ends, n in documents(files, field):
    group.append((text, ends))
    size += n
    if size >= CHUNK_BYTES:
      yield group, size
      group, size = [], 0
  if group:
    yield group, size


_WORKER_TOKENIZER = None


def _init_worker(spec: str) -> None:
  global _WORKER_TOKENIZER  # pylint: disable=global-statement
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
  _WORKER_TOKENIZER = tokenizers.from_spec(json.loads(spec))


def _encode_task(task) -> tuple[np.ndarray, int, int]:
  """(token ids with an end-of-text id after each finished document, bytes, documents finished)."""
  group, size = task
  tok = _WORKER_TOKENIZER
  parts = []
  for ids, (_, ends) in zip(tok.encode_batch([text for text, _ in group]), group):
    parts.append(ids)
    if ends:
      parts.append(np.asarray([tok.eot], np.int32))
  return np.concatenate(parts), size, sum(ends for _, ends in group)


def _chars_task(task) -> tuple[set, int, int]:
  group, size = task
  return set().union(*(text for text, _ in group)), size, 0


def _map(fn, items, workers: int, spec: str):
  """fn over items in order: in `workers` spawned processes (JAX is imported here, so no fork), or inline if 0."""
  if workers == 0:
    _init_worker(spec)
    yield from map(fn, items)
    return
  with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (spec,)) as pool:
    yield from pool.imap(fn, items)


def train_bpe(files, field: str, vocab_size: int) -> tokenizers.HFTokenizer:
  """A byte-level BPE (GPT-2's pre-tokenization) with `<|endoftext|>` as id 0, trained on the corpus."""
  hf = extras.require("tokenizers", "--train-tokenizer bpe")

  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[tokenizers.EOT_TEXT], show_progress=False,
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator((text for text, _, _ in documents(files, field)), trainer)
  return tokenizers.HFTokenizer(tok.to_str(), "bpe")


class ShardWriter:
  """Appends token ids to `tokens_NNNNN.bin` files of at most `shard_tokens` ids each."""

  def __init__(self, out: epath.Path, dtype, shard_tokens: int):
    self.out, self.dtype, self.shard_tokens = out, np.dtype(dtype), shard_tokens
    self.shards: list[list] = []  # [file name, tokens]
    self.file = None

  def write(self, ids: np.ndarray) -> None:
    ids = ids.astype(self.dtype.newbyteorder("<"))
    while len(ids):
      if not self.shards or self.shards[-1][1] == self.shard_tokens:
        self.close()
        self.shards.append([f"tokens_{len(self.shards):05d}.bin", 0])
        self.file = (self.out / self.shards[-1][0]).open("wb")
      take = min(len(ids), self.shard_tokens - self.shards[-1][1])
      self.file.write(ids[:take].tobytes())
      self.shards[-1][1] += take
      ids = ids[take:]

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None

  def segments(self, start: int, stop: int) -> list[list]:
    """[file, start, count] pieces of the concatenated tokens [start, stop)."""
    out, offset = [], 0
    for name, n in self.shards:
      lo, hi = max(start, offset), min(stop, offset + n)
      if lo < hi:
        out.append([name, lo - offset, hi - lo])
      offset += n
    return out


def resolve_tokenizer(tokenizer: str, train: str, vocab_size: int, files, field: str, workers: int):
  """(tokenizer, file name to save it under or None) for the command's choice; char vocabularies scan the corpus."""
  if train:
    if train != "bpe":
      raise UserError(f"--train-tokenizer={train!r}: expected bpe")
    if vocab_size < 257:
      raise UserError(f"--vocab-size={vocab_size}: a byte-level BPE needs at least 257 (256 bytes + end-of-text)")
    return train_bpe(files, field, vocab_size), "tokenizer.json"
  if tokenizer == "byte":
    return Vocab("byte", with_eot=True), None
  if tokenizer == "char":
    chars = set()
    for found, _, _ in _map(_chars_task, tasks(files, field), workers, Vocab("byte").to_json()):  # spec unused
      chars |= found
    return Vocab("char", "".join(sorted(chars)), with_eot=True), None
  tok = tokenizers.from_file(tokenizer)
  if tok.eot is None:
    raise UserError(f"{tokenizer} has no end-of-text token (looked for {', '.join(tokenizers.EOT_CANDIDATES)} or "
                    f"an eos id) to separate documents")
  name = storage.path(tokenizer).name
  return tok, {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model"}.get(tok.kind, name)


def prepare(inputs: list[str], out: str, *, tokenizer: str = "byte", train_tokenizer: str = "",
            vocab_size: int = 8192, field: str = "text", val_fraction: float = 0.005, workers: int | None = None,
            shard_tokens: int = SHARD_TOKENS, progress: bool = True) -> dict:
  """Tokenizes `inputs` into `out` (see the module docstring) and returns the index it wrote.

  Raises UserError for missing inputs, an `out` that already holds a corpus, a bad
  tokenizer or option, and a corpus too small to split, before writing any shard.
  """
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f"--val-fraction={val_fraction}: expected a number in (0, 1)")
  if shard_tokens < 1:
    raise UserError(f"--shard-tokens={shard_tokens}: expected a positive integer")
  workers = os.cpu_count() if workers is None else workers
  if workers < 0:
    raise UserError(f"--workers={workers}: expected an integer >= 0 (0: tokenize in this process)")
  out_dir = storage.path(out)
  if (out_dir / INDEX_FILE).exists():
    raise UserError(f"{out} already holds a prepared corpus ({INDEX_FILE}): choose another --out or delete it")
  files = expand_inputs(inputs)
  total_bytes = sum(f.stat().length for f in files)
  tok, tokenizer_file = resolve_tokenizer(tokenizer, train_tokenizer, vocab_size, files, field, workers)
  dtype = np.uint16 if tok.size <= 1 << 16 else np.uint32

  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  created = not out_dir.exists()
  out_dir.mkdir(parents=True, exist_ok=True)
  writer = ShardWriter(out_dir, dtype, shard_tokens)
  t0, total, docs = time.perf_counter(), 0, 0
  try:  # a bad document found on the way (JSON Lines are checked as they are read) removes what was written
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
              file=sys.stderr) as bar:
      for ids, size, finished in _map(_encode_task, tasks(files, field), workers, tok.to_json()):
        writer.write(ids)
        total, docs = total + len(ids), docs + finished
        bar.update(size)
        bar.set_postfix_str(f"{total / (time.perf_counter() - t0):,.0f} tokens/s", refresh=False)
    n_val = max(2, int(round(total * val_fraction)))
    if total - n_val < 2:
      raise UserError(f"the corpus has {total} tokens: too few to split into training and validation")
  except BaseException:
    writer.close()
    for name, _ in writer.shards:
      (out_dir / name).unlink(missing_ok=True)
    if created:
      out_dir.rmdir()
    raise
  writer.close()
  seconds = time.perf_counter() - t0
  if tokenizer_file:
    path = out_dir / tokenizer_file
    if isinstance(tok, tokenizers.HFTokenizer):
      path.write_text(tok.json_text, encoding="utf-8")
    elif isinstance(tok, tokenizers.SentencePieceTokenizer):
      path.write_bytes(tok.model)
    else:
      path.write_text(tok.ranks_text, encoding="utf-8")
    spec = {"kind": tok.kind, "file": tokenizer_file}
  else:
    spec = json.loads(tok.to_json())
  index = {"format": FORMAT, "tokenizer": spec, "vocab_size": tok.size, "eot": tok.eot,
           "dtype": np.dtype(dtype).name, "tokens": total, "documents": docs,
           "shards": [{"file": name, "tokens": n} for name, n in writer.shards],
           "train": {"tokens": total - n_val, "segments": writer.segments(0, total - n_val)},
           "validation": {"tokens": n_val, "segments": writer.segments(total - n_val, total)},
           "inputs": [str(f) for f in files], "seconds": round(seconds, 3)}
  (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")  # last: marks it complete
  print(f"prepared {out}: {total:,} tokens ({total - n_val:,} train / {n_val:,} validation) from {docs:,} documents "
        f"({total_bytes / 1e6:,.1f} MB), {tok.kind} vocabulary of {tok.size:,}, {np.dtype(dtype).name} shards; "
        f"{total / seconds:,.0f} tokens/s with {workers or 'no'} worker processes", flush=True)
  return index
