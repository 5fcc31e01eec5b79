"""Per-device memory of the sharded contrastive losses and of the tiny train
step against the global batch, from XLA's compiled memory analysis on
simulated devices (data=8); nothing is allocated or run."""

import json
import math

import jax
import jax.numpy as jnp

from clip_jax import capacity, config_files, losses, sharding

# Benchmark name -> contrastive_loss arguments. The chunked losses hold
# [B_local, chunk_size] logits at a time (linear in B at a fixed device count);
# the plain softmax [B_local, B_global] and the plain sigmoid ring
# [B_local, B_local] (both quadratic), shown for contrast.
LOSS_SETTINGS = {
    "softmax": dict(kind="softmax", chunk_size=0),
    "softmax_chunked": dict(kind="softmax", chunk_size=512),
    "sigmoid": dict(kind="sigmoid", chunk_size=0),
    "sigmoid_chunked": dict(kind="sigmoid", chunk_size=128),
}


DEFAULT_BATCHES = (1024, 4096, 16384, 32768)


def data_parallel_mesh(num_devices):
    """A mesh with the batch split num_devices ways (data=num_devices)."""
    return sharding.make_mesh({"data": num_devices, "fsdp": 1, "tensor": 1},
                              jax.devices()[:num_devices])


def loss_memory(loss, global_batch, num_devices=8, embed_dim=512, chunk_size=None):
    """Per-device bytes of the loss and its gradient w.r.t. both embeddings
    [global_batch, embed_dim], batch sharded over num_devices; compiled, not run.
    chunk_size, if given, replaces the chunked losses' chunk (the others have none)."""
    settings = dict(LOSS_SETTINGS[loss])
    if chunk_size is not None and settings["chunk_size"]:
        settings["chunk_size"] = chunk_size
    mesh = data_parallel_mesh(num_devices)
    loss_fn = losses.contrastive_loss(mesh, sharding.BATCH_AXES, **settings)

    def loss_and_grads(image, text, scale, bias):
        return jax.value_and_grad(lambda i, t: loss_fn(i, t, scale, bias)["loss"],
                                  argnums=(0, 1))(image, text)

    embeddings = jax.ShapeDtypeStruct((global_batch, embed_dim), jnp.float32,
                                      sharding=sharding.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    compiled = jax.jit(loss_and_grads).lower(embeddings, embeddings, scalar, scalar).compile()
    return {"part": "loss", "loss": loss, "global_batch": global_batch, "devices": num_devices,
            "embed_dim": embed_dim, "chunk_size": settings["chunk_size"],
            **capacity.memory_bytes(compiled)}


def _mib(n):
    return f"{n / 2**20:10.2f}"


def measure_all(measure, batches, as_json):
    """[measure(loss, batch) for every loss and batch], each with its growth
    normalised to a 4x larger batch (~4: linear, ~16: quadratic); JSON lines
    are printed as they come."""
    rows = []
    for loss in LOSS_SETTINGS:
        previous = None
        for batch in batches:
            row = measure(loss, batch)
            row["growth_per_4x_batch"] = None if previous is None else round(
                (row["bytes_per_device"] / previous["bytes_per_device"])
                ** (math.log(4) / math.log(batch / previous["global_batch"])), 2)
            previous = row
            rows.append(row)
            if as_json:
                print(json.dumps(row), flush=True)
    return rows


def print_table(title, rows):
    print(title)
    print(f"{'loss':<16} {'global_batch':>12} {'temp':>10} {'argument':>10} {'output':>10} "
          f"{'total':>10} {'growth per 4x B':>16}")
    for row in rows:
        growth = row["growth_per_4x_batch"]
        print(f"{row['loss']:<16} {row['global_batch']:>12} {_mib(row['temp'])} "
              f"{_mib(row['argument'])} {_mib(row['output'])} {_mib(row['bytes_per_device'])} "
              f"{'' if growth is None else f'{growth:.2f}':>16}", flush=True)


def train_step_memory(loss, global_batch, num_devices=8):
    """Per-device bytes of the `tiny` preset's full train step (data=num_devices)."""
    settings = LOSS_SETTINGS[loss]
    config = config_files.load("tiny")
    with config.unlocked():
        config.batch_size = global_batch
        config.mesh.update(data=num_devices, fsdp=1, tensor=1)
        config.loss.update(settings)
        if settings["kind"] == "sigmoid":
            config.model.logit_bias_init = -10.0
    step, state, batch, _ = capacity.abstract_train_step(config, jax.devices()[:num_devices])
    compiled = step.lower(state, batch).compile()
    return {"part": "train_step_tiny", "loss": loss, "global_batch": global_batch,
            "devices": num_devices, "chunk_size": settings["chunk_size"],
            **capacity.memory_bytes(compiled)}


def run_memory(batches, as_json, train_step):
    """Measures the loss part (and optionally the tiny train step) at every batch."""
    rows = measure_all(loss_memory, batches, as_json)
    chunks = ", ".join(f"{name}: chunk_size={settings['chunk_size']}"
                       for name, settings in LOSS_SETTINGS.items() if settings["chunk_size"])
    if not as_json:
        print_table(f"Loss + gradient w.r.t. both embeddings [B, {rows[0]['embed_dim']}] float32, "
                    f"per device, data={rows[0]['devices']}, MiB ({chunks}):", rows)
    if train_step:
        rows = measure_all(train_step_memory, batches, as_json)
        if not as_json:
            print_table(f"Full train step of the `tiny` preset, per device, "
                        f"data={rows[0]['devices']}, MiB:", rows)
