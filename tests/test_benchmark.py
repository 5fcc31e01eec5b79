"""The memory benchmark: compiled per-device bytes of the loss vs global batch."""

import json

from clip_jax import benchmark


def loss_bytes(loss, global_batch):
    # Small embeddings and chunks so that logits dominate already at small batches.
    return benchmark.loss_memory(loss, global_batch, num_devices=8, embed_dim=64,
                                 chunk_size=128)["bytes_per_device"]


def test_chunked_softmax_memory_grows_linearly_with_the_global_batch():
    growth = loss_bytes("softmax_chunked", 4096) / loss_bytes("softmax_chunked", 1024)
    assert 3 < growth < 6  # linear: ~4x for a 4x batch, far from the 16x of B x B logits


def test_chunked_sigmoid_ring_memory_grows_linearly_with_the_global_batch():
    # B_local 512 -> 2048, chunks of 128: the plain ring's [B_local, B_local] would be 16x.
    growth = loss_bytes("sigmoid_chunked", 16384) / loss_bytes("sigmoid_chunked", 4096)
    assert 3 < growth < 6


def test_the_measurement_sees_the_plain_softmax_logits():
    """The plain softmax holds [B_local, B_global] logits per device, quadratic
    in B at a fixed device count; the benchmark must be able to see that."""
    growth = loss_bytes("softmax", 4096) / loss_bytes("softmax", 1024)
    assert growth > 8


def test_json_lines_have_the_documented_keys(capsys):
    benchmark.main(["memory", "--json", "--batches", "64,256"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * len(benchmark.LOSS_SETTINGS)
    for line in lines:
        row = json.loads(line)
        assert {"loss", "global_batch", "devices", "bytes_per_device"} <= set(row)
        assert row["devices"] == 8 and row["bytes_per_device"] > 0


def test_data_benchmark_reads_the_same_shards_in_both_pipelines(capsys):
    """Tiny run of `benchmark data`: both readers produce full batches of the
    shards' samples; figures are for the README, not asserted."""
    benchmark.main(["data", "--synthetic", "40", "--image-size", "32", "--batch-size", "8",
                    "--batches", "2", "--workers", "2", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [row["pipeline"] for row in rows] == ["prepare (once)", "clip_jax",
                                                "open_clip-style webdataset"]
    assert rows[0]["samples"] == 40
    assert all(row["samples_per_sec"] > 0 and row["cores"] >= 1 for row in rows)
