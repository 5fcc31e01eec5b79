"""Benchmarks: compiled per-device bytes of the loss vs global batch, the data and
train-step benchmarks' plumbing, and the OpenCLIP side-by-side architecture."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clip_jax import benchmark, huge_pages, references
from clip_jax.benchmarks import accelerator as accelerator_bench
from clip_jax.benchmarks import memory as memory_bench
from clip_jax.benchmarks import train as train_bench
from clip_jax.models import transformer
from configs.clip import get_config


def loss_bytes(loss, global_batch):
    # Small embeddings and chunks so that logits dominate already at small batches.
    return memory_bench.loss_memory(loss, global_batch, num_devices=8, embed_dim=64,
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
    assert len(lines) == 2 * len(memory_bench.LOSS_SETTINGS)
    for line in lines:
        row = json.loads(line)
        assert {"loss", "global_batch", "devices", "bytes_per_device"} <= set(row)
        assert row["devices"] == 8 and row["bytes_per_device"] > 0


def test_data_benchmark_reads_the_same_shards_in_both_pipelines(capsys):
    """Tiny run of `benchmark data`: both readers produce full batches of the
    shards' samples; figures are for the README, not asserted."""
    benchmark.main(["data", "--synthetic", "40", "--source-side", "64", "--image-size", "32",
                    "--batch-size", "8", "--batches", "2", "--workers", "1,2", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [(row["pipeline"], row["workers"]) for row in rows] == [
        ("prepare (once)", 2), ("clip_jax", 1), ("open_clip-style webdataset", 1),
        ("clip_jax", 2), ("open_clip-style webdataset", 2)]
    assert rows[0]["samples"] == 40
    assert all(row["samples_per_sec"] > 0 and row["cores"] >= 1 for row in rows)
    assert all(row["consumer_cpu_us_per_sample"] > 0 for row in rows if row["pipeline"] == "clip_jax")


def test_train_benchmark_reports_its_keys_and_the_ratio_to_open_clip():
    """One step of a one-block tiny model in both trainers, as `python -m` runs
    it (so with the host pages clip_jax/huge_pages.py picks for this machine);
    the figures are for the README, here only their presence and arithmetic are
    checked."""
    pytest.importorskip("torch")
    environment = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
    child = subprocess.run(
        [sys.executable, "-m", "clip_jax.benchmark", "train", "--config", "tiny",
         "--batch-size", "8", "--steps", "1", "--warmup", "0", "--set", "model.image.layers=1",
         "--set", "model.text.layers=1", "--reference", "open_clip", "--json"],
        env=environment, capture_output=True, text=True, check=True)
    row = json.loads(child.stdout.strip().splitlines()[-1])
    assert row["huge_pages"] == (huge_pages.tunables_with_huge_pages(
        environment, huge_pages.glibc_version(), huge_pages.thp_mode(),
        huge_pages.accelerator_visible(environment)) is not None)
    for key in ("samples_per_sec", "step_time_s", "compile_time_s", "flops_per_step", "mfu",
                "peak_memory_bytes", "reference_samples_per_sec", "reference_step_time_s"):
        assert key in row, key
    assert row["mfu"] is None  # CPUs have no peak in the table
    assert row["samples_per_sec"] == pytest.approx(8 / row["step_time_s"])
    assert row["speedup"] == pytest.approx(row["samples_per_sec"]
                                           / row["reference_samples_per_sec"])
    assert np.isfinite(row["loss"])


def test_train_takes_the_trainers_config_arguments():
    """--config FILE.py:ARG and --config.key=value (or `--config.key value`), as
    the trainer takes them, name the same config as VARIANT and --set."""
    argv = benchmark.config_overrides_as_sets(
        ["train", "--config", "configs/clip.py:ViT-B-16", "--config.model.remat=full",
         "--config.optimizer.lr", "0.001", "--json"])
    assert argv == ["train", "--config", "configs/clip.py:ViT-B-16", "--set", "model.remat=full",
                    "--set", "optimizer.lr=0.001", "--json"]
    from_file = train_bench.train_config("configs/clip.py:ViT-B-16", 64,
                                       sets=["model.remat=full", "optimizer.lr=0.001"])
    by_name = train_bench.train_config("ViT-B-16", 64)
    with by_name.unlocked():
        by_name.model.remat, by_name.optimizer.lr = "full", 0.001
    assert from_file.to_dict() == by_name.to_dict()


@pytest.mark.parametrize("arguments, message", [
    (["--config", "no/such/file.py:ViT-B-32"],
     "config error: --config: no such file 'no/such/file.py'"),
    (["--config", "ViT-Q-99"], "config error: unknown config variant 'ViT-Q-99'"),
    (["--config.model.nope=1"], "config error: no config key 'model.nope'"),
])
def test_train_config_errors_are_one_line(arguments, message):
    with pytest.raises(SystemExit) as stopped:
        benchmark.main(["train", *arguments])
    assert str(stopped.value).startswith(message) and "\n" not in str(stopped.value)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16-quickgelu", "ViT-L-14"])
def test_reference_architecture_is_open_clips_own(name):
    """The side-by-side OpenCLIP model built from our config has exactly the
    parameters of OpenCLIP's config of the same name."""
    torch = pytest.importorskip("torch")
    model_lib, _, _ = references.open_clip_modules()
    with torch.device("meta"):
        ours = model_lib.CLIP(**references.open_clip_model_kwargs(get_config(name).model))
        theirs = model_lib.CLIP(**references.open_clip_config(name))
    assert ({k: v.shape for k, v in ours.state_dict().items()}
            == {k: v.shape for k, v in theirs.state_dict().items()})
    assert ours.visual.transformer.resblocks[0].mlp.gelu.__class__ is \
        theirs.visual.transformer.resblocks[0].mlp.gelu.__class__


def test_the_device_check_runs_on_cpu_and_writes_its_json(tmp_path, capsys):
    output = tmp_path / "accelerator.json"
    benchmark.main(["accelerator", "--tiny", "--output", str(output),
                    "--trace-dir", str(tmp_path / "traces")])
    document = json.loads(output.read_text())
    assert document["platform"] == "cpu" and document["not_measured_within_budget"] == []
    # lean_backward=auto is on on CPUs: the platform's default goes first.
    assert [(row["attention"], row["lean_backward"]) for row in document["rows"]] == [
        ("xla", "on"), ("xla", "off")]
    for row in document["rows"]:
        assert row["batch_per_device"] == 32 and row["dtype"] == "bfloat16"
        assert row["samples_per_sec"] > 0 and row["flops_per_step"] > 0
        profile = row["profile"]
        assert profile["op_s_per_step"]["matmul"] > 0 and 0 < profile["busy_fraction"] <= 1.01
        assert profile["unattributed_fraction"] == 0
        assert row["roofline"] is None  # a GPU's only
    assert sorted(path.name for path in (tmp_path / "traces").iterdir()) == [
        "tiny_xla_lean-off_unrolled_32.xplane.pb", "tiny_xla_lean-on_unrolled_32.xplane.pb"]
    table = capsys.readouterr().out
    assert "| tiny | xla | on | unrolled | none | default | 32 |" in table
    assert "| tiny | xla | off | unrolled | none | default | 32 |" in table
    fastest = document["fastest"]["models"]["tiny"]
    assert fastest["variant"][0] == "xla" and fastest["speedup_over_auto"] >= 1
    assert "fastest for tiny: attention=xla" in table


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_the_device_check_starts_from_the_defaults_and_tries_each_loop_and_remat(platform):
    """An accelerator's first variant is what `auto` resolves to there (layer
    loop, attention, autodiff's backward passes) without remat; the other
    layer loop, and both loops keeping only matmul outputs, are among the rest,
    each variant once."""
    found = accelerator_bench.variants(platform)
    auto = transformer.attention_implementation("auto", "bfloat16", platform)
    loop = "unrolled" if transformer.unrolled_layer_loop("auto", platform) else "scan"
    assert found[0] == (auto, "off", loop, "none")
    assert loop == "unrolled"
    assert len(set(found)) == len(found)
    assert {(loop, remat) for _, _, loop, remat in found} == {
        ("scan", "none"), ("unrolled", "none"), ("unrolled", "dots_saveable"),
        ("scan", "dots_saveable")}
    dots_first = [loop for _, _, loop, remat in found if remat == "dots_saveable"][0]
    assert dots_first == ("unrolled" if transformer.unrolled_layer_loop(
        "auto", platform, "dots_saveable") else "scan")


def _row(model, variant, samples, batch=128, flag_set=""):
    attention, lean, loop, remat = variant
    return {"model": model, "attention": attention, "lean_backward": lean, "layer_loop": loop,
            "remat": remat, "flag_set": flag_set, "batch_per_device": batch,
            "samples_per_sec_per_device": samples}


def test_the_device_check_names_the_fastest_settings_per_model():
    """Each model's fastest variant at its auto settings' batch (a variant that fell
    to a smaller batch is not compared), the one variant fastest for every
    model, and each flag set's speed-up on the first model's auto settings."""
    auto, unrolled, xla = (("cudnn", "off", "scan", "none"), ("cudnn", "on", "unrolled", "none"),
                           ("xla", "off", "scan", "none"))
    rows = [_row("m1", auto, 100.0), _row("m1", unrolled, 150.0),
            _row("m2", auto, 50.0), _row("m2", unrolled, 60.0),
            _row("m1", auto, 110.0, flag_set="cuBLAS GEMMs"),
            {**_row("m1", auto, 0.0, flag_set="no CUDA graphs"), "error": "crashed"},
            _row("m1", xla, 300.0, batch=64), {**_row("m2", xla, 0.0), "error": "failed"}]
    found = accelerator_bench.fastest_settings(rows)
    assert found["variant"] == list(unrolled)
    assert found["models"]["m1"]["speedup_over_auto"] == pytest.approx(1.5)
    assert found["models"]["m2"]["speedup_over_auto"] == pytest.approx(1.2)
    assert found["flag_sets"] == {"cuBLAS GEMMs": pytest.approx(1.1)}
    # Models that disagree leave the shared choice open.
    rows[3]["samples_per_sec_per_device"] = 40.0
    found = accelerator_bench.fastest_settings(rows)
    assert found["models"]["m2"]["variant"] == list(auto) and found["variant"] is None


def test_the_device_check_on_a_gpu_shares_batches_compares_flags_and_survives_failures(
        tmp_path, monkeypatch):
    """With its child processes stood in for as a one-GPU host: each model's first
    variant finds the batch that fits and the others start there; the first
    model's default variant runs again under each GPU flag set; a variant whose
    process fails, crashes or hangs is a row saying so, and the check goes on,
    with the document on disk rewritten after each row."""
    output = tmp_path / "accelerator.json"
    calls = []

    def fake_child(command, env, timeout_s):
        if command[1] == "-c":
            return 0, json.dumps({"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3",
                                  "devices": 1, "jax": "0.11.2",
                                  "memory_limit_bytes": 80 * 2**30}), ""
        sets = dict(command[i + 1].split("=", 1) for i, a in enumerate(command) if a == "--set")
        model, batch = command[command.index("--config") + 1], int(
            command[command.index("--batch-size") + 1])
        flags = env.get("XLA_FLAGS", "").split()[-1]
        call = (model, sets["model.attention"], sets["model.lean_backward"],
                sets["model.layer_loop"], sets["model.remat"], batch,
                flags if flags.startswith("--xla_gpu") else "")
        calls.append(call)
        assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
        if len(calls) > 2:  # what was measured so far is on disk
            assert json.loads(output.read_text())["rows"]
        if batch > 128:
            return 1, "", "Traceback ...\nclip_jax.benchmarks.train.DoesNotFit: needs 90 GiB\n"
        if call[1:3] == ("cudnn", "on"):
            return 1, "", "jax.errors.JaxRuntimeError: INTERNAL: cuDNN failed\n"
        if call[6] == "--xla_gpu_enable_command_buffer=":
            return None, "", "step 1\n"
        if call[:3] == ("m2", "xla", "on"):
            return 0, "a library's notice\n", ""
        return 0, json.dumps({"step_time_s": 1.0, "samples_per_sec_per_device": float(batch),
                              "mfu": 0.5, "peak_memory_bytes": 2**30,
                              "roofline": {"step_seconds_at_least": 0.625,
                                           "mfu_at_most": 0.8}}), ""

    monkeypatch.setattr(accelerator_bench, "run_child", fake_child)
    monkeypatch.setitem(accelerator_bench.TINY, "batches", {"m1": (256, 128), "m2": (128,)})
    benchmark.main(["accelerator", "--tiny", "--output", str(output)])
    triton_off = "--xla_gpu_enable_triton_gemm=false"
    # Every model's defaults (unrolled) and the same with lean backward, then the
    # first model's defaults under each flag set, then every model's other
    # variants: what a budget running out stops is the least needed.
    others = [("xla", "off", "unrolled", "none"), ("xla", "on", "unrolled", "none"),
              ("cudnn", "off", "scan", "none"), ("cudnn", "on", "unrolled", "dots_saveable"),
              ("cudnn", "on", "scan", "dots_saveable")]
    assert calls == [
        ("m1", "cudnn", "off", "unrolled", "none", 256, ""),
        ("m1", "cudnn", "off", "unrolled", "none", 128, ""),
        ("m1", "cudnn", "on", "unrolled", "none", 128, ""),
        ("m2", "cudnn", "off", "unrolled", "none", 128, ""),
        ("m2", "cudnn", "on", "unrolled", "none", 128, ""),
        ("m1", "cudnn", "off", "unrolled", "none", 128, triton_off),
        ("m1", "cudnn", "off", "unrolled", "none", 128, "--xla_gpu_enable_command_buffer="),
        *[("m1", *variant, 128, "") for variant in others],
        *[("m2", *variant, 128, "") for variant in others]]
    document = json.loads(output.read_text())
    assert document["platform"] == "gpu" and document["devices"] == 1
    rows = document["rows"]
    assert rows[0]["batches_not_fitting"] == [256] and rows[0]["batch_per_device"] == 128
    assert rows[1]["error"] == "jax.errors.JaxRuntimeError: INTERNAL: cuDNN failed"
    assert rows[1]["layer_loop"] == "unrolled" and rows[8]["layer_loop"] == "scan"
    assert (rows[4]["flag_set"], rows[4]["flags"]) == ("cuBLAS GEMMs", f"XLA_FLAGS={triton_off}")
    assert rows[5]["error"] == "no result within 600 s"
    assert rows[-4]["error"] == "no JSON result; its output ends \"a library's notice\""
    table = accelerator_bench.table(rows)
    assert ("| m1 | cudnn | on | unrolled | none | default | jax.errors.JaxRuntimeError: "
            "INTERNAL: cuDNN failed |") in table
    assert ("| m1 | cudnn | off | unrolled | none | cuBLAS GEMMs | 128 | 1.000 | >= 0.625 | 128.0 | "
            "50.0% |" in table)


def test_the_device_check_table_puts_a_tpus_own_estimate_beside_its_step():
    """On a TPU the bound column holds the compiler's estimate of the same step
    (approximate, not a bound); without either it stays empty."""
    measured = {**_row("m1", ("xla", "off", "unrolled", "none"), 100.0), "step_time_s": 0.8,
                "mfu": 0.25, "peak_memory_bytes": 2**30}
    table = accelerator_bench.table([
        {**measured, "tpu_estimate": {"step_seconds": 0.5, "cycles": 7.5e8}},
        {**measured, "model": "m2"}])
    assert "| m1 | xla | off | unrolled | none | default | 128 | 0.800 | ~0.500 | 100.0 |" in table
    assert "| m2 | xla | off | unrolled | none | default | 128 | 0.800 |  | 100.0 |" in table
