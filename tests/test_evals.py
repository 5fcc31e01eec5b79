"""Evaluation suite: ranking metrics against NumPy brute force, and the evaluators on
a small labelled, multi-caption TFDS dataset written here, sharded and unsharded."""

import io

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from clip_jax import image_ops, tokenizer
from clip_jax.data import eval_input
from clip_jax.evals import linear_probe, ranking, retrieval, specs, zeroshot
from clip_jax.evals.suite import EvalSuite
from clip_jax.models import CLIP, l2_normalize
from clip_jax.train_step import setup_training
from tests.conftest import small_config

# ---------------------------------------------------------------- brute force


def brute_force_ranks(scores, is_positive, valid_items):
    """Rank of each query's first positive item, ordering all valid items by score
    (descending) and index (ascending): the definition the streamed top-k must match."""
    ranks = []
    for query, row in enumerate(scores):
        order = [i for i in np.argsort(-row, kind="stable") if valid_items[i]]
        hits = [position for position, item in enumerate(order) if is_positive(query, item)]
        ranks.append(hits[0] if hits else len(order))
    return np.array(ranks)


def tied_embeddings(rng, rows, width=4):
    """Small integer vectors: many exactly equal scores, so tie-breaking matters."""
    return rng.integers(-2, 3, size=(rows, width)).astype(np.float32)


# ---------------------------------------------------------------- ranking


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 4096])
def test_streamed_top_k_equals_a_stable_sort_with_ties_and_invalid_items(chunk_size):
    rng = np.random.default_rng(0)
    queries, gallery = tied_embeddings(rng, 16), tied_embeddings(rng, 50)
    valid = rng.random(50) > 0.2
    scores, indices = ranking.streamed_top_k(queries, gallery, valid, 10, chunk_size)
    full = np.where(valid, queries @ gallery.T, -np.inf)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, np.take_along_axis(full, expected, axis=1))


def test_fewer_valid_items_than_k_leave_no_false_hits():
    queries, gallery = np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32)
    _, indices = ranking.streamed_top_k(queries, gallery, np.array([1, 0, 0, 0], bool), 3, 2)
    ranks = ranking.first_hit_ranks(np.asarray(indices),
                                    lambda top: top == np.arange(4)[:, None])
    np.testing.assert_array_equal(ranks, [0, 3, 3, 3])


def _mesh(devices):
    config = small_config()
    return setup_training(config, devices=devices).mesh


@pytest.fixture(scope="module")
def meshes():
    return {"8 devices": _mesh(jax.devices()), "1 device": _mesh(jax.devices()[:1])}


@pytest.mark.parametrize("mesh_name", ["8 devices", "1 device"])
def test_retrieval_recall_matches_brute_force_with_several_captions_per_image(meshes,
                                                                               mesh_name):
    rng = np.random.default_rng(1)
    images, captions_per_image = 24, 3
    image_embeddings = tied_embeddings(rng, images)
    text_embeddings = tied_embeddings(rng, images * captions_per_image).reshape(
        images, captions_per_image, -1)
    image_valid = rng.random(images) > 0.15
    caption_mask = rng.random((images, captions_per_image)) > 0.3
    image_ranks, text_ranks, _, text_valid = retrieval.retrieval_ranks(
        meshes[mesh_name], image_embeddings, text_embeddings, image_valid, caption_mask,
        chunk_size=5)
    flat_texts = text_embeddings.reshape(-1, text_embeddings.shape[-1])
    owner = np.arange(len(flat_texts)) // captions_per_image
    expected_text_valid = (caption_mask & image_valid[:, None]).reshape(-1)
    np.testing.assert_array_equal(text_valid, expected_text_valid)
    expected_image_ranks = brute_force_ranks(image_embeddings @ flat_texts.T,
                                             lambda i, t: owner[t] == i, expected_text_valid)
    expected_text_ranks = brute_force_ranks(flat_texts @ image_embeddings.T,
                                            lambda t, i: owner[t] == i, image_valid)
    k = max(retrieval.RECALL_AT)
    np.testing.assert_array_equal(image_ranks, np.minimum(expected_image_ranks, k))
    np.testing.assert_array_equal(text_ranks, np.minimum(expected_text_ranks, k))
    metrics = retrieval.recall_metrics("r", image_ranks, text_ranks, image_valid, text_valid)
    for at in retrieval.RECALL_AT:
        assert metrics[f"r/image_to_text_r{at}"] == pytest.approx(
            np.mean(expected_image_ranks[image_valid] < at))
        assert metrics[f"r/text_to_image_r{at}"] == pytest.approx(
            np.mean(expected_text_ranks[expected_text_valid] < at))
    assert 0 < metrics["r/image_to_text_r1"] < metrics["r/image_to_text_r10"] < 1


