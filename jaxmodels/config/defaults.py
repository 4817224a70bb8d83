"""Every configuration key and its default: `default_config()`, and `text_lm_config()` for language models.

An experiment file (`experiments/*.py`) defines `get_config()` that starts from
`default_config()` and overrides only what differs, nanoGPT-style. Modules never
read these ConfigDicts: the command line maps each group onto the typed
arguments of the library's factories.
"""

from ml_collections import config_dict

__all__ = ["default_config", "text_lm_config"]


def default_config() -> config_dict.ConfigDict:
  """All keys with their defaults, locked: setting a key it does not have (a misspelling) raises AttributeError.
  Groups: data.*, model.*, train.*, checkpoint.*, parallel.*. A module named by import path adds its own model.*
  keys (`jaxmodels.config.set_family`); code that adds keys of its own does so inside `with c.unlocked():`."""
  c = config_dict.ConfigDict()

  c.data = config_dict.ConfigDict()
  # `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
  # download). `npz`: the user's arrays in one .npz (x_train, y_train, x_test, y_test).
  # `text`: a UTF-8 file for language modelling (data.path; empty = the embedded corpus).
  # `images`: uint8 images from class sub-directories (the ImageNet layout) or an .npz, decoded by grain workers.
  # `tokens`: token ids memory-mapped from a `jaxmodels prepare` directory or nanoGPT's train.bin/val.bin.
  # `sft`: instruction data, JSON Lines of prompt/response pairs or chat messages, the loss on the responses only,
  # packed into rows of data.seq_len (docs/data.md#instruction-and-chat-data-datasourcesft).
  # `copy` / `reverse`: synthetic sequence-to-sequence tasks for model.family=encdec (jaxmodels/data/seq2seq.py):
  # sources of seq_len // 2 .. data.seq_len random symbols, targets the same symbols (reversed), then EOS.
  c.data.source = "digits"
  c.data.path = ""  # the .npz or text file, or the tokens directory (local or gs://); unused for digits
  # Array data (digits, npz): classify | binary | multilabel | regress (jaxmodels/tasks/losses.py). Empty: inferred from
  # y_train where unambiguous: (N, C) of 0/1 -> multilabel, else classify. Text and tokens are always lm.
  c.data.task = ""
  c.data.test_fraction = 0.2  # digits, and image folders without train/ and val/: share held out, split by train.seed
  # Number of spatial axes of one example: 1 = signal/sequence (L[, C]), 2 = image
  # (H, W[, C]). Unset: rank 1 -> signal, rank 2 -> image, rank 3 -> image + channels.
  # Set it to 1 for (N, L, C) arrays, which are otherwise read as (N, H, W) images.
  c.data.spatial_dims = config_dict.placeholder(int)  # unset | 1 | 2
  # Text only.
  # Tokens per training window (the model sees seq_len, predicts the next of each); copy/reverse: longest source.
  c.data.seq_len = 128
  c.data.val_fraction = 0.1  # the last fraction of the text validates
  c.data.tokenizer = "char"  # char (vocabulary from the training text) | byte (256 values)
  # Images only (data.path: a directory of class sub-directories, or an .npz of uint8 images).
  c.data.image_size = 0  # side of the square crops the model sees; 0 = the (shorter) side of the first image
  c.data.augment = True  # training: random resized crop + horizontal flip; off: the evaluation's centre crop
  c.data.workers = 2  # grain worker processes decoding and augmenting images; 0 = the training process
  # Every source: training batches loaded and put on the devices this many steps ahead, on a loader thread
  # (batches stay a function of the step, so resume is exact); 0 = load each when the step needs it.
  c.data.prefetch = 2
  # Tokens: model outputs: 0 = the prepared corpus's vocabulary; larger pads it (e.g. 50304 for GPT-2's
  # 50257); required for nanoGPT's train.bin (its meta.pkl is not loaded). Sft: 0 = the tokenizer's size; larger
  # pads it (an imported model's vocabulary). Copy/reverse: the symbols plus PAD,
  # BOS and EOS (at least 5); 0 = 16.
  c.data.vocab_size = 0
  c.data.eval_windows = 0  # validation windows per evaluation, evenly spaced; 0 = the whole validation split
  # Tokens: each end-of-text token starts a new document that attends only to itself (segment ids; the Transformer
  # family); False (nanoGPT's behaviour) lets a window attend across documents.
  c.data.document_mask = False
  # sft (jaxmodels/data/sft.py): the tokenizer, a Hugging Face tokenizer directory (its tokenizer.json, and its
  # chat template for `messages` examples) or a tokenizer file; empty = data.tokenizer (char | byte).
  c.data.tokenizer_path = ""
  c.data.chat_template = ""  # sft: a Jinja chat template file (or tokenizer directory); empty = data.tokenizer_path's

  c.model = config_dict.ConfigDict()
  # mlp | cnn | lstm | transformer | resnet | vit | encdec, or your own module by import path,
  # package.module:ClassName (an nnx.Module with a frozen-dataclass Config whose fields become model.* keys;
  # docs/models.md#your-own-module). lstm and transformer are language models on data.source=text and sequence
  # classifiers on arrays (axis 1 of x is time); resnet and vit read images; encdec (a Transformer
  # encoder-decoder, the transformer keys but pooling) maps copy/reverse sources to targets.
  # Each family takes the keys that are fields of its typed config (jaxmodels.models.registry); a key
  # of another family set to a value other than its default here is an error.
  c.model.family = "cnn"
  # A named configuration (jaxmodels.models.presets): gpt2, gpt2-medium, llama-tiny, llama-small,
  # tinyllama-1.1b, llama3.2-1b, resnet18, resnet50, vit-s16, vit-b16. It sets model.family and every
  # key of that family left at its default here; keys set in the experiment or on the command line win.
  c.model.preset = ""
  # Compute dtype: float32 | bfloat16 (mixed precision) | float16 (mixed precision with dynamic loss scaling,
  # train.loss_scale_period; jaxmodels/optim/precision.py)
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"  # storage dtype of parameters (and optimizer state): float32 | bfloat16
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
  c.model.num_layers = 2  # also the LSTM/GRU layer count, and encdec's encoder and decoder depth (each)
  c.model.num_heads = 4
  c.model.d_model = 128
  # Key/value heads (grouped-query attention), a divisor of num_heads; unset: num_heads (multi-head attention).
  c.model.num_kv_heads = config_dict.placeholder(int)
  c.model.d_ff = 512
  c.model.max_len = 256  # longest sequence (positions) the model accepts
  c.model.positions = "rotary"  # rotary | learned
  c.model.rope_theta = 10000.0  # rotary base wavelength (Llama 3: 500000)
  c.model.mlp = "swiglu"  # swiglu | gelu (tanh approximation, as GPT-2) | geglu (gelu(x W_gate) * x W_up: Gemma)
  c.model.norm_eps = 1e-6  # transformer and vit norms' epsilon (GPT-2 and Llama: 1e-5)
  c.model.use_bias = False  # biases on the attention and MLP projections (GPT-2, ViT)
  c.model.tie_embeddings = True  # LM head shares the token embedding
  c.model.scan_layers = True  # stack the blocks and run them with one lax.scan (compile time flat in depth)
  c.model.remat = "none"  # recompute activations in the backward pass: none | dots | full
  # auto (einsum; on GPUs jax.nn.dot_product_attention's choice) | einsum | xla | cudnn (jax.nn's implementations)
  # | splash (TPUs only: JAX's Pallas splash-attention kernel, causal or full; with a mask, xla)
  c.model.attention_impl = "auto"
  c.model.pooling = "mean"  # classifiers: mean | cls (transformer, vit) | last (lstm)
  # Transformer architecture variants (Hugging Face interop; jaxmodels.models.transformer.TransformerConfig)
  c.model.head_dim = config_dict.placeholder(int)  # each head's size; unset: d_model / num_heads (Qwen3, Gemma)
  # rotary frequencies stretched for long contexts (jaxmodels/models/rope.py): none | linear | llama3 | yarn
  c.model.rope_scaling = "none"
  c.model.rope_factor = 1.0  # rope_scaling's context-extension factor (Llama 3.1: 8, Llama 3.2: 32)
  c.model.rope_original_max_len = 8192  # llama3, yarn: the context length the model was pretrained at
  c.model.rope_low_freq_factor = 1.0  # llama3: wavelengths above rope_original_max_len / this are divided by factor
  c.model.rope_high_freq_factor = 4.0  # llama3: wavelengths below rope_original_max_len / this are kept
  c.model.rope_beta_fast = 32.0  # yarn: pairs making more rotations than this in rope_original_max_len are kept
  c.model.rope_beta_slow = 1.0  # yarn: pairs making fewer rotations than this are divided by factor
  c.model.rope_attention_factor = config_dict.placeholder(float)  # yarn: cos/sin scale; unset: 0.1 ln(factor) + 1
  # a query attends only to the W latest positions, itself included (Mistral's sliding window); unset: all
  c.model.sliding_window = config_dict.placeholder(int)
  c.model.qkv_bias = False  # biases on the query, key and value projections only (Qwen2); use_bias: on all
  c.model.qk_norm = "none"  # none | head (RMSNorm of each head's q and k: Qwen3) | full (all heads at once: OLMo 2)
  # pre: x + f(norm(x)) (GPT-2, Llama) | post: x + norm(f(x)) (OLMo 2) | sandwich: x + norm2(f(norm(x))) (Gemma 2)
  c.model.norm_position = "pre"
  c.model.embed_scale = False  # token embeddings times sqrt(d_model) (Gemma; a tied head uses the table unscaled)
  c.model.global_layer_every = 0  # with sliding_window: layers i with (i + 1) % this == 0 see all (Gemma 2: 2)
  c.model.attn_logit_softcap = config_dict.placeholder(float)  # attention scores c tanh(s / c) (Gemma 2: 50)
  c.model.final_logit_softcap = config_dict.placeholder(float)  # logits c tanh(z / c) (Gemma 2: 30)
  # attention scores divided by sqrt(this) instead of sqrt(head size) (Gemma 2's query_pre_attn_scalar)
  c.model.attention_scale_dim = config_dict.placeholder(float)
  # Mixture of experts (transformer; jaxmodels/models/moe.py, docs/models.md#mixture-of-experts)
  c.model.num_experts = 0  # expert MLPs (each d_ff wide) per MoE block; 0: dense MLPs only
  c.model.experts_per_token = 2  # top-k: experts each token visits, 1..num_experts
  c.model.num_shared_experts = 0  # experts every token visits besides its top-k (DeepSeekMoE)
  c.model.moe_every = 1  # every n-th block is MoE, the others dense; divides num_layers
  c.model.router = "softmax"  # softmax (top-k, weights renormalized: Mixtral) | sigmoid (DeepSeek-V3)
  c.model.capacity_factor = 0.0  # 0: dropless; > 0: an expert takes at most ceil(factor x tokens x k / experts)
  c.model.aux_loss_weight = 0.01  # load-balancing loss (Switch Transformer) weight in the training objective
  c.model.z_loss_weight = 0.001  # router z-loss (ST-MoE) weight in the training objective
  # LSTM / GRU
  c.model.cell = "lstm"  # lstm | gru
  c.model.hidden_size = 256
  c.model.bidirectional = False  # classifier only
  # ResNet (v1.5; torchvision's layout): BatchNorm after every conv, global average pool, one dense head
  c.model.stage_sizes = (2, 2, 2, 2)  # residual blocks per stage (ResNet-18; ResNet-50: (3, 4, 6, 3) bottleneck)
  c.model.block = "basic"  # basic (two 3x3 convs) | bottleneck (1x1, 3x3, 1x1, 4x wider output)
  c.model.width = 64  # channels of the first stage, doubled at each later stage
  c.model.stem = "imagenet"  # imagenet (7x7/2 conv + 3x3/2 max pool) | small (one 3x3/1 conv: 32x32 images)
  # ViT: patch embedding + the transformer keys above (d_model, num_heads, num_layers, d_ff, mlp, norm,
  # norm_eps, use_bias, pooling (cls | mean), dropout, scan_layers, remat, attention_impl)
  c.model.patch_size = 4  # square patches, one token each; divides the image height and width

  c.train = config_dict.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 64  # global batch per optimizer step
  c.train.grad_accum_steps = 1  # split each batch into this many micro-batches
  c.train.optimizer = "adamw"  # adamw | adam | sgd
  c.train.learning_rate = 1e-3  # peak learning rate
  c.train.schedule = "cosine"  # cosine (warmup + cosine decay) | linear | constant
  c.train.warmup_steps = 0  # linear warmup; one not below train.steps (a shortened run) becomes steps // 10, with a note
  c.train.end_lr_fraction = 0.0  # final learning rate as a fraction of the peak
  c.train.weight_decay = 0.0  # adamw: decoupled; adam/sgd: L2 on the gradient; never on biases or norm scales
  c.train.decay_embeddings = True  # weight decay on embedding tables (and a CLS token) too, as GPT-2/nanoGPT
  c.train.momentum = 0.9  # sgd only
  c.train.nesterov = False  # sgd only
  c.train.b1 = 0.9  # adam/adamw
  c.train.b2 = 0.999  # adam/adamw
  c.train.grad_clip = 0.0  # global-norm clip; 0 disables
  c.train.seed = 0  # in [0, 2**31): parameters, data order and dropout
  c.train.log_every = 50  # steps between train metric fetches (the only host syncs)
  c.train.eval_every = 500  # steps between evaluations; the last step always evaluates
  c.train.eval_batch_size = 256
  # data.task=regress: mse | mae | huber (delta 1); other tasks have their own loss (mae or huber there: an error).
  # Any task: your own, package.module:function, (outputs, targets) -> the loss of each target
  # (jaxmodels/tasks/losses.py).
  c.train.loss = "mse"
  # Eval metric top<k>_accuracy (classify, lm): the label among the k highest logits; 0 (or k >= classes): none.
  c.train.eval_top_k = 5
  # Non-finite loss: False stops the run (exit code 3) without saving; True skips those updates and counts them.
  c.train.skip_nonfinite = False
  # A second compile of the train or eval step (changed shape, dtype, sharding) warns; true makes it an error.
  c.train.fail_on_recompile = False
  # (first, last) step of a jax.profiler trace written to workdir/profile (TensorBoard/XProf, Perfetto).
  c.train.profile_steps = ()
  # model.dtype=float16: finite steps in a row after which the loss scale doubles (a non-finite gradient halves it
  # and skips the update); unused for other dtypes.
  c.train.loss_scale_period = 2000
  # Language models (Transformer): a vocabulary larger than this is scored by a cross-entropy over chunks of this
  # many vocabulary columns (jaxmodels/tasks/chunked.py), so the whole (tokens, vocab) float32 logits never exist
  # (Llama 3.2's 128,256: 2.1 GB a chip at 4,096 tokens); same loss and gradients. 0: whole logits always.
  c.train.logits_chunk = 8192
  # Decay d of an exponential moving average of the parameters (float32; ema <- d ema + (1 - d) params after each
  # update, from the initial parameters); 0: none. When set, evaluation (eval records, keep_best, early stopping,
  # `jaxmodels eval`) and export/load_model use the EMA in place of the raw parameters.
  c.train.ema_decay = 0.0
  # Weights & Biases project to log to (config once, then every train and eval record, from process 0); empty:
  # no W&B. Needs `pip install 'jaxmodels[tracking]'`. Run files go to workdir/wandb/ (a gs:// workdir: a local
  # temporary directory, copied there when the run ends).
  c.train.wandb_project = ""
  c.train.wandb_mode = ""  # online | offline (written locally; `wandb sync` uploads) | empty: $WANDB_MODE, else online
  # Stop when an eval metric stops improving; the run saves, logs why, exits 0, and keeps its best checkpoint.
  c.train.early_stopping = config_dict.ConfigDict()
  c.train.early_stopping.metric = ""  # an eval metric (as checkpoint.keep_best); empty: never stop early
  c.train.early_stopping.mode = "min"  # min | max: which way is better
  c.train.early_stopping.patience = 3  # evaluations in a row without improvement before stopping
  c.train.early_stopping.min_delta = 0.0  # an improvement is a change beyond this, in the metric's units
  # Magnitude pruning (jaxmodels.optim.pruning): the smallest weights are zeroed and stay exactly zero after every update.
  # Embeddings, norm scales and biases are never pruned. The sparsity ramps up on Zhu & Gupta's cubic schedule,
  # s_t = s_f (1 - (1 - (t - start_step) / (end_step - start_step))^3), the masks recomputed every `every` steps
  # (and at end_step). One-shot pruning of a trained run, then fine-tuning: checkpoint.restore_from=RUN with
  # start_step = end_step = 0 (pruned at the first step).
  c.train.pruning = config_dict.ConfigDict()
  c.train.pruning.sparsity = 0.0  # final fraction of prunable weights zeroed, in [0, 1); 0 = no pruning
  # unstructured | N:M (e.g. 2:4: N kept of every M consecutive weights along a kernel's input axis; then
  # sparsity must be 1 - N/M, and kernels whose input size M does not divide stay dense)
  c.train.pruning.pattern = "unstructured"
  c.train.pruning.scope = "layer"  # unstructured: layer (each tensor to the same sparsity) | global (one ranking)
  c.train.pruning.start_step = 0  # first mask update (sparsity 0 before it)
  c.train.pruning.end_step = 0  # last mask update, at the final sparsity (noted if past train.steps)
  c.train.pruning.every = 100  # steps between mask updates from start_step to end_step
  # Knowledge distillation (jaxmodels.train.distill; Hinton et al. 2015): the student trains on
  # loss = (1 - alpha) * hard-label loss + alpha * T^2 * KL(teacher_T || student_T), the KL between the
  # temperature-T softmaxes of the teacher's and the student's logits. The teacher's forward pass runs in the same
  # compiled step; it must have been trained on the same data (task, input shape, classes or vocabulary) with
  # the same held-out split (data.source, data.path, test_fraction and train.seed, or val_fraction).
  c.train.distill = config_dict.ConfigDict()
  c.train.distill.teacher = ""  # the teacher run's workdir (local or gs://; newest checkpoint); empty = off
  # Defaults after Hinton et al. (2015): T in 2..20, lower (2.5..4) for small students, and "a considerably lower
  # weight" on the hard labels. On digits_cnn's half-width student (600 steps) T=2, alpha=0.9 beat the student
  # trained alone on accuracy and loss on seeds 0 and 1 and lost no accuracy on seeds 2, 3; alpha=0.5 tied seed 1's
  # accuracy, T >= 4 raised seed 0's loss. The text transformer's student prefers alpha=0.5 (docs/compression.md's table).
  c.train.distill.temperature = 2.0  # T > 0: softens both distributions; T^2 keeps the KL gradient's scale
  c.train.distill.alpha = 0.9  # in [0, 1]: weight of the KL term (0: the hard labels only, 1: the teacher only)
  # Quantization-aware training through qwix (jaxmodels/compress/quantization.py): the forward pass computes the matmul of
  # every dense (nnx.Linear) and conv layer on fake-quantized integer weights, per output channel, with
  # straight-through gradients; embeddings, norms and attention's q.k and p.v einsums stay float. Parameters stay
  # float (checkpoints, resume and export as usual). Post-training: `jaxmodels compress`.
  c.train.quantization = config_dict.ConfigDict()
  c.train.quantization.bits = 0  # 0: off | 8 | 4 (int8 / int4 weights); every family; float32 or bfloat16 compute
  c.train.quantization.activations = False  # also quantize each dense layer's inputs (dynamic per-row scales)
  # Regex over module paths (qwix's, '/'-joined: stack/blocks/attn/query, convs/0, out) kept in float: by default
  # the embeddings (a tied LM head is the embedding); add e.g. |out|head to keep a final layer in float, as is
  # common at 4 bits. Convolutions always quantize their inputs too (qwix's integer conv needs both operands).
  c.train.quantization.exclude = "(.*/)?(pos_)?embed"
  # Fine-tuning (jaxmodels.optim.freezing). Patterns are regexes searched in parameter paths, names joined by '/'
  # (stack/blocks/attn/query/kernel, embed/embedding, layers/0/bias), as parallel.fallback_rules.
  c.train.freeze = ()  # parameters frozen: no gradient, no update, no optimizer state (e.g. ("embed", "stack/blocks"))
  # (pattern, multiplier) pairs: a parameter's updates are scaled by the multiplier of the first pattern found in
  # its path (1 where none is), e.g. (("embed", 0.1),); 0 leaves it unchanged but, unlike train.freeze, keeps its
  # optimizer state.
  c.train.lr_multipliers = ()
  # LoRA (Hu et al. 2021; jaxmodels.models.lora): each selected Linear layer's kernel W is frozen and learns
  # W + (alpha / rank) A B instead, A (in, rank) and B (rank, out) the only trained parameters (every other
  # parameter frozen too, without optimizer state). Checkpoints hold W, A and B; `jaxmodels export` merges them.
  c.train.lora = config_dict.ConfigDict()
  c.train.lora.rank = 0  # r: 0 = off; Hu et al. use 1-64 (4 and 8 most)
  c.train.lora.alpha = 16.0  # the update's scale is alpha / rank (so a rank change needs no new learning rate)
  # Regexes over the Linear layers' kernel paths: adapted where one is found. Default: attention's query and value
  # projections (Hu et al.); all of a Transformer's: ("attn", "mlp"); an MLP's: ("hidden", "out").
  c.train.lora.targets = ("query", "value")

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every = 500  # steps between async saves (the last step is always saved); 0: only the last
  c.checkpoint.keep = 3  # newest checkpoints kept
  # Also keep the best by this eval metric (Experiment.evaluate lists them): loss, accuracy, top<k>_accuracy;
  # classify: {precision,recall,f1}_{macro,weighted}; binary: f1, roc_auc, ...; regress: mse, mae, r2;
  # LMs: perplexity, bits_per_*.
  c.checkpoint.keep_best = ""
  c.checkpoint.best_mode = "min"  # min | max: which end of keep_best is best
  # Start a new run from another run's checkpoint: its workdir, checkpoints/ or checkpoints/<step>; or from the
  # parameters of a `jaxmodels export` / `import-hf` directory (restore_mode=params; same family and shapes).
  c.checkpoint.restore_from = ""
  c.checkpoint.restore_mode = "params"  # params (fresh optimizer, step 0) | full (continue its state)

  c.parallel = config_dict.ConfigDict()
  # single | dp | fsdp | tp | pmap (see jaxmodels/parallel/__init__.py and docs/parallelism.md).
  c.parallel.strategy = "single"
  # Mesh axis sizes (axes stage, data, fsdp, context, tensor, expert), e.g. "data=2,tensor=4"; -1 fills the
  # remaining devices. Empty: the strategy's default (dp: data=-1, fsdp: fsdp=-1, tp: tensor=-1, pmap: data=-1).
  # context=C splits each sequence over C devices (Transformer LM only; data.seq_len divisible by 2 x C).
  # expert=E (MoE models) splits the experts over E devices, the batch too; e.g. "data=2,expert=4".
  # stage=S: pipeline parallelism (parallel.pipeline_microbatches, parallel.pipeline_repeats below).
  c.parallel.mesh = ""
  # Mesh axes that cross TPU slices (the slower DCN network), e.g. "data=2" for two slices: each size
  # divides that axis of parallel.mesh, whose rest stays inside a slice (ICI). On platforms without
  # slices (CPU, GPU) each process stands for one. Empty: a single slice.
  c.parallel.dcn_mesh = ""
  # Logical parameter axis -> mesh axis (None: not split).
  c.parallel.rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", None),
                      ("conv_in", None), ("conv_out", "fsdp"), ("layers", "stage"), ("expert", "expert"))
  # Pipeline parallelism over the mesh axis `stage` (e.g. parallel.mesh="stage=4,data=2"; the Transformer LM with
  # scanned layers only; jaxmodels/parallel/pipeline.py): micro-batches per step (0: one per stage; at least
  # the stage count, dividing train.batch_size / train.grad_accum_steps) and the circular schedule's repeats R
  # (each device runs R non-adjacent stages; stage x R divides model.num_layers). Idle (bubble) fraction:
  # (stages - 1) / (microbatches x R + stages - 1).
  c.parallel.pipeline_microbatches = 0
  c.parallel.pipeline_repeats = 1
  # Logical activation axis -> mesh axis, tuple of mesh axes, or None (not split). Pins the
  # activations (MaxText's names) so each device computes on its share of the batch; under fsdp
  # the weights are then gathered, never the batch. A dimension the axes do not divide stays whole.
  # activation_norm_length -> tensor is sequence parallelism: the residual stream, norms, dropout and
  # logits split their tokens over `tensor` between the tensor-parallel regions (None: kept whole).
  # activation_length -> context is context parallelism: every activation holds 1/C of each sequence.
  c.parallel.activation_rules = (("activation_batch", ("data", "fsdp", "expert")), ("activation_length", "context"),
                                 ("activation_norm_length", "tensor"), ("activation_embed", None),
                                 ("activation_heads", "tensor"), ("activation_mlp", "tensor"),
                                 ("activation_vocab", "tensor"))
  # For parameters without logical names: (path regex, mesh axis); the first match splits the
  # parameter's largest dimension divisible by that axis.
  c.parallel.fallback_rules = ((".*", "fsdp"),)
  # Multi-process jobs (set automatically by `jaxmodels launch`, TPU pod slices and SLURM).
  c.parallel.coordinator_address = ""  # host:port of process 0
  c.parallel.num_processes = 1
  c.parallel.process_id = 0
  c.parallel.init_timeout_s = 300
  c.parallel.heartbeat_timeout_s = 100
  c.lock()
  return c


def text_lm_config() -> config_dict.ConfigDict:
  """Defaults shared by the character language-model experiments (text_transformer, text_lstm)."""
  c = default_config()
  c.data.source = "text"
  c.data.seq_len = 64
  c.train.update(dict(steps=600, batch_size=32, learning_rate=3e-3, warmup_steps=100, grad_clip=1.0,
                      log_every=100, eval_every=200, eval_batch_size=64))
  return c
