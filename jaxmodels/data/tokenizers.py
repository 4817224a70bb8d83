"""Subword tokenizers beside the char/byte `Vocab`: Hugging Face `tokenizers`, SentencePiece, tiktoken, raw ids.

Every tokenizer has the same small interface as `Vocab`: `kind`, `size` (ids lie in
[0, size)), `eot` (the end-of-text id separating documents, or None), `unit` (what
`bits_per_<unit>` counts), `encode(text) -> int32 ids`, `decode(ids) -> str` and
`to_json()`, a self-contained spec (the tokenizer file's content is embedded) that
`from_spec` rebuilds: a run's `vocab.json` is that spec, so `jaxmodels sample`
needs nothing but the workdir. Files are read through etils.epath (local or gs://);
nothing is ever downloaded. The subword libraries come with the `text` extra
(`pip install 'jaxmodels[text]'`); without it, such a tokenizer is the one-line
error of jaxmodels.runtime.extras.
"""

import base64
import dataclasses
import json

import numpy as np

from jaxmodels.runtime import extras, storage
from jaxmodels.runtime.errors import UserError

__all__ = ["CL100K_PATTERN", "EOT_CANDIDATES", "EOT_TEXT", "from_file", "from_spec", "HFTokenizer", "IdTokenizer",
           "SentencePieceTokenizer", "TiktokenTokenizer", "TOKENIZERS", "Vocab", "VOCAB_FILE"]