def test_sharded_retrieval_on_8_devices_equals_one_device_on_real_valued_embeddings(meshes):
    rng = np.random.default_rng(2)
    images = np.asarray(l2_normalize(rng.normal(size=(64, 16)).astype(np.float32)))
    texts = np.asarray(l2_normalize(rng.normal(size=(64, 5, 16)).astype(np.float32)))
    valid, caption_mask = np.ones(64, bool), rng.random((64, 5)) > 0.1
    sharded = retrieval.retrieval_ranks(meshes["8 devices"], images, texts, valid, caption_mask,
                                        chunk_size=32)
    single = retrieval.retrieval_ranks(meshes["1 device"], images, texts, valid, caption_mask,
                                       chunk_size=320)
    for got, expected in zip(sharded, single):
        np.testing.assert_array_equal(got, expected)


def test_zero_shot_top_k_matches_brute_force_and_ties_go_to_the_lower_class(meshes):
    rng = np.random.default_rng(3)
    classes = tied_embeddings(rng, 7)
    classes[5] = classes[2]  # an exact tie: class 2 must win it
    images = tied_embeddings(rng, 40)
    labels = rng.integers(0, 7, 40).astype(np.int32)
    ranks, top = zeroshot.classification_ranks(meshes["8 devices"], images, classes, labels)
    expected = brute_force_ranks(images @ classes.T, lambda q, c: labels[q] == c,
                                 np.ones(7, bool))
    np.testing.assert_array_equal(ranks, np.minimum(expected, 5))
    assert 5 not in top[:, 0]  # whenever 5 would be first, 2 ties it and comes first
    rates = ranking.hit_rates(ranks, np.ones(40, bool), (1, 5))
    assert rates[1] == pytest.approx(np.mean(expected == 0))
    assert rates[5] == pytest.approx(np.mean(expected < 5))


# ---------------------------------------------------------------- linear probe


def test_logistic_regression_reaches_the_regularised_optimum():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(300, 6)).astype(np.float32)
    labels = (features[:, :3] @ rng.normal(size=(3, 4)) + rng.normal(size=(300, 4))).argmax(1)
    weights = (rng.random(300) > 0.1).astype(np.float32)
    l2 = 1e-2
    params = jax.device_get(linear_probe.fit(features, labels, weights, l2, num_classes=4))
    # NumPy gradient of the weighted mean cross-entropy + l2/2 |W|^2 at the solution.
    logits = features @ params["w"] + params["b"]
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    error = (probabilities - np.eye(4)[labels]) * weights[:, None] / weights.sum()
    grad_w, grad_b = features.T @ error + l2 * params["w"], error.sum(0)
    assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4
    assert float(linear_probe.accuracy(params, features, labels, weights)) > 0.5


def test_the_l2_search_covers_the_grid_then_refines_around_its_best():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(200, 20)).astype(np.float32)
    labels = (features[:, 0] + rng.normal(size=200) > 0).astype(np.int32)
    validation = linear_probe.held_out_rows(200)
    best, best_score, scores = linear_probe.choose_l2(
        features, labels, (~validation).astype(np.float32), validation.astype(np.float32), 2)
    coarse = max(linear_probe.L2_GRID, key=lambda l2: (scores[l2], l2))
    assert set(scores) == {*linear_probe.L2_GRID, coarse / 10 ** 0.5, coarse * 10 ** 0.5}
    assert best_score == scores[best] == max(scores.values())
    assert 0.5 < best_score <= 1.0


# ---------------------------------------------------------------- evaluators on TFDS data

CLASSES = ["red_thing", "green_thing", "blue_thing"]
RGB = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]


