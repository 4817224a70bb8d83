"""Every configuration key, its default, and how experiment files are loaded.

An experiment file (`experiments/*.py`) defines `get_config()` that starts from
`default_config()` and overrides only what differs, nanoGPT-style. The returned
`ConfigDict` is locked, so a misspelled key, in the file or on the command line
(`--config.train.steps=500`), is an error rather than a silently ignored value.
"""

import importlib.util
import json
import os
from ml_collections import config_dict

from jaxmodels.errors import UserError

FAMILIES = ("mlp", "cnn", "lstm", "transformer")


def default_config() -> config_dict.ConfigDict:
  """All keys with their defaults. Groups: data.*, model.*, train.*."""
  c = config_dict.ConfigDict()

  c.data = config_dict.ConfigDict()
  # `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
  # download). `npz`: the user's arrays in one .npz (x_train, y_train, x_test, y_test).
  # `text`: a UTF-8 file for language modelling (data.path; empty = the embedded corpus).
  c.data.source = "digits"
  c.data.path = ""  # the .npz or text file; unused for digits
  c.data.test_fraction = 0.2  # digits only: share of examples held out, split by train.seed
  # Number of spatial axes of one example: 1 = signal/sequence (L[, C]), 2 = image
  # (H, W[, C]). Unset: rank 1 -> signal, rank 2 -> image, rank 3 -> image + channels.
  # Set it to 1 for (N, L, C) arrays, which are otherwise read as (N, H, W) images.
  c.data.spatial_dims = config_dict.placeholder(int)
  # Text only.
  c.data.seq_len = 128  # tokens per training window (the model sees seq_len, predicts the next of each)
  c.data.val_fraction = 0.1  # the last fraction of the text validates
  c.data.tokenizer = "char"  # char (vocabulary from the training text) | byte (256 values)

  c.model = config_dict.ConfigDict()
  # mlp | cnn | lstm | transformer. lstm and transformer are language models on
  # data.source=text and sequence classifiers on arrays (axis 1 of x is time).
  c.model.family = "cnn"
  c.model.dtype = "float32"  # compute dtype; "bfloat16" for mixed precision
  c.model.param_dtype = "float32"  # storage dtype of parameters (and optimizer state)
  c.model.dropout = 0.0
  c.model.activation = "relu"  # any jax.nn activation name: relu, gelu, silu, tanh, ...
  # MLP
  c.model.hidden_sizes = (128,)
  # CNN (conv dimensionality follows the input: 1-D signals, 2-D images)
  c.model.features = (32, 64)  # channels of each conv layer
  c.model.kernel_sizes = (3, 3)  # one per conv layer, same size on every spatial axis
  c.model.strides = (1, 1)  # one per conv layer
  c.model.pool = "max"  # after each conv layer: max | avg | none (window 2, stride 2)
  c.model.norm = "layer"  # CNN: batch | layer | none after each conv; transformer: layer | rms
  c.model.head_sizes = (128,)  # dense layers between the pooled features and the logits
  # Transformer
  c.model.num_layers = 2  # also the LSTM/GRU layer count
  c.model.num_heads = 4
  c.model.d_model = 128
  c.model.d_ff = 512
  c.model.max_len = 256  # longest sequence (positions) the model accepts
  c.model.positions = "rotary"  # rotary | learned
  c.model.mlp = "swiglu"  # swiglu | gelu
  c.model.tie_embeddings = True  # LM head shares the token embedding
  c.model.scan_layers = True  # stack the blocks and run them with one lax.scan (compile time flat in depth)
  c.model.remat = "none"  # recompute activations in the backward pass: none | dots | full
  # auto (einsum; on GPUs jax.nn.dot_product_attention's choice) | einsum | xla | cudnn (jax.nn's implementations)
  c.model.attention_impl = "auto"
  c.model.pooling = "mean"  # classifiers: mean | cls (transformer) | last (lstm)
  # LSTM / GRU
  c.model.cell = "lstm"  # lstm | gru
  c.model.hidden_size = 256
  c.model.bidirectional = False  # classifier only

  c.train = config_dict.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 64  # global batch per optimizer step
  c.train.grad_accum_steps = 1  # split each batch into this many micro-batches
  c.train.optimizer = "adamw"  # adamw | adam | sgd
  c.train.learning_rate = 1e-3  # peak learning rate
  c.train.schedule = "cosine"  # cosine (warmup + cosine decay) | linear | constant
  c.train.warmup_steps = 0
  c.train.end_lr_fraction = 0.0  # final learning rate as a fraction of the peak
  c.train.weight_decay = 0.0  # adamw: decoupled; adam/sgd: L2 on the gradient; never on biases or norm scales
  c.train.decay_embeddings = True  # weight decay on embedding tables (and a CLS token) too, as GPT-2/nanoGPT
  c.train.momentum = 0.9  # sgd only
  c.train.nesterov = False  # sgd only
  c.train.b1 = 0.9  # adam/adamw
  c.train.b2 = 0.999  # adam/adamw
  c.train.grad_clip = 0.0  # global-norm clip; 0 disables
  c.train.seed = 0
  c.train.log_every = 50  # steps between train metric fetches (the only host syncs)
  c.train.eval_every = 500  # steps between evaluations; the last step always evaluates
  c.train.eval_batch_size = 256
  # Non-finite loss: False stops the run (exit code 3) without saving; True skips those updates and counts them.
  c.train.skip_nonfinite = False
  # A second compile of the train or eval step (changed shape, dtype, sharding) warns; true makes it an error.
  c.train.fail_on_recompile = False
  # (first, last) step of a jax.profiler trace written to workdir/profile (TensorBoard/XProf, Perfetto).
  c.train.profile_steps = ()

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every = 500  # steps between async saves (the last step is always saved); 0: only the last
  c.checkpoint.keep = 3  # newest checkpoints kept
  c.checkpoint.keep_best = ""  # also keep the best by this eval metric (e.g. "loss", "accuracy")
  c.checkpoint.best_mode = "min"  # min | max: which end of keep_best is best
  # Start a new run from another run's checkpoint: its workdir, checkpoints/ or checkpoints/<step>.
  c.checkpoint.restore_from = ""
  c.checkpoint.restore_mode = "params"  # params (fresh optimizer, step 0) | full (continue its state)

  c.parallel = config_dict.ConfigDict()
  # single | dp | fsdp | tp | pmap (see jaxmodels/parallel/__init__.py and the README).
  c.parallel.strategy = "single"
  # Mesh axis sizes, e.g. "data=2,tensor=4"; -1 fills the remaining devices. Empty: the
  # strategy's default (dp: data=-1, fsdp: fsdp=-1, tp: tensor=-1, pmap: data=-1).
  c.parallel.mesh = ""
  # Logical parameter axis -> mesh axis (None: not split).
  c.parallel.rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", None),
                      ("conv_in", None), ("conv_out", "fsdp"), ("layers", None))
  # Logical activation axis -> mesh axis, tuple of mesh axes, or None (not split). Pins the
  # activations (MaxText's names) so each device computes on its share of the batch; under fsdp
  # the weights are then gathered, never the batch. A dimension the axes do not divide stays whole.
  c.parallel.activation_rules = (("activation_batch", ("data", "fsdp")), ("activation_length", None),
                                 ("activation_embed", None), ("activation_heads", "tensor"),
                                 ("activation_mlp", "tensor"), ("activation_vocab", "tensor"))
  # For parameters without logical names: (path regex, mesh axis); the first match splits the
  # parameter's largest dimension divisible by that axis.
  c.parallel.fallback_rules = ((".*", "fsdp"),)
  # Multi-process jobs (set automatically by `jaxmodels launch`, TPU pod slices and SLURM).
  c.parallel.coordinator_address = ""  # host:port of process 0
  c.parallel.num_processes = 1
  c.parallel.process_id = 0
  c.parallel.init_timeout_s = 300
  c.parallel.heartbeat_timeout_s = 100
  return c


