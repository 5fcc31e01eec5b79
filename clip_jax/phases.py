r"""Training phases: a run that changes, at given steps, the image size it trains
at, its patch dropout and its caption length. FLIP's unmasked tuning (Li et al.
2023) and CLIPA's low-resolution pre-training with a full-resolution fine-tune
(Li, Wang, Xie 2023) are both this:

  config.phases = "90%: image_size=112, patch_dropout=0.5, context_length=32; 10%"

Phases run in the order given, each for a share of config.total_steps (`N%`)
or a number of steps (`N`); together they must cover the run. A key a phase
does not set takes the model config's value (model.image.image_size,
model.image.patch_dropout, model.text.context_length), so the bare `10%` above
is the full-size, unmasked end of the run. The parameters never change shape:
the ViT resamples its positional embeddings to the phase's patch grid and the
text tower reads the first context_length positions (models/vit.py, text.py).
Evaluation always runs at the model config's full settings, undropped.

An empty string is one phase at the model config's settings.
"""

import dataclasses
import re

# Phase keys -> (their place in config.model, type).
_KEYS = {"image_size": (("image", "image_size"), int),
         "patch_dropout": (("image", "patch_dropout"), float),
         "context_length": (("text", "context_length"), int)}
_LENGTH = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(%?)\s*$")


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps first_step + 1 .. last_step (1-based, as the progress counts them)
    train at these settings."""
    first_step: int
    last_step: int
    image_size: int
    patch_dropout: float
    context_length: int

    def describe(self):
        return (f"steps {self.first_step + 1}-{self.last_step}: {self.image_size} px, "
                f"patch dropout {self.patch_dropout:g}, {self.context_length} caption tokens")


def _base_settings(model_config):
    """The phase keys' values in config.model (a ResNet has no patch dropout)."""
    return {"image_size": int(model_config.image.image_size),
            "patch_dropout": float(model_config.image.get("patch_dropout", 0.0)),
            "context_length": int(model_config.text.context_length)}


def parse(spec, total_steps, model_config):
    """config.phases -> tuple of Phase covering steps 1..total_steps; a ValueError
    naming the part that is wrong."""
    base = _base_settings(model_config)
    if not spec.strip():
        return (Phase(0, total_steps, **base),)
    phases, first, share = [], 0, 0.0
    for part in spec.split(";"):
        length, _, settings = part.partition(":")
        match = _LENGTH.match(length)
        if not match:
            raise ValueError(f"phase {part.strip()!r}: start with its length, 'N%' of "
                             f"total_steps or N steps, e.g. '90%: image_size=112'")
        values = dict(base)
        for item in filter(str.strip, settings.split(",")):
            key, equals, value = item.partition("=")
            key = key.strip()
            if key not in _KEYS or not equals:
                raise ValueError(f"phase {part.strip()!r}: {item.strip()!r} is not KEY=VALUE "
                                 f"with KEY one of {', '.join(_KEYS)}")
            try:
                values[key] = _KEYS[key][1](value.strip())
            except ValueError:
                raise ValueError(f"phase {part.strip()!r}: {key}={value.strip()!r} is not "
                                 f"a{'n integer' if _KEYS[key][1] is int else ' number'}") from None
        number, percent = float(match.group(1)), match.group(2)
        if percent:
            share += number / 100
            last = round(share * total_steps)
        else:
            if number != int(number):
                raise ValueError(f"phase {part.strip()!r}: a length in steps is a whole number")
            last = first + int(number)
            share = last / total_steps
        if last <= first:
            raise ValueError(f"phase {part.strip()!r} has no steps (of total_steps={total_steps})")
        phases.append(Phase(first, last, **values))
        first = last
    if first != total_steps:
        raise ValueError(f"the phases cover {first} of total_steps={total_steps} steps; "
                         "their lengths must add up to the run")
    return tuple(phases)


def phase_at(phases, step):
    """The Phase that train step `step` (1-based) belongs to."""
    for phase in phases:
        if step <= phase.last_step:
            return phase
    raise ValueError(f"step {step} is past the last phase (step {phases[-1].last_step})")


def first_phase_model(config):
    """config.model as the run's first step sees its inputs (with_phase of the first
    phase): what benchmarks and the capacity planner measure."""
    return with_phase(config.model, parse(config.phases, config.total_steps, config.model)[0])


def with_phase(model_config, phase):
    """A copy of config.model with the phase's image size, patch dropout and
    caption length: the inputs a phase's step sees, for FLOP counts and input
    shapes (never for building the model, whose parameters keep the base shapes)."""
    model_config = model_config.copy_and_resolve_references()
    with model_config.unlocked():
        for key, (path, _) in _KEYS.items():
            model_config[path[0]][path[1]] = getattr(phase, key)
    return model_config
