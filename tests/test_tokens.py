"""Token corpora: `jaxmodels prepare`, memory-mapped shards (data.source=tokens), nanoGPT's layout, sampling."""

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, read_metrics
from etils import epath
from test_checkpoint import final_params, run, run_until, scores

from jaxmodels.config import default_config
from jaxmodels.data import load_dataset, load_dataset_from_config
from jaxmodels.data.prepare import prepare
from jaxmodels.data.tokenizers import Vocab, from_spec
from jaxmodels.data.tokens import load_index, load_tokenizer
from jaxmodels.runtime.errors import UserError
from jaxmodels.train.loop import train_and_evaluate

WORDS = ("the of and to in is was he for it with as his on be at by had are but from or have an they which one you "
         "were her all she there would their we him been has when who will more no if out so said what up its about "
         "into than them can only other new some could time these two may then do first any my now such like").split()


def write_corpus(directory, documents: int, seed: int = 0) -> list[str]:
  """A JSON Lines corpus of `documents` word-salad documents (~750 bytes each); returns the texts."""
  rng = random.Random(seed)
  words = WORDS + ["".join(rng.choice("abcdefghiklmnoprstuvwy") for _ in range(rng.randint(3, 9))) for _ in range(400)]
  texts = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 250))) + ".\n" for _ in range(documents)]
  with open(os.path.join(directory, "corpus.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
  return texts


def tokens_config(path, **data):
  c = default_config()
  c.data.source, c.data.path, c.data.seq_len = "tokens", str(path), 16
  c.model.update(family="transformer", d_model=32, d_ff=64, num_layers=1, num_heads=2, max_len=16)
  c.train.update(steps=10, batch_size=8, log_every=5, eval_every=10, eval_batch_size=16, learning_rate=3e-3)
  for k, v in data.items():
    c.data[k] = v
  return c


def all_ids(directory) -> np.ndarray:
  index = load_index(epath.Path(directory))
  return np.concatenate([np.fromfile(os.path.join(directory, s["file"]), index["dtype"]) for s in index["shards"]])


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_prepare_round_trips_documents_separated_by_end_of_text(tmp_path, tokenizer):
  texts = write_corpus(tmp_path, 40)
  (tmp_path / "extra.txt").write_text("ünïcode line\nsecond line\n", encoding="utf-8")
  index = prepare([str(tmp_path / "corpus.jsonl"), str(tmp_path / "*.txt")], str(tmp_path / "out"),
                  tokenizer=tokenizer, workers=0, shard_tokens=5000, val_fraction=0.1, progress=False)
  ids = all_ids(tmp_path / "out")
  assert index["dtype"] == "uint16" and index["documents"] == 41 and len(index["shards"]) > 1
  assert index["tokens"] == len(ids) == index["train"]["tokens"] + index["validation"]["tokens"]
  tok = load_tokenizer(epath.Path(tmp_path / "out"), index["tokenizer"])
  assert isinstance(tok, Vocab) and tok.eot == index["eot"] == index["vocab_size"] - 1
  docs = tok.decode(ids).split("<|endoftext|>")
  assert docs == texts + ["ünïcode line\nsecond line\n", ""]


def test_prepare_refuses_bad_input_before_writing(tmp_path):
  with pytest.raises(UserError, match="no such file"):
    prepare([str(tmp_path / "missing*.txt")], str(tmp_path / "out"), workers=0)
  (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
  with pytest.raises(UserError, match=r"bad.jsonl:1: not a JSON object with a string field 'text'"):
    prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "out"), workers=0)
  with pytest.raises(UserError, match="at least 257"):
    prepare([str(tmp_path / "bad.jsonl")], str(tmp_path / "out"), train_tokenizer="bpe", vocab_size=100)
  assert not (tmp_path / "out").exists()


def test_windows_are_a_function_of_seed_step_and_row_and_read_only_own_rows(tmp_path):
  write_corpus(tmp_path, 30)
  prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "out"), tokenizer="byte", workers=0, progress=False,
          val_fraction=0.2)
  ds = load_dataset_from_config(tokens_config(tmp_path / "out"))
  full = ds.train_batch(3, 8)
  ds.train.windows_read = 0
  part = ds.train_batch(3, 8, np.array([5, 6]))
  assert ds.train.windows_read == 2  # a process reads the windows of its own rows only
  np.testing.assert_array_equal(part["x"], full["x"][5:7])
  np.testing.assert_array_equal(full["x"][:, 1:], full["y"][:, :-1])
  assert not np.array_equal(ds.train_batch(4, 8)["x"], full["x"])
  ids = all_ids(tmp_path / "out")
  val = ids[ds.train.offsets[-1]:]
  targets = np.concatenate([b["y"][b["mask"] == 1] for b in ds.eval_batches(16)])
  np.testing.assert_array_equal(targets, val[1:])  # the whole split: every target once
  few = list(load_dataset_from_config(tokens_config(tmp_path / "out", eval_windows=3)).eval_batches(2))
  assert len(few) == 2 and sum(b["mask"].sum() for b in few) == 3 * 16


