"""Training objectives, chosen by config.objective: what the image tower learns
from the captions. The CLIP paper (§2.3, Figure 2) chose contrastive learning
over predicting the caption by measured efficiency; these are the three it
compared, on the same image towers, data and optimiser:

- `contrastive` (contrastive.py): CLIP; text tower config.model.text_encoder.
- `bow_predict` (bow_predict.py): the image predicts the caption's bag of words.
- `caption_lm` (caption_lm.py): a decoder on the image predicts the caption.

and `coca` (coca.py): CoCa, the contrastive loss plus a captioning decoder.

Each module gives an `Objective` (base.py): its model, its loss over the
global batch, and how it scores zero-shot prompts.
"""

from clip_jax.objectives import bow_predict, caption_lm, coca, contrastive
from clip_jax.objectives.base import Objective  # noqa: F401 (the public type)

# config.objective -> Objective.
OBJECTIVES = {objective.name: objective for objective in
              (contrastive.OBJECTIVE, bow_predict.OBJECTIVE, caption_lm.OBJECTIVE,
               coca.OBJECTIVE)}


def get(name):
    """The Objective of config.objective `name`."""
    if name not in OBJECTIVES:
        raise ValueError(f"config.objective={name!r} is unknown; "
                         f"choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def of_model(model):
    """The Objective whose model `model` (a flax Module instance) is."""
    for objective in OBJECTIVES.values():
        if type(model) is objective.model:  # noqa: E721 (a CoCa is also a CLIP)
            return objective
    raise ValueError(f"{type(model).__name__} is no objective's model")
