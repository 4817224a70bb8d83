"""Joining a multi-process job through `jax.distributed`, before anything touches a backend.

A process is part of a multi-process job when any of these says so:
- the environment set by `jaxmodels launch` (or by hand): JAXMODELS_COORDINATOR
  (host:port), JAXMODELS_NUM_PROCESSES, JAXMODELS_PROCESS_ID;
- the config: parallel.coordinator_address, parallel.num_processes > 1, parallel.process_id;
- JAXMODELS_DISTRIBUTED=auto (set by tpu/run.sh), a Cloud TPU VM slice with
  several hosts (TPU_WORKER_HOSTNAMES lists more than one) or a SLURM job with
  several tasks (`slurm/train.sbatch`, docs/slurm.md): JAX detects the
  coordinator and process ids itself (under SLURM: the first node of
  SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, and GPU SLURM_LOCALID).
Otherwise nothing happens, and a single process sees its local devices.
"""

import os

import jax

from jaxmodels.runtime.errors import UserError

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "initialize", "job_settings"]

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAXMODELS_COORDINATOR", "JAXMODELS_NUM_PROCESSES", "JAXMODELS_PROCESS_ID")


def job_settings(parallel_config) -> dict | None:
  """Arguments for jax.distributed.initialize, {} to let JAX detect them, None for a single process."""
  env = os.environ
  if env.get(ENV_COORDINATOR):
    return {"coordinator_address": env[ENV_COORDINATOR], "num_processes": int(env[ENV_NUM_PROCESSES]),
            "process_id": int(env[ENV_PROCESS_ID])}
  if parallel_config.coordinator_address and parallel_config.num_processes > 1:
    return {"coordinator_address": parallel_config.coordinator_address,
            "num_processes": parallel_config.num_processes, "process_id": parallel_config.process_id}
  if (env.get("JAXMODELS_DISTRIBUTED") == "auto" or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
      or int(env.get("SLURM_NTASKS", "1")) > 1):
    return {}
  return None


def initialize(parallel_config) -> bool:
  """Joins the job if this process belongs to one; True if it did. Calling it twice is harmless."""
  settings = job_settings(parallel_config)
  if settings is None or jax.distributed.is_initialized():
    return settings is not None
  address = settings.get("coordinator_address")
  if address is not None and ":" not in address:
    raise UserError(f"coordinator address {address!r} needs an explicit port (host:port)")
  # CPU processes exchange collectives over gloo; accelerators use their own (NCCL, ICI).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**settings, initialization_timeout=parallel_config.init_timeout_s,
                             heartbeat_timeout_seconds=parallel_config.heartbeat_timeout_s)
  return True