@pytest.mark.slow
def test_bpe_corpus_trains_resumes_bit_exactly_and_samples(tmp_path):
  write_corpus(tmp_path, 2000)  # ~1.5 MB
  r = run([sys.executable, "-m", "jaxmodels", "prepare", str(tmp_path / "corpus.jsonl"), "--out",
           str(tmp_path / "bpe"), "--train-tokenizer", "bpe", "--vocab-size", "512", "--workers", "2"])
  assert r.returncode == 0, r.stderr
  assert "bpe vocabulary of 512, uint16 shards" in r.stdout and "tokens/s with 2 worker processes" in r.stdout
  assert (tmp_path / "bpe" / "tokenizer.json").is_file()

  def command(workdir):
    return [sys.executable, "-m", "jaxmodels", "train", "--config", "experiments/text_transformer.py",
            f"--workdir={workdir}", "--config.data.source=tokens", f"--config.data.path={tmp_path / 'bpe'}",
            "--config.data.seq_len=32", "--config.model.d_model=32", "--config.model.d_ff=64",
            "--config.model.num_layers=1", "--config.train.batch_size=8", "--config.train.steps=20",
            "--config.train.log_every=5", "--config.train.eval_every=10", "--config.checkpoint.every=5",
            "--config.data.eval_windows=16", "--config.train.warmup_steps=2"]

  assert run(command(tmp_path / "straight")).returncode == 0
  code, out = run_until(command(tmp_path / "killed"), "step 15 train", signal.SIGKILL)
  assert code == -signal.SIGKILL, out
  resumed = run(command(tmp_path / "killed"))
  assert resumed.returncode == 0, resumed.stderr
  assert any(f"training steps {s}..20" in resumed.stdout for s in (5, 10, 15)), resumed.stdout
  assert scores(tmp_path / "killed") == scores(tmp_path / "straight")
  assert "bits_per_token" in read_metrics(tmp_path / "straight")[-1]
  for a, b in zip(final_params(tmp_path / "killed"), final_params(tmp_path / "straight")):
    np.testing.assert_array_equal(a, b)
  sample = run([sys.executable, "-m", "jaxmodels", "sample", "--workdir", str(tmp_path / "straight"), "--prompt",
                "the man", "--length", "12", "--temperature", "0"])
  assert sample.returncode == 0, sample.stderr
  assert sample.stdout.startswith("the man") and len(sample.stdout) > len("the man") + 5


def write_nanogpt(directory, vocab: int, n_train: int, n_val: int) -> np.ndarray:
  """nanoGPT's shakespeare_char layout: train.bin and val.bin of uint16 ids (as prepare.py writes them)."""
  rng = np.random.default_rng(0)
  ids = np.tile(rng.integers(0, vocab, 37), (n_train + n_val) // 37 + 1)[:n_train + n_val].astype(np.uint16)
  ids[:n_train].tofile(os.path.join(directory, "train.bin"))
  ids[n_train:].tofile(os.path.join(directory, "val.bin"))
  return ids


def test_token_files_of_the_wrong_size_or_a_damaged_index_are_refused(tmp_path):
  write_nanogpt(tmp_path, 65, 2000, 200)
  with open(tmp_path / "train.bin", "ab") as f:
    f.write(b"\x01")  # an odd size: the last id would lose a byte
  with pytest.raises(UserError, match=r"train.bin: 4001 bytes, an odd size for nanoGPT's uint16 ids"):
    load_dataset("tokens", path=str(tmp_path), vocab_size=65, seq_len=16)
  write_corpus(tmp_path, 10)
  prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "out"), tokenizer="byte", workers=0, progress=False)
  out, index = tmp_path / "out", json.loads((tmp_path / "out" / "index.json").read_text())
  shard = out / index["shards"][0]["file"]
  shard.write_bytes(shard.read_bytes() + b"\x00\x00")  # ids the index does not list
  with pytest.raises(UserError, match=rf"{shard.name}: \d+ bytes, but .*index.json lists \d+ uint16 ids"):
    load_dataset("tokens", path=str(out), seq_len=16)
  for damage, message in ((lambda i: "{not json", "not a readable JSON index"),
                          (lambda i: json.dumps({**i, "dtype": "float32"}), "dtype 'float32', expected one of"),
                          (lambda i: json.dumps({k: v for k, v in i.items() if k != "train"}),
                           "field 'train' missing")):
    (out / "index.json").write_text(damage(index))
    with pytest.raises(UserError, match=message):
      load_dataset("tokens", path=str(out), seq_len=16)


