"""One process of the 2-process test in test_multihost.py (not collected by pytest).

Usage: python tests/multihost_worker.py PROCESS_ID PORT OUTPUT_JSON
Each process owns 4 CPU devices and feeds its half of a fixed global batch.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id, port, output):
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from clip_jax import sharding  # noqa: E402  (after distributed init)
    from tests.conftest import small_config  # noqa: E402
    from tests.test_train_step import build, random_batch  # noqa: E402

    config = small_config(**{"mesh.data": 8, "optimizer.warmup_steps": 0})
    step, state = build(config, jax.devices())
    global_batch = random_batch(config)
    local_rows = slice(process_id * 8, (process_id + 1) * 8)
    batch_sharding = sharding.batch_sharding(sharding.make_mesh(config.mesh))
    batch = {key: jax.make_array_from_process_local_data(batch_sharding, value[local_rows])
             for key, value in global_batch.items()}
    state, metrics = step(state, batch)
    logit_scale = float(jax.device_get(state.params["logit_scale"]))
    with open(output, "w") as f:
        json.dump({"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                   "logit_scale": logit_scale, "devices": jax.device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