def text_lm_config() -> config_dict.ConfigDict:
  """Defaults shared by the character language-model experiments (text_transformer, text_lstm)."""
  c = default_config()
  c.data.source = "text"
  c.data.seq_len = 64
  c.train.update(dict(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=100, grad_clip=1.0,
                      log_every=100, eval_every=200, eval_batch_size=64))
  return c


def load_experiment(path: str) -> config_dict.ConfigDict:
  """Imports an experiment file and returns its (locked) `get_config()`."""
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_jaxmodels_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"{path} defines no get_config()")
  config = module.get_config()
  config.lock()
  return config


def validate(config: config_dict.ConfigDict) -> None:
  """Checks the keys every run needs, with one-line errors."""
  if config.model.family not in FAMILIES:
    raise UserError(f"model.family={config.model.family!r}: expected one of {', '.join(FAMILIES)}")
  t = config.train
  for key in ("steps", "batch_size", "eval_every", "log_every", "eval_batch_size", "grad_accum_steps"):
    if t[key] <= 0:
      raise UserError(f"train.{key} must be positive, got {t[key]}")
  if t.batch_size % t.grad_accum_steps:
    raise UserError(
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}")
  if not t.learning_rate > 0:
    raise UserError(f"train.learning_rate must be positive, got {t.learning_rate}")


def to_json(config: config_dict.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