EOT_TEXT = "<|endoftext|>"
TOKENIZERS = ("char", "byte")  # data.tokenizer: the Vocab kinds; subword tokenizers come from data.path
VOCAB_FILE = "vocab.json"  # a run's tokenizer spec, in its workdir
EOT_CANDIDATES = (EOT_TEXT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")  # end-of-text tokens of common models
# tiktoken files hold only the merge ranks; the pre-tokenization pattern is chosen by the file's name:
# GPT-2's for r50k/p50k/gpt2 files, cl100k's (copied from tiktoken_ext.openai_public, whose loaders download)
# for any other.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
                  r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


def _read(path: str, binary: bool = False):
  p = storage.path(path)
  if not p.is_file():
    raise UserError(f"tokenizer file not found: {path}")
  return p.read_bytes() if binary else storage.read_utf8(p)



def _split(ids: list[int], sep: int) -> list[list[int]]:
  """`ids` cut at each `sep`: len(result) == ids.count(sep) + 1."""
  runs = [[]]
  for i in ids:
    if i == sep:
      runs.append([])
    else:
      runs[-1].append(i)
  return runs


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Characters (id 0 stands for any character unseen in training) or the 256 byte values.

  With `with_eot` (corpora from `jaxmodels prepare`), one more id, the last, separates documents.
  """

  kind: str
  chars: str = ""
  with_eot: bool = False

  @classmethod
  def build(cls, kind: str, text: str) -> "Vocab":
    if kind not in TOKENIZERS:
      raise UserError(f"data.tokenizer={kind!r}: expected one of {', '.join(TOKENIZERS)}")
    return cls(kind, "".join(sorted(set(text))) if kind == "char" else "")

  @property
  def size(self) -> int:
    return (len(self.chars) + 1 if self.kind == "char" else 256) + self.with_eot

  @property
  def eot(self) -> int | None:
    """The end-of-text id, or None."""
    return self.size - 1 if self.with_eot else None

  @property
  def unit(self) -> str:
    """What one token is, for the metric bits_per_<unit>."""
    return self.kind

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def encode(self, text: str) -> np.ndarray:
    if self.kind == "byte":
      return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    index = {c: i + 1 for i, c in enumerate(self.chars)}
    return np.array([index.get(c, 0) for c in text], np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.eot is not None:  # decoded piecewise around end-of-text ids
      plain = dataclasses.replace(self, with_eot=False)
      return EOT_TEXT.join(plain.decode(run) for run in _split(ids, self.eot))
    if self.kind == "byte":
      return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "\ufffd" for i in ids)

  def to_json(self) -> str:
    return json.dumps({"kind": self.kind, "chars": self.chars, "eot": self.with_eot})

  @classmethod
  def load(cls, workdir: str):
    """The tokenizer of a run (any kind, see jaxmodels.data.tokenizers) from its workdir's vocab.json."""
    path = storage.path(workdir) / VOCAB_FILE
    if not path.is_file():
      raise UserError(f"{path} not found: is {workdir} the workdir of a language-model run?")
    return from_spec(json.loads(path.read_text(encoding="utf-8")))


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer (a `tokenizer.json`): `kind` bpe (trained by prepare) or hf (given)."""

  unit = "token"

  def __init__(self, json_text: str, kind: str = "hf"):
    tokenizers = extras.require("tokenizers", "a Hugging Face tokenizer.json")
    try:
      self.tok = tokenizers.Tokenizer.from_str(json_text)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise UserError(f"not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
    self.kind, self.json_text = kind, json_text
    self.size = self.tok.get_vocab_size(with_added_tokens=True)
    self.eot = next((i for t in EOT_CANDIDATES if (i := self.tok.token_to_id(t)) is not None), None)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, np.int32) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def to_json(self) -> str:
    return json.dumps({"kind": self.kind, "tokenizer_json": self.json_text})


class SentencePieceTokenizer:
  """A SentencePiece model (`.model`, a serialized protobuf; embedded in the spec as base64)."""

  kind, unit = "sentencepiece", "token"

  def __init__(self, model: bytes):
    sentencepiece = extras.require("sentencepiece", "a SentencePiece .model")
    self.model = model
    self.sp = sentencepiece.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(model)
    except (RuntimeError, TypeError) as e:
      raise UserError(f"not a SentencePiece model ({str(e).splitlines()[0]})") from None
    self.size = self.sp.get_piece_size()
    self.eot = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.encode(text), np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self.sp.encode(texts)]

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def to_json(self) -> str:
    return json.dumps({"kind": self.kind, "model_b64": base64.b64encode(self.model).decode("ascii")})


class TiktokenTokenizer:
  """A tiktoken-format BPE file (lines `base64(token bytes) rank`), with `<|endoftext|>` appended as the last id."""

  kind, unit = "tiktoken", "token"

  def __init__(self, ranks_text: str, name: str):
    tiktoken = extras.require("tiktoken", "a tiktoken BPE file")
    r50k_pat_str = extras.require("tiktoken_ext.openai_public", "a tiktoken BPE file").r50k_pat_str
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe, which reads through a download cache.
    try:
      ranks = {base64.b64decode(token): int(rank) for token, rank in (l.split() for l in ranks_text.splitlines() if l)}
    except ValueError as e:
      raise UserError(f"{name}: not a tiktoken BPE file of `base64 rank` lines ({e})") from None
    self.ranks_text, self.name = ranks_text, name
    pattern = r50k_pat_str if name.startswith(("r50k", "p50k", "gpt2")) else CL100K_PATTERN
    self.eot = max(ranks.values()) + 1
    self.size = self.eot + 1
    self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT_TEXT: self.eot})

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.enc.encode_ordinary(text), np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, np.int32) for ids in self.enc.encode_ordinary_batch(texts)]

  def decode(self, ids) -> str:
    return self.enc.decode([int(i) for i in ids], errors="replace")

  def to_json(self) -> str:
    return json.dumps({"kind": self.kind, "name": self.name, "ranks": self.ranks_text})


@dataclasses.dataclass(frozen=True)
class IdTokenizer:
  """Raw token ids of a corpus prepared elsewhere (nanoGPT's train.bin): text is whitespace-separated ids."""

  size: int
  kind, unit, eot = "ids", "token", None

  def encode(self, text: str) -> np.ndarray:
    try:
      ids = np.asarray([int(t) for t in text.split()], np.int32)
    except ValueError:
      raise UserError(f"this run's corpus has no tokenizer (raw ids): give the prompt as token ids, got "
                      f"{text!r}") from None
    if ((ids < 0) | (ids >= self.size)).any():
      raise UserError(f"prompt ids must lie in [0, {self.size})")
    return ids

  def decode(self, ids) -> str:
    return "".join(f" {int(i)}" for i in ids)

  def to_json(self) -> str:
    return json.dumps({"kind": self.kind, "size": self.size})


def from_file(path: str, kind: str = "hf"):
  """The tokenizer stored at `path`: a HF `tokenizer.json` (of `kind` hf or bpe), a SentencePiece `.model` or a
  tiktoken file.

  Raises UserError for a missing or unreadable file or an unknown extension.
  """
  name = storage.path(path).name
  if name.endswith(".json"):
    return HFTokenizer(_read(path), kind)
  if name.endswith(".model"):
    return SentencePieceTokenizer(_read(path, binary=True))
  if name.endswith((".tiktoken", ".bpe")):
    return TiktokenTokenizer(_read(path), name.rsplit(".", 1)[0])
  raise UserError(f"{path}: unknown tokenizer file; expected a Hugging Face tokenizer.json, a SentencePiece "
                  f".model or a tiktoken .tiktoken file")


def from_spec(d: dict):
  """The tokenizer of a `to_json()` spec (any kind, `Vocab`'s included)."""
  kind = d.get("kind")
  if kind in ("bpe", "hf"):
    return HFTokenizer(d["tokenizer_json"], kind)
  if kind == "sentencepiece":
    return SentencePieceTokenizer(base64.b64decode(d["model_b64"]))
  if kind == "tiktoken":
    return TiktokenTokenizer(d["ranks"], d["name"])
  if kind == "ids":
    return IdTokenizer(d["size"])
  return Vocab(kind, d.get("chars", ""), d.get("eot", False))
