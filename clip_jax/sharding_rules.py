"""The mesh axes and the default logical-axis rules (`config.sharding_rules`), as
plain data: config files read them without importing JAX; `sharding` applies them."""

# dcn_data: data parallelism across TPU slices (or hosts) over the data-centre
# network, outermost so that only the gradient reduction crosses it; data, fsdp
# and tensor within a slice.
MESH_AXES = ("dcn_data", "data", "fsdp", "tensor")

# Logical axis -> mesh axis (None: replicated), config.sharding_rules' default.
# FSDP (ZeRO-3) splits the weights' `embed` over fsdp and the activations' batch
# over dcn_data x data x fsdp; Megatron-style tensor parallelism splits
# `mlp`/`heads` of both over tensor.
DEFAULT_RULES = (
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("joint", None),
    ("layers", None),  # the stacked-blocks axis of scan_layers=True
    # Activations (clip_jax/models/partitioning.py).
    ("activation_batch", ("dcn_data", "data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
)
# The batch dimension is split over these axes (data parallel across and within
# slices, plus FSDP).
BATCH_AXES = ("dcn_data", "data", "fsdp")
