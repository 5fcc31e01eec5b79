"""The objectives of the CLIP paper's study (§2.3, Figure 2): each loss against a
NumPy reference, each zero-shot scorer on a case it can learn, 8 devices equal to
one, bad configs as one-line errors, the alt-text data, and the efficiency table."""

import functools
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from clip_jax import image_ops, objectives, output_vocab, tokenizer
from clip_jax.models import output_classes
from clip_jax.config_checks import ConfigError, check_config
from clip_jax.data import synthetic_shapes as ss
from clip_jax.evals import zeroshot
from clip_jax.evals.encoders import Encoders
from clip_jax.evals.prompts import ZeroShotTask
from clip_jax.evals.suite import EvalSuite
from clip_jax.train_step import setup_training
from launch import sweep
from tests.conftest import small_config
from tests.test_coca import small_coca_config
from tests.test_losses import numpy_clip_loss

# The three new configurations; contrastive with the Transformer is test_train_step's.
OBJECTIVES = {
    "bow_predict": {"objective": "bow_predict"},
    # The compact vocabulary: these captions' out-of-vocabulary words map to "other".
    "caption_lm": {"objective": "caption_lm",
                   "model.output_vocab": output_vocab.synthetic_shapes()},
    "contrastive_bow": {"model.text_encoder": "bag_of_words"},
    # CoCa (tests/test_coca.py's small config), its decoder over the compact vocabulary.
    "coca": {"model.output_vocab": output_vocab.synthetic_shapes()},
}
# A different 8-device mesh for each: data, 3-D (tensor shards the heads' vocab), FSDP.
MESHES = {"bow_predict": dict(data=8, fsdp=1, tensor=1),
          "caption_lm": dict(data=2, fsdp=2, tensor=2),
          "contrastive_bow": dict(data=1, fsdp=8, tensor=1),
          "coca": dict(data=2, fsdp=2, tensor=2)}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230),
           "white": (240, 240, 240)}
TASK = ZeroShotTask(class_names=tuple(COLOURS), templates=("a {} square.",))
TOP1 = "zeroshot/synthetic_shapes/top1"
STUDY_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "objectives.py")
EXTRA_STEPS = 175  # after the two compared steps, to learn the constructed case


