"""Linear probe: L2-regularised multinomial logistic regression on frozen image embeddings.

The CLIP paper's protocol (Appendix A.3) with our own solver: features of the
train split, regularisation strength chosen on a held-out part of it, then a
fit on the whole train split and top-1 on the test split. The solver is
L-BFGS in JAX on the sharded features, so it runs on all devices and hosts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clip_jax.evals.base import EvalResult, row_counts
from clip_jax.evals.embed import embed_split
from clip_jax.evals.encoders import to_host

# Coarse search over decades, then the half-decades either side of the best:
# the CLIP paper swept 1e-6..1e6 (96 steps) for sklearn's C; with a mean loss,
# strengths above ~1e2 shrink every weight to nothing.
L2_GRID = tuple(float(10.0 ** power) for power in range(-6, 3))
VALIDATION_FRACTION = 0.2
MAX_ITERATIONS = 1000


def _loss(params, features, labels, weights, l2):
    """Weighted mean cross-entropy + l2/2 |W|^2 (the bias is not regularised)."""
    logits = features @ params["w"] + params["b"]
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (jnp.sum(weights * per_row) / jnp.maximum(jnp.sum(weights), 1.0)
            + 0.5 * l2 * jnp.sum(params["w"] ** 2))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iterations"))
def fit(features, labels, weights, l2, num_classes, max_iterations=MAX_ITERATIONS,
        tolerance=1e-6):
    """{"w": [D, C], "b": [C]} minimising `_loss` over the rows with weight 1."""
    objective = functools.partial(_loss, features=features, labels=labels, weights=weights,
                                  l2=l2)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)
    params = {"w": jnp.zeros((features.shape[1], num_classes)), "b": jnp.zeros(num_classes)}

    def improve(carry):
        params, state, iteration = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=objective)
        return optax.apply_updates(params, updates), state, iteration + 1

    def unconverged(carry):
        _, state, iteration = carry
        grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        return (iteration == 0) | ((iteration < max_iterations) & (grad_norm >= tolerance))

    params, _, _ = jax.lax.while_loop(unconverged, improve, (params, solver.init(params), 0))
    return params


@jax.jit
def accuracy(params, features, labels, weights):
    """Weighted top-1 (ties go to the lower class index, as argmax does)."""
    predictions = jnp.argmax(features @ params["w"] + params["b"], axis=-1)
    return jnp.sum(weights * (predictions == labels)) / jnp.maximum(jnp.sum(weights), 1.0)


@jax.jit
def standardize(train_features, train_weights, *others):
    """Features scaled to zero mean, unit variance over the train rows: L-BFGS then
    converges in far fewer steps, whatever the embedding's scale."""
    total = jnp.maximum(jnp.sum(train_weights), 1.0)
    mean = jnp.sum(train_weights[:, None] * train_features, axis=0) / total
    variance = jnp.sum(train_weights[:, None] * (train_features - mean) ** 2, axis=0) / total
    scale = jax.lax.rsqrt(variance + 1e-8)
    return tuple((features - mean) * scale for features in (train_features, *others))


def held_out_rows(num_rows, fraction=VALIDATION_FRACTION, seed=0):
    """bool [num_rows]: a fixed pseudo-random validation subset (row order may be
    sorted by class, so not a contiguous block)."""
    return np.random.default_rng(seed).random(num_rows) < fraction


def choose_l2(features, labels, fit_weights, validation_weights, num_classes):
    """(best strength, its validation top-1, {strength: top-1}) from the decade
    grid refined by half-decades around its best."""
    scores = {}

    def score(l2):
        if l2 not in scores:
            params = fit(features, labels, fit_weights, l2, num_classes)
            scores[l2] = float(accuracy(params, features, labels, validation_weights))
        return scores[l2]

    for l2 in L2_GRID:
        score(l2)
    coarse = max(L2_GRID, key=lambda l2: (scores[l2], l2))  # ties: the stronger prior
    for l2 in (coarse / 10 ** 0.5, coarse * 10 ** 0.5):
        score(float(l2))
    best = max(scores, key=lambda l2: (scores[l2], l2))
    return best, scores[best], scores


class LinearProbe:
    """evaluator(variables) -> EvalResult with {prefix}/top1 (test split),
    /validation_top1, /l2 (chosen strength), /train_examples, /examples, /skipped."""

    def __init__(self, encoders, train_source, test_source, batch_size, prefix, workers=0):
        self.encoders, self.train_source, self.test_source = encoders, train_source, test_source
        self.batch_size, self.prefix, self.workers = batch_size, prefix, workers

    def __call__(self, variables, progress=False):
        train, test = (embed_split(self.encoders, variables, source, self.batch_size,
                                   workers=self.workers, progress=progress)
                       for source in (self.train_source, self.test_source))
        train_mask, test_mask = to_host(train["mask"]), to_host(test["mask"])
        train_labels, test_labels = to_host(train["labels"]), to_host(test["labels"])
        num_classes = int(max(train_labels[train_mask].max(initial=0),
                              test_labels[test_mask].max(initial=0))) + 1
        train_weights = train_mask.astype(np.float32)
        train_features, test_features = standardize(train["images"], train_weights,
                                                    test["images"])
        validation = held_out_rows(len(train_mask))
        l2, validation_top1, _ = choose_l2(
            train_features, train["labels"], train_weights * ~validation,
            train_weights * validation, num_classes)
        params = fit(train_features, train["labels"], train_weights, l2, num_classes)
        top1 = float(accuracy(params, test_features, test["labels"],
                              test_mask.astype(np.float32)))
        metrics = {f"{self.prefix}/top1": top1,
                   f"{self.prefix}/validation_top1": validation_top1,
                   f"{self.prefix}/l2": l2,
                   f"{self.prefix}/train_examples": int(train_mask.sum()),
                   **row_counts(self.prefix, test_mask, to_host(test["is_record"]))}
        return EvalResult(metrics)
