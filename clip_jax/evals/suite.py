"""The evaluators of a run: resolved config.evals entries -> evaluators -> metrics."""

import dataclasses

from absl import logging

from clip_jax import objectives, sharding
from clip_jax.data import eval_input
from clip_jax.data.eval_input import EvalSource
from clip_jax.evals import prompts
from clip_jax.evals.encoders import Encoders
from clip_jax.evals.linear_probe import LinearProbe
from clip_jax.evals.retrieval import Retrieval
from clip_jax.evals.specs import check_entry, resolved
from clip_jax.evals.zeroshot import PromptScoreZeroShot, ZeroShot


def _source(values, split):
    return EvalSource(
        dataset=values["dataset"], split=split, data_dir=values["data_dir"],
        image_key=values["image_key"],
        label_key=values["label_key"] if values["kind"] != "retrieval" else None,
        caption_key=values["caption_key"] if values["kind"] == "retrieval" else None,
        captions_per_image=values["captions_per_image"])


def _zeroshot_task(source):
    """The shipped class names and prompts of the dataset, else its own label names."""
    try:
        return prompts.zeroshot_task(source.dataset.split(":")[0])
    except ValueError as unknown:
        names = eval_input.label_names(source)
        if not names:
            raise ValueError(f"zeroshot:{source.dataset}: {unknown}, and its "
                             f"{source.label_key!r} feature has no class names") from None
        return prompts.task_from_label_names(names, f"{source.dataset} label names")


def unsupported(kind, objective):
    """Why the objective's model cannot run an evaluator of `kind`; None if it can."""
    if kind == "retrieval" and not objective.text_embeddings:
        return (f"retrieval ranks captions by their text embeddings, and "
                f"config.objective={objective.name!r} has no text tower (zeroshot and "
                "linear_probe run with every objective)")
    return None


def build_evaluator(values, encoders, workers=0):
    """A resolved entry -> its evaluator (callable: variables -> EvalResult), for the
    objective whose model the encoders run."""
    kind, prefix, batch_size = values["kind"], values["prefix"], values["batch_size"]
    objective = objectives.of_model(encoders.model)
    test = _source(values, values["split"])
    if kind == "zeroshot":
        task = _zeroshot_task(test)
        if values["templates"]:
            task = dataclasses.replace(task, templates=values["templates"])
        if objective.text_embeddings:
            return ZeroShot(encoders, test, task, batch_size, prefix, workers)
        return PromptScoreZeroShot(encoders, objective.prompt_scorer(encoders.model), test, task,
                                   batch_size, prefix, workers)
    if kind == "retrieval":
        return Retrieval(encoders, test, batch_size, prefix, workers)
    return LinearProbe(encoders, _source(values, values["train_split"]), test, batch_size,
                       prefix, workers)


class EvalSuite:
    """All evaluators of `entries` ({key: config.evals entry}) for one model on one mesh.

    suite(variables, step, final) runs those due at `step` on every process
    (all of them when `final`) -> ({metric: value}, {prefix: EvalResult}).
    Entries the model's objective cannot run (retrieval without a text tower) are
    skipped with a warning and listed in `skipped` ({key: reason}): the default
    config's retrieval entry then need not be removed to try another objective.
    """

    def __init__(self, entries, model, mesh, variable_shardings, *, eval_every=0,
                 default_data_dir=None, workers=0, image_size=None):
        self.encoders = Encoders(model, mesh, variable_shardings, image_size)
        self.evaluators = []  # (prefix, every, evaluator)
        self.skipped = {}
        objective = objectives.of_model(model)
        seen = {}
        for key, entry in entries.items():
            check_entry(key, entry, sharding.data_parallel_size(mesh))
            reason = unsupported(entry.kind, objective)
            if reason:
                self.skipped[key] = reason
                logging.warning("config.evals.%s skipped: %s", key, reason)
                continue
            values = resolved(entry, default_data_dir)
            if values["prefix"] in seen:
                raise ValueError(f"config.evals.{key} and config.evals.{seen[values['prefix']]} "
                                 f"both write {values['prefix']}/...")
            seen[values["prefix"]] = key
            every = eval_every if entry.every == 0 else entry.every
            self.evaluators.append((values["prefix"], every,
                                    build_evaluator(values, self.encoders, workers)))

    def due(self, step, final=False):
        return [prefix for prefix, every, _ in self.evaluators
                if final or (every > 0 and step % every == 0)]

    def __call__(self, variables, step=0, final=True, progress=False):
        due = self.due(step, final)
        metrics, results = {}, {}
        for prefix, _, evaluator in self.evaluators:
            if prefix in due:
                results[prefix] = evaluator(variables, progress=progress)
                metrics.update(results[prefix].metrics)
        return metrics, results