def test_nanogpt_shakespeare_char_layout_trains_as_is(tmp_path):
  write_nanogpt(tmp_path, 65, 20000, 2000)
  with pytest.raises(UserError, match="set data.vocab_size"):
    load_dataset_from_config(tokens_config(tmp_path))
  with pytest.raises(UserError, match="token id 6[0-4], beyond the vocabulary of 60"):
    load_dataset_from_config(tokens_config(tmp_path, vocab_size=60)).train_batch(0, 64)
  c = tokens_config(tmp_path, vocab_size=65)
  c.train.steps = 40
  final = train_and_evaluate(c, str(tmp_path / "run"))
  records = read_metrics(tmp_path / "run")
  assert final["loss"] < records[0]["loss"] - 0.5  # a period-37 sequence is learnable
  assert json.loads((tmp_path / "run" / "vocab.json").read_text()) == {"kind": "ids", "size": 65}


@pytest.mark.slow
def test_token_file_far_beyond_memory_trains_in_little_memory(tmp_path):
  """A 2.5 GB token file trains with a peak RSS within 512 MB of the same run on a 2 MB file: never read whole.

  Compared with a control run rather than against a fixed figure: the baseline (JAX, XLA's compiled step)
  varies with the machine (574-835 MB alone here, ~2 GB inside the parallel suite), the corpus's share must not.
  """
  def peak_rss_mb(directory, train_tokens: int) -> float:
    directory.mkdir()
    with open(directory / "train.bin", "wb") as f:  # sparse: zeros but where written
      f.truncate(2 * train_tokens)
      f.seek(train_tokens)
      f.write(np.arange(1000, dtype=np.uint16).tobytes())
    np.arange(4000, dtype=np.uint16).tofile(directory / "val.bin")
    script = (f"import resource, sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {ROOT + '/tests'!r})\n"
              f"from test_tokens import tokens_config\nfrom jaxmodels.train import train_and_evaluate\n"
              f"c = tokens_config({str(directory)!r}, vocab_size=4096)\nc.train.steps = 20\n"
              f"train_and_evaluate(c, {str(directory / 'run')!r})\n"
              f"print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("maxrss_kb")[-1]) / 1024

  big, small = peak_rss_mb(tmp_path / "big", 5 << 28), peak_rss_mb(tmp_path / "small", 1 << 20)
  print(f"peak RSS {big:.0f} MB with the 2.5 GB file, {small:.0f} MB with a 2 MB one")
  assert big - small < 512, (big, small)


def given_tokenizer(kind, directory, texts) -> str:
  """A tokenizer file of `kind` built for the test: HF tokenizer.json, SentencePiece .model, tiktoken file."""
  if kind == "hf":
    from jaxmodels.data.prepare import train_bpe  # pylint: disable=import-outside-toplevel
    (directory / "tokenizer.json").write_text(train_bpe([epath.Path(directory / "corpus.jsonl")], "text", 300)
                                              .json_text, encoding="utf-8")
    return str(directory / "tokenizer.json")
  if kind == "sentencepiece":
    import io  # pylint: disable=import-outside-toplevel

    import sentencepiece  # pylint: disable=import-outside-toplevel
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=300,
                                             minloglevel=2)
    (directory / "sp.model").write_bytes(model.getvalue())
    return str(directory / "sp.model")
  import base64  # pylint: disable=import-outside-toplevel
  ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"an", b"and"]
  (directory / "mini.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                                   for i, t in enumerate(ranks)), encoding="utf-8")
  return str(directory / "mini.tiktoken")


@pytest.mark.parametrize("kind", ["hf", "sentencepiece", "tiktoken"])
def test_given_tokenizer_files_prepare_and_round_trip(tmp_path, kind):
  texts = write_corpus(tmp_path, 20)
  path = given_tokenizer(kind, tmp_path, texts)
  index = prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "out"), tokenizer=path, workers=0,
                  progress=False)
  tok = load_tokenizer(epath.Path(tmp_path / "out"), index["tokenizer"])
  assert (tok.kind, tok.size, tok.eot) == (kind, index["vocab_size"], index["eot"])
  ids = all_ids(tmp_path / "out")
  cuts = np.flatnonzero(ids == tok.eot)
  assert len(cuts) == len(texts) and cuts[-1] == len(ids) - 1
  docs = [tok.decode(d) for d in np.split(ids, cuts + 1)[:-1]]
  same = (lambda t: " ".join(t.split())) if kind == "sentencepiece" else (lambda t: t)  # it folds whitespace
  assert [same(d.replace("<|endoftext|>", "")) for d in docs] == [same(t) for t in texts]
  # The run's vocab.json (the spec) rebuilds the same tokenizer.
  again = from_spec(json.loads(tok.to_json()))
  assert again.encode(texts[0]).tolist() == tok.encode(texts[0]).tolist()