def _png(colour, rng):
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (24, 24, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _examples(seed, count):
    """Coloured squares with a class label and 1-3 captions each; record 5 of the
    test split has an undecodable image (stored as raw bytes so it can be)."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        label = index % 3
        # Distinct within the 8-token context of the test model: equal token rows would
        # tie exactly, and tie order is tested above on constructed embeddings.
        captions = [f"{index} {j} {CLASSES[label].split('_')[0]} square"
                    for j in range(1 + index % 3)]
        image = b"not an image" if (seed, index) == (1, 5) else _png(RGB[label], rng)
        yield index, {"image": image, "label": label, "captions": {"text": captions}}


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny_tfds"))
    tfds.dataset_builders.store_as_tfds_dataset(
        name="tiny_labelled_captions", version="1.0.0", data_dir=directory,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=tf.string),
            "label": tfds.features.ClassLabel(names=CLASSES),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }),
        split_datasets={"train": list(_examples(0, 60)), "test": list(_examples(1, 21))},
        file_format="array_record", disable_shuffling=True)
    return directory


def _entries(data_dir):
    return ml_collections.ConfigDict({
        "zeroshot": specs.evaluator_config("zeroshot", "tiny_labelled_captions",
                                           data_dir=data_dir, batch_size=16),
        "retrieval": specs.evaluator_config("retrieval", "tiny_labelled_captions",
                                            data_dir=data_dir, caption_key="captions/text",
                                            captions_per_image=3, batch_size=16),
        "linear_probe": specs.evaluator_config("linear_probe", "tiny_labelled_captions",
                                               data_dir=data_dir, batch_size=16),
    })


@pytest.fixture(scope="module")
def model_and_variables():
    config = small_config()
    model = CLIP(config.model)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *_dummy(config)))
    return config, model, variables


def _dummy(config):
    size = config.model.image.image_size
    return (np.zeros((1, size, size, 3), np.float32),
            np.zeros((1, config.model.text.context_length), np.int32))


def _suite_metrics(config, model, variables, data_dir, devices):
    training = setup_training(config, devices=devices)
    shardings = training.shardings.variables()
    suite = EvalSuite(_entries(data_dir), model, training.mesh, shardings)
    metrics, results = suite(jax.device_put(variables, shardings))
    return metrics, results


@pytest.fixture(scope="module")
def suite_results(model_and_variables, tiny_data_dir):
    config, model, variables = model_and_variables
    return {name: _suite_metrics(config, model, variables, tiny_data_dir, devices)
            for name, devices in (("8 devices", jax.devices()), ("1 device", jax.devices()[:1]))}


def _reference_embeddings(config, model, variables, source):
    """Rows of the split exactly as eval_input yields them, embedded on one device."""
    batches = list(eval_input.eval_batches(source, config.model.image.image_size, 16,
                                           context_length=config.model.text.context_length))
    data = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
    encode = lambda method, x: np.asarray(l2_normalize(model.apply(  # noqa: E731
        variables, x, method=method)))
    data["image_embeddings"] = encode(model.encode_image, image_ops.normalize(data["images"]))
    if "tokens" in data:
        rows, captions, length = data["tokens"].shape
        data["text_embeddings"] = encode(model.encode_text, data["tokens"].reshape(-1, length))
    return data


def test_zero_shot_on_tfds_data_matches_brute_force_and_counts_the_bad_image(
        model_and_variables, tiny_data_dir, suite_results):
    config, model, variables = model_and_variables
    metrics, results = suite_results["8 devices"]
    source = eval_input.EvalSource("tiny_labelled_captions", "test", tiny_data_dir,
                                   label_key="label")
    data = _reference_embeddings(config, model, variables, source)
    # No shipped prompts: the TFDS label names, made readable, with CLIP's default prompt.
    assert results["zeroshot/tiny_labelled_captions"].details["class_names"] == [
        "red thing", "green thing", "blue thing"]
    prompts = [f"a photo of a {name.replace('_', ' ')}." for name in CLASSES]
    classes = np.asarray(l2_normalize(model.apply(
        variables, tokenizer.tokenize(prompts, config.model.text.context_length),
        method=model.encode_text)))
    valid = data["mask"]
    ranks = brute_force_ranks(data["image_embeddings"] @ classes.T,
                              lambda q, c: data["labels"][q] == c, np.ones(3, bool))
    prefix = "zeroshot/tiny_labelled_captions"
    assert metrics[f"{prefix}/top1"] == pytest.approx(np.mean(ranks[valid] == 0), abs=1e-9)
    assert metrics[f"{prefix}/top5"] == 1.0  # 3 classes
    assert metrics[f"{prefix}/examples"] == 20 and metrics[f"{prefix}/skipped"] == 1


def test_retrieval_on_tfds_data_matches_brute_force_with_variable_caption_counts(
        model_and_variables, tiny_data_dir, suite_results):
    config, model, variables = model_and_variables
    metrics, _ = suite_results["8 devices"]
    source = eval_input.EvalSource("tiny_labelled_captions", "test", tiny_data_dir,
                                   caption_key="captions/text", captions_per_image=3)
    data = _reference_embeddings(config, model, variables, source)
    text_valid = (data["caption_mask"] & data["mask"][:, None]).reshape(-1)
    owner = np.arange(len(text_valid)) // 3
    image_ranks = brute_force_ranks(data["image_embeddings"] @ data["text_embeddings"].T,
                                    lambda i, t: owner[t] == i, text_valid)
    text_ranks = brute_force_ranks(data["text_embeddings"] @ data["image_embeddings"].T,
                                   lambda t, i: owner[t] == i, data["mask"])
    prefix = "retrieval/tiny_labelled_captions"
    for at in retrieval.RECALL_AT:
        assert metrics[f"{prefix}/image_to_text_r{at}"] == pytest.approx(
            np.mean(image_ranks[data["mask"]] < at))
        assert metrics[f"{prefix}/text_to_image_r{at}"] == pytest.approx(
            np.mean(text_ranks[text_valid] < at))
    # 21 records, one unreadable: 20 images with 1, 2, 3, 1, 2, 3, ... captions.
    assert metrics[f"{prefix}/examples"] == 20 and metrics[f"{prefix}/skipped"] == 1
    assert metrics[f"{prefix}/captions"] == sum(1 + i % 3 for i in range(21) if i != 5)


def test_linear_probe_on_tfds_data_learns_the_colours(suite_results):
    metrics, _ = suite_results["8 devices"]
    prefix = "linear_probe/tiny_labelled_captions"
    # Solid colours are linearly separable even in a random network's features.
    assert metrics[f"{prefix}/top1"] == 1.0
    assert metrics[f"{prefix}/train_examples"] == 60 and metrics[f"{prefix}/examples"] == 20
    assert min(linear_probe.L2_GRID) / 4 < metrics[f"{prefix}/l2"] < max(linear_probe.L2_GRID) * 4


def test_every_evaluator_gives_the_same_numbers_on_8_devices_and_on_1(suite_results):
    sharded, _ = suite_results["8 devices"]
    single, _ = suite_results["1 device"]
    assert sharded.keys() == single.keys()
    for name in sharded:
        assert sharded[name] == pytest.approx(single[name], abs=1e-6), name


# ---------------------------------------------------------------- specs and errors


def test_specs_take_dataset_defaults_and_bad_ones_are_one_line_errors(tiny_data_dir):
    coco = specs.resolved(specs.parse_spec("retrieval:coco_captions"))
    assert (coco["split"], coco["caption_key"], coco["captions_per_image"]) == (
        "test", "captions/text", 5)
    assert specs.resolved(specs.parse_spec("zeroshot:imagenet2012"))["split"] == "validation"
    assert specs.resolved(specs.parse_spec("zeroshot:cifar10:train"))["split"] == "train"
    for bad, message in (("zeroshot", "is not 'kind:dataset"), ("bogus:cifar10", "unknown kind"),
                         ("zeroshot::test", "is not 'kind:dataset")):
        with pytest.raises(ValueError, match=message):
            specs.parse_spec(bad)
    with pytest.raises(ValueError, match="linear_probe needs a label_key"):
        specs.check_entry("probe", specs.parse_spec("linear_probe:coco_captions"), 8)
    with pytest.raises(ValueError, match="linear_probe needs a train_split"):
        specs.check_entry("probe", specs.parse_spec("linear_probe:imagenet_v2"), 8)
    with pytest.raises(ValueError, match="multiple of the data-parallel size 8"):
        specs.check_entry("zs", specs.evaluator_config("zeroshot", "cifar10", batch_size=12), 8)


def test_an_unprepared_catalogue_dataset_is_a_one_line_error_not_a_download(tmp_path):
    source = eval_input.EvalSource("cifar10", "test", str(tmp_path), label_key="label")
    with pytest.raises(ValueError, match=r"'cifar10' is not prepared in .*tfds build cifar10 "
                                         r"--file_format=array_record"):
        next(eval_input.eval_batches(source, 16, 8))


def test_evaluate_reads_pytorch_style_weights_and_gives_the_suite_numbers(
        model_and_variables, tiny_data_dir, suite_results, tmp_path):
    """--weights FILE: a safetensors state dict with OpenCLIP's names, as released."""
    from safetensors.numpy import save_file
    from clip_jax import convert, evaluate
    config, _, variables = model_and_variables
    path = str(tmp_path / "weights.safetensors")
    save_file(convert.to_torch(jax.device_get(variables), config.model), path)
    metrics, _ = evaluate.evaluate(config, path, _entries(tiny_data_dir), progress=False)
    expected, _ = suite_results["8 devices"]
    assert metrics.keys() == expected.keys()
    for name in metrics:
        assert metrics[name] == pytest.approx(expected[name], abs=1e-6), name