def constructed_batch(config, varied=True, seed=0):
    """Solid colour squares with captions naming the colour, 4 per class:
    {"images", "tokens"} and labels [B]. `varied`: captions of several lengths (with
    padding) and two words outside the synthetic_shapes vocabulary ('zebra', 'quux'),
    for the losses; else every caption is its class's prompt, a case the scorers
    must rank right once learnt (a memorised odd caption could outscore the prompt)."""
    rng = np.random.default_rng(seed)
    size = config.model.image.image_size
    labels = np.arange(config.batch_size) % len(COLOURS)
    colours = np.array(list(COLOURS.values()), np.float32)[labels]
    images = np.clip(colours[:, None, None] + rng.normal(0, 15, (len(labels), size, size, 3)),
                     0, 255).astype(np.uint8)
    forms = ("a {} square.", "{} square", "a {} zebra square", "the {} quux")[:4 if varied else 1]
    captions = [forms[(i // len(COLOURS)) % len(forms)].format(list(COLOURS)[label])
                for i, label in enumerate(labels)]
    return {"images": images,
            "tokens": tokenizer.tokenize(captions, config.model.text.context_length)}, labels


def config_for(name, mesh=None):
    """The test config of an objective, one block per tower (compiles faster)."""
    mesh = mesh or dict(data=1, fsdp=1, tensor=1)
    build = small_coca_config if name == "coca" else small_config
    return build(**OBJECTIVES[name], **{f"mesh.{k}": v for k, v in mesh.items()},
                        **{"optimizer.warmup_steps": 0, "model.image.layers": 1,
                           "model.text.layers": 1})


def run_steps(training, state, batch, steps):
    """(state, [metrics per step]) after `steps` steps on `batch`."""
    history = []
    for _ in range(steps):
        state, metrics = training.step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


@functools.lru_cache(maxsize=None)
def one_device_run(name):
    """The single-device reference of an objective: (training, initial state on the
    host, params after 2 steps, metrics of the 2 steps, state after EXTRA_STEPS more)."""
    config = config_for(name)
    training = setup_training(config, jax.devices()[:1])
    state = training.init_state(jax.random.key(config.seed))
    initial = jax.device_get(state)  # the step donates `state`
    state, history = run_steps(training, state, constructed_batch(config)[0], 2)
    after_two = jax.device_get(state.params)
    state, _ = run_steps(training, state, constructed_batch(config, varied=False)[0], EXTRA_STEPS)
    return training, initial, after_two, history, state


# ---------------------------------------------------------------- NumPy references


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def words_of(row):
    """The token ids between the start and the end token of a tokenized row."""
    return list(row[1:list(row).index(tokenizer.default_tokenizer().eot_token)])


def image_embeddings(training, params, images):
    model = training.model
    return np.asarray(jax.jit(lambda p, x: model.apply(
        {"params": p}, image_ops.normalize(x), method=model.encode_image))(params, images))


def numpy_bow_loss(params, embeddings, tokens, classes):
    head = params["bow_head"]
    logits = embeddings @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    losses = []
    for row, log_probs in zip(tokens, log_softmax(logits)):
        words = words_of(row)
        target = np.zeros(log_probs.shape)
        for word in words:
            target[classes[word]] += 1 / len(words)
        losses.append(-(target * log_probs).sum())
    return np.mean(losses)


def numpy_caption_loss(logits, tokens, classes):
    """Next-token cross-entropy over the words and the end token, mean over tokens."""
    total, count = 0.0, 0
    for row, row_logits in zip(tokens, log_softmax(logits)):
        predicted = words_of(row) + [tokenizer.default_tokenizer().eot_token]
        for position, token in enumerate(predicted):
            total -= row_logits[position, classes[token]]
            count += 1
    return total / count


def numpy_bow_text(params, tokens):
    text = params["text"]
    embedding, projection = np.asarray(text["token_embedding"]), np.asarray(
        text["text_projection"])
    rows = np.stack([embedding[words_of(row)].mean(axis=0) @ projection for row in tokens])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_first_step_loss_matches_numpy(name):
    """The loss the step logs at the initial parameters, recomputed in NumPy from
    the image embeddings (and, for caption_lm, the decoder's logits)."""
    training, initial, _, history, _ = one_device_run(name)
    params, config = initial.params, training.model.config
    batch, _ = constructed_batch(config_for(name))
    images = image_embeddings(training, params, batch["images"])
    classes = output_classes.token_classes(config.output_vocab, config.text.vocab_size)
    if name == "bow_predict":
        expected = numpy_bow_loss(params, images, batch["tokens"], classes)
    elif name == "caption_lm":
        model = training.model
        logits = np.asarray(jax.jit(lambda p, e, t: model.apply(
            {"params": p}, e, t, method=model.decode))(params, images, batch["tokens"]))
        expected = numpy_caption_loss(logits, batch["tokens"], classes)
    elif name == "coca":
        model = training.model
        images, texts = (np.asarray(jax.jit(lambda p, x, m=method: model.apply(
            {"params": p}, x, method=m))(params, x)) for method, x in (
                (model.encode_image, image_ops.normalize(batch["images"])),
                (model.encode_text, batch["tokens"])))
        logits = np.asarray(jax.jit(lambda p, x, t: model.apply(
            {"params": p}, x, t, method=model.caption_logits))(
                params, image_ops.normalize(batch["images"]), batch["tokens"]))
        scale = np.exp(float(params["logit_scale"]))
        expected = (numpy_clip_loss(normalise(images), normalise(texts), scale)
                    + 2.0 * numpy_caption_loss(logits, batch["tokens"], classes))
    else:
        scale = np.exp(float(params["logit_scale"]))
        expected = numpy_clip_loss(normalise(images), numpy_bow_text(params, batch["tokens"]),
                                   scale)
    np.testing.assert_allclose(history[0]["loss"], expected, rtol=2e-5)


# ---------------------------------------------------------------- 8 devices == 1


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_two_adamw_steps_on_8_devices_equal_one_device(name):
    """Same metrics and parameters on an 8-device mesh as on one, from the same
    initial state (tolerances of test_train_step)."""
    _, initial, params_1, history_1, _ = one_device_run(name)
    config = config_for(name, MESHES[name])
    training = setup_training(config, jax.devices())
    state, history_8 = run_steps(training, jax.device_put(initial, training.shardings),
                                 constructed_batch(config)[0], 2)
    for metrics_1, metrics_8 in zip(history_1, history_8):
        assert metrics_8.keys() == metrics_1.keys()
        for key in metrics_1:
            np.testing.assert_allclose(metrics_8[key], metrics_1[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 jax.device_get(state.params), params_1)


# ---------------------------------------------------------------- zero-shot scorers


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_zero_shot_scorer_ranks_the_true_class_first_once_learnt(name):
    """After EXTRA_STEPS steps on colour squares captioned by their class prompt,
    every image's own prompt scores highest, on 8 devices; the predictive scorers
    equal their NumPy definitions."""
    training, *_, state = one_device_run(name)
    config = config_for(name, MESHES[name])
    training_8 = setup_training(config, jax.devices())
    variables = jax.device_put(state.variables(), training_8.shardings.variables())
    batch, labels = constructed_batch(config, varied=False)
    encoders = Encoders(training_8.model, training_8.mesh, training_8.shardings.variables())
    objective = objectives.of_model(training_8.model)
    if objective.text_embeddings:
        classes = encoders.classes(variables, TASK)
        scores = encoders.images(variables, batch["images"]) @ classes.T
    else:  # the evaluator's own jitted scorer, without a dataset to read
        evaluator = zeroshot.PromptScoreZeroShot(
            encoders, objective.prompt_scorer(training_8.model), None, TASK, 16, "zeroshot/x")
        scores = np.asarray(evaluator.scores(variables, batch["images"], evaluator.prompts))
        np.testing.assert_allclose(scores, numpy_prompt_scores(
            name, training, jax.device_get(variables["params"]), batch["images"],
            evaluator.prompts), rtol=1e-4, atol=1e-5)
    ranks, _ = zeroshot.ranks_of_scores(scores, labels)
    assert (ranks == 0).all(), scores


def numpy_prompt_scores(name, training, params, images, prompts):
    """bow_predict: mean log p(word | image) over a prompt's words; caption_lm: mean
    log-likelihood per predicted token (words and end token). [N, P]."""
    config = training.model.config
    classes = output_classes.token_classes(config.output_vocab, config.text.vocab_size)
    embeddings = image_embeddings(training, params, images)
    if name == "bow_predict":
        head = params["bow_head"]
        log_probs = log_softmax(embeddings @ np.asarray(head["kernel"]) + np.asarray(head["bias"]))
        return np.stack([log_probs[:, [classes[w] for w in words_of(prompt)]].mean(axis=1)
                         for prompt in prompts], axis=1)
    model = training.model
    decode = jax.jit(lambda p, e, t: model.apply({"params": p}, e, t, method=model.decode))
    scores = []
    for prompt in prompts:
        rows = np.broadcast_to(prompt, (len(images), len(prompt)))
        log_probs = log_softmax(np.asarray(decode(params, embeddings, rows)))
        predicted = [classes[t] for t in words_of(prompt)] + [
            classes[tokenizer.default_tokenizer().eot_token]]
        scores.append(np.mean([log_probs[:, j, c] for j, c in enumerate(predicted)], axis=0))
    return np.stack(scores, axis=1)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("overrides,message", [
    ({"objective": "mlm"}, "config.objective='mlm' is unknown; choose one of contrastive, "
                           "bow_predict, caption_lm"),
    ({"model.text_encoder": "cnn"}, "config.model.text_encoder='cnn' is unknown"),
    ({"model.output_vocab": (5, 5)}, "config.model.output_vocab must list distinct token ids"),
    ({"model.output_vocab": (49408,)}, "config.model.output_vocab must list distinct token ids"),
    ({"objective": "caption_lm", "microbatches": 2},
     "config.microbatches=2: GradCache splits the step around a loss over embeddings, which "
     "config.objective='caption_lm' does not have"),
    ({"objective": "bow_predict", "lock_text": True},
     "config.lock_text=True: config.objective='bow_predict' has no text tower to lock"),
])
def test_bad_objective_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_config(small_config(**overrides), num_devices=8)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_retrieval_is_skipped_with_a_reason_without_a_text_tower():
    config = small_config(objective="caption_lm")
    training = setup_training(config, jax.devices())
    suite = EvalSuite(config.evals, training.model, training.mesh,
                      training.shardings.variables())
    assert list(suite.skipped) == ["retrieval"]
    assert "has no text tower" in suite.skipped["retrieval"]
    assert [prefix for prefix, _, _ in suite.evaluators] == ["zeroshot/synthetic_shapes"]


def test_study_config_and_every_sweep_run_are_valid():
    from configs import objectives as study  # noqa: PLC0415
    for captions in study.CAPTIONS:
        for run in study.get_sweep("objectives"):
            config = study.get_config(f"captions={captions}")
            with config.unlocked():
                for key, value in run.items():
                    *parents, leaf = key.split(".")
                    node = config
                    for parent in parents:
                        node = node[parent]
                    node[leaf] = value
            check_config(config, num_devices=2)
    runs = study.get_sweep("objectives")
    for comparison in study.get_comparisons("objectives"):
        assert comparison["slower"] in runs and comparison["faster"] in runs


# ---------------------------------------------------------------- data


def test_alt_text_variant_keeps_the_images_and_its_words_have_classes(tmp_path):
    plain = tfds.builder("synthetic_shapes", data_dir=str(tmp_path))
    alt_text = tfds.builder("synthetic_shapes_alt_text", data_dir=str(tmp_path))
    pairs = list(zip(plain._generate_examples(0, 40, 0.3), alt_text._generate_examples(0, 40, 0.3)))
    changed = 0
    for (key, example), (alt_key, alt) in pairs:
        assert key == alt_key and alt["image"] == example["image"]
        assert alt["label"] == example["label"]
        changed += alt["caption"] != example["caption"]
        assert example["caption"] in alt["caption"] or len(alt["caption"].split()) <= 5
    assert changed > 20  # about 70% get a prefix, a suffix or a replacement
    vocabulary = set(output_vocab.synthetic_shapes())
    encode = tokenizer.default_tokenizer().encode
    for index in range(300):
        example = ss.draw_example(np.random.default_rng([ss.SEED, 0, index]), ss.IMAGE_SIZE, 0.3)
        caption = ss.alt_text_caption(example["caption"],
                                      np.random.default_rng([ss.SEED, 0, index, 1]))
        assert set(encode(caption)) <= vocabulary, caption
        assert len(encode(caption)) + 2 <= 24  # the study's context length
    assert output_classes.head_size(output_vocab.synthetic_shapes(), 49408) == 128
    assert output_classes.head_size((), 49408) == 49408


# ---------------------------------------------------------------- efficiency table


def _fabricated_sweep(root):
    """Four runs of configs/objectives.py's sweep with made-up top-1 every 100 steps."""
    top1 = {"caption_lm": [0.05, 0.10, 0.20, 0.30],
            "bow_predict": [0.10, 0.40, 0.45, 0.50],
            "contrastive_bag_of_words": [0.35, 0.50, 0.60, 0.70],
            "contrastive_transformer": [0.10, 0.15, 0.18, 0.20]}
    for run in sweep.load_config_module(STUDY_CONFIG).get_sweep("objectives"):
        name = "_".join(str(value) for value in run.values())
        directory = root / name
        directory.mkdir()
        (directory / "sweep.json").write_text(json.dumps(
            {"sweep": "objectives", "config": "configs/objectives.py", "overrides": run,
             "set": {}}))
        (directory / "config.json").write_text(json.dumps({"batch_size": 128}))
        rows = [{"step": 100 * (i + 1), "train/loss": 1.0, TOP1: value}
                for i, value in enumerate(top1[name])]
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_efficiency_table_interpolates_and_bounds_the_ratios(tmp_path, capsys):
    _fabricated_sweep(tmp_path)
    assert sweep.main(["collect", "--root", str(tmp_path), "--metric", TOP1,
                       "--efficiency", "--target", "0.25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines
            if line.startswith("| ")}
    # caption_lm crosses 0.25 halfway between steps 300 and 400: 350 x 128 images.
    assert rows["objective=caption_lm"][-1].rstrip(" |") == "44,800"
    # bow_predict between 0.10 (step 100) and 0.40 (step 200): step 150.
    assert rows["objective=bow_predict"][-1].rstrip(" |") == "19,200"
    # Already at 0.35 at its first evaluation: at most 12,800 images.
    assert rows["objective=contrastive, model.text_encoder=bag_of_words"][-1].rstrip(
        " |") == "<= 12,800"
    assert rows["objective=contrastive, model.text_encoder=transformer"][-1].rstrip(
        " |") == "not reached (> 51,200)"
    lm_vs_bow = rows["Transformer LM vs bag-of-words prediction"]
    assert lm_vs_bow[-2:] == ["2.33x", "3x |"]
    bow_vs_contrastive = rows["bag-of-words prediction vs bag-of-words contrastive"]
    assert bow_vs_contrastive[-2:] == [">= 1.50x", "4x |"]
    with open(tmp_path / "efficiency.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Default target: the lowest best value (0.20), which every run reaches.
    assert sweep.main(["collect", "--root", str(tmp_path), "--metric", TOP1,
                       "--efficiency"]) == 0
    assert "not reached" not in capsys.readouterr().out