COUNTING_SITECUSTOMIZE = '''
import atexit, functools, json, os
import jaxmodels.data as data
import jaxmodels.data.tokens as tokens
loaded = []
_load = tokens.load_token_dataset
@functools.wraps(_load)  # load_dataset passes the arguments its signature names
def load(*a, **kw):
  loaded.append(_load(*a, **kw))
  return loaded[-1]
data.SOURCES["tokens"] = load  # the table load_dataset looks sources up in
def report():  # the windows and bytes this process's token streams read
  reads = {name: sum(getattr(getattr(ds, split), counter) for ds in loaded) for name, split, counter in
           (("train", "train", "windows_read"), ("train_bytes", "train", "bytes_read"), ("val", "val", "windows_read"))}
  if reads["train"]:
    with open(os.path.join(os.environ["READS_DIR"], f"{os.getpid()}.json"), "w") as f:
      f.write(json.dumps(reads))
atexit.register(report)
'''


@pytest.mark.slow
def test_two_process_launch_from_a_bucket_reads_only_its_rows_and_equals_one_process(tmp_path, gcs_env):
  """Two processes of `jaxmodels launch` train from shards in the GCS emulator, each fetching only the windows
  (and bytes) of its own rows, and reach the losses of one process reading the same shards from a local disk."""
  write_corpus(tmp_path, 200)
  prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "out"), tokenizer="byte", workers=0, progress=False,
          val_fraction=0.02)
  r = run([sys.executable, "-m", "jaxmodels", "prepare", str(tmp_path / "corpus.jsonl"), "--out", "gs://bkt/rows",
           "--workers", "0", "--val-fraction", "0.02"], env=gcs_env)
  assert r.returncode == 0, r.stderr
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(COUNTING_SITECUSTOMIZE)  # counts windows read, per process
  train = ["train", "--config", "experiments/text_transformer.py", "--config.data.source=tokens",
           "--config.data.seq_len=16", "--config.model.num_layers=1",
           "--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.max_len=16",
           "--config.train.batch_size=8", "--config.train.eval_batch_size=16", "--config.train.steps=10",
           "--config.train.warmup_steps=2", "--config.train.log_every=5", "--config.train.eval_every=10",
           "--config.parallel.strategy=dp", "--config.data.prefetch=0", "--config.data.eval_windows=20"]

  def jaxmodels(name, *args, devices=None):
    (tmp_path / name).mkdir()
    env = {**gcs_env, "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}", "READS_DIR": str(tmp_path / name),
           "JAX_PLATFORMS": "cpu"}
    if devices:
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    r = subprocess.run([sys.executable, "-m", "jaxmodels", *args, f"--workdir={tmp_path / name / 'run'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(p.read_text()) for p in (tmp_path / name).glob("*.json")]

  multi = jaxmodels("multi", "launch", "--processes", "2", "--devices-per-process", "2", "--", *train,
                    "--config.data.path=gs://bkt/rows")
  single = jaxmodels("single", *train, f"--config.data.path={tmp_path / 'out'}", devices=4)
  # 10 steps of 8 rows: each process reads its 4 rows of each, 17 uint16 ids a window. 20 evaluation windows in
  # 2 batches of 16 rows: 8 + 8 of the first, and the second's 4 real windows all lie in process 0's rows 16..23.
  assert sorted(r["train"] for r in multi) == [40, 40] and single[0]["train"] == 80
  assert [r["train_bytes"] for r in multi] == [40 * 17 * 2] * 2 and single[0]["train_bytes"] == 80 * 17 * 2
  assert sorted(r["val"] for r in multi) == [8, 12] and single[0]["val"] == 20
  a, b = read_metrics(tmp_path / "multi" / "run"), read_metrics(tmp_path / "single" / "run")
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)  # all-reduce order differs across processes


@pytest.mark.slow
def test_shards_in_a_bucket_train_resume_after_sigkill_and_equal_local_shards(tmp_path, gcs_env):
  """`prepare --out gs://` writes the shards to the GCS emulator; training reads them there by byte ranges (no
  local copy), and a run SIGKILLed and resumed from the bucket ends where an uninterrupted run on local shards
  does."""
  write_corpus(tmp_path, 60)
  index = prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "local"), tokenizer="char", workers=0,
                  shard_tokens=8000, val_fraction=0.05, progress=False)
  r = run([sys.executable, "-m", "jaxmodels", "prepare", str(tmp_path / "corpus.jsonl"), "--out", "gs://bkt/corpus",
           "--tokenizer", "char", "--workers", "0", "--shard-tokens", "8000", "--val-fraction", "0.05"], env=gcs_env)
  assert r.returncode == 0, r.stderr
  assert f"prepared gs://bkt/corpus: {index['tokens']:,} tokens" in r.stdout and len(index["shards"]) > 2

  def command(path, workdir):
    return [sys.executable, "-m", "jaxmodels", "train", "--config", "experiments/text_transformer.py",
            f"--workdir={workdir}", "--config.data.source=tokens", f"--config.data.path={path}",
            "--config.data.seq_len=16", "--config.model.d_model=16", "--config.model.d_ff=32",
            "--config.model.num_layers=1", "--config.model.max_len=16", "--config.train.batch_size=8",
            "--config.train.steps=20", "--config.train.log_every=5", "--config.train.eval_every=20",
            "--config.checkpoint.every=5", "--config.data.eval_windows=16", "--config.train.warmup_steps=2"]

  assert run(command(tmp_path / "local", tmp_path / "straight"), env=gcs_env).returncode == 0
  p = subprocess.Popen(command("gs://bkt/corpus", tmp_path / "killed"), cwd=ROOT, env=gcs_env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  out = []
  for line in p.stdout:
    out.append(line)
    if line.startswith("step 15 train"):
      p.kill()
      break
  p.communicate(timeout=60)
  assert p.returncode == -signal.SIGKILL, "".join(out)
  assert any("gs://bkt/corpus: " in line and "(uint16, ranged reads)" in line for line in out), "".join(out)
  resumed = run(command("gs://bkt/corpus", tmp_path / "killed"), env=gcs_env)
  assert resumed.returncode == 0, resumed.stderr
  assert any(f"training steps {s}..20" in resumed.stdout for s in (5, 10, 15)), resumed.stdout
  assert scores(tmp_path / "killed") == scores(tmp_path / "straight")
  for a, b in zip(final_params(tmp_path / "killed"), final_params(tmp_path / "straight")):
    np.testing.assert_array_equal(a, b)


def test_bench_data_reports_the_bytes_a_token_source_reads_against_a_given_step_time(tmp_path, capsys):
  from jaxmodels.cli.main import main  # pylint: disable=import-outside-toplevel
  write_corpus(tmp_path, 30)
  prepare([str(tmp_path / "corpus.jsonl")], str(tmp_path / "out"), tokenizer="byte", workers=0, progress=False)
  args = ["jaxmodels", "bench", "data", "--config", os.path.join(ROOT, "experiments", "text_transformer.py"),
          "--config.data.source=tokens", f"--config.data.path={tmp_path / 'out'}", "--config.data.seq_len=16",
          "--config.train.batch_size=8", "--steps", "3"]
  assert main([*args, "--step-time", "1000"]) == 0
  loader, step, verdict = capsys.readouterr().out.strip().splitlines()[-3:]
  assert "MB/s read (0.272 kB a batch;" in loader  # 8 windows of 17 uint16 ids
  assert step.endswith("tokens/s consumed (--step-time 1000 s)") and verdict.startswith("the loader keeps up")
  assert main([*args, "--step-time", "1e-9"]) == 0
  assert "the input pipeline is the bottleneck" in capsys.readouterr().out
