"""`jaxmodels compress`: a run quantized or pruned, exported, and reported before and after."""

from jaxmodels.cli.arguments import parse_args
from jaxmodels.optim.pruning import SCOPES
from jaxmodels.tools.compress import ACTIVATIONS, METHODS, compress

__all__ = ["run"]


def run(prog: str, args: list[str]) -> int:
  """usage: jaxmodels compress --workdir DIR --method ptq [--bits 8|4] [--activations [static|dynamic]]
                            [--calibration-batches N] --out PATH
       jaxmodels compress --workdir DIR --method prune (--sparsity S [--scope layer|global] | --pattern N:M) --out PATH

Compresses the newest checkpoint of the run in DIR and writes it to PATH (empty or new; local or gs://) as an
export: jaxmodels.load_model(PATH) returns the compressed module, and `eval` and `sample` take PATH as --workdir.
Prints and writes PATH/compression.json: parameters, non-zero parameters, bytes on disk, eval metrics and
inference time per eval batch, before and after.
  --method ptq: post-training quantization (qwix) of the weights to --bits integers (default: the run's
    train.quantization.bits if it trained quantization-aware, else 8), per output channel;
    --activations (static) also quantizes the input of every dense and conv layer (to --bits integers; int8 in
    a convolution), with one scale per tensor (per layer of a stack) fixed by a calibration pass: the largest
    |input| over the run's first --calibration-batches training batches (default 8), as the run saw them.
    --activations dynamic computes a scale per row on the fly instead (no calibration). Without --activations
    convolutions still quantize their inputs, dynamically (qwix's int8 convolution takes two int8 operands).
    Quantized inputs (--activations, a convolution) of a float16 run are refused: qwix rescales their int32
    products in float16, which overflows.
  --method prune: one-shot magnitude pruning; embeddings, norm scales and biases are kept. --sparsity S in (0, 1)
    zeroes that fraction of the smallest weights of each kernel (--scope layer, the default) or of all kernels
    ranked together (--scope global); --pattern N:M keeps the N largest of every M consecutive inputs of a kernel
    (sparsity 1 - N/M). The zeros are stored dense. To fine-tune after it, train with
    --config.checkpoint.restore_from=DIR and the same train.pruning.* (start_step = end_step = 0).
"""
  a = parse_args(prog, args, [("--workdir", dict(required=True)), ("--method", dict(required=True, choices=METHODS)),
                              ("--bits", dict(type=int)),
                              ("--activations", dict(nargs="?", const="static", choices=ACTIVATIONS)),
                              ("--calibration-batches", dict(type=int)),
                              ("--sparsity", dict(type=float)), ("--pattern", dict()),
                              ("--scope", dict(choices=SCOPES)), ("--out", dict(required=True))])
  compress(a.workdir, a.method, a.out, bits=a.bits, activations=a.activations,
           calibration_batches=a.calibration_batches, sparsity=a.sparsity,
           pattern=a.pattern, scope=a.scope)
  print(f"wrote {a.out}")
  return 0
