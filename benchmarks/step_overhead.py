"""Host overhead of the jaxmodels train step against a hand-written pure JAX + Optax step.

    python benchmarks/step_overhead.py [--steps 2000] [--repeats 5]

Both steps train the same tiny MLP (64 -> 128 -> 10, ReLU, batch 32, Adam) on the
same device-resident batch in the same process and return the same things: the
new state with its step counter, and the loss, accuracy and gradient norm that
the jaxmodels step logs. The per-step time is then almost all host work
(Python, pytree flattening, dispatch), and the ratio is the framework's
overhead. Prints the median step time of each and their ratio (target <= 1.2x).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxmodels.models import MLP
from jaxmodels.train import TrainState, make_steps, split_model

D_IN, HIDDEN, CLASSES, BATCH, LR = 64, 128, 10, 32, 1e-3


def jaxmodels_step():
  model = MLP((D_IN,), (HIDDEN,), CLASSES, rngs=nnx.Rngs(0))
  graphdef, params, model_state = split_model(model)
  tx = optax.adam(LR)
  train_step = jax.jit(make_steps(graphdef, tx, seed=0)[0], donate_argnums=0)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                     opt_state=tx.init(params))
  return train_step, state


def pure_jax_step():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(k1, (D_IN, HIDDEN)) * D_IN**-0.5, "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) * HIDDEN**-0.5, "b2": jnp.zeros(CLASSES)}
  tx = optax.adam(LR)

  def loss_fn(p, batch):
    h = jax.nn.relu(batch["x"] @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), logits

  def step(state, batch):
    count, p, opt_state = state
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
    updates, opt_state = tx.update(grads, opt_state, p)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
    metrics = jnp.stack([loss, accuracy, optax.tree.norm(grads)])
    return (count + 1, optax.apply_updates(p, updates), opt_state), metrics

  return jax.jit(step, donate_argnums=0), (jnp.zeros((), jnp.int32), params, tx.init(params))


def time_steps(step, state, batch, steps: int) -> tuple[float, object]:
  state, m = step(state, batch)  # compile and warm up
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t0) / steps, state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  batch = jax.device_put({"x": jax.random.normal(jax.random.key(1), (BATCH, D_IN)),
                          "y": jnp.arange(BATCH) % CLASSES})
  ours, ours_state = jaxmodels_step()
  pure, pure_state = pure_jax_step()
  ours_t, pure_t = [], []
  for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
    t, ours_state = time_steps(ours, ours_state, batch, args.steps)
    ours_t.append(t)
    t, pure_state = time_steps(pure, pure_state, batch, args.steps)
    pure_t.append(t)
  o, p = statistics.median(ours_t), statistics.median(pure_t)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"jaxmodels train step: {o * 1e6:8.1f} us/step (median of {args.repeats} x {args.steps})")
  print(f"pure JAX + Optax:     {p * 1e6:8.1f} us/step")
  print(f"ratio:                {o / p:8.2f}x")


if __name__ == "__main__":
  main()
