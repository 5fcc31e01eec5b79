"""Training phases (clip_jax.phases): the spec, the steps each phase gets, and
the input each phase reads."""

import numpy as np

from clip_jax import phases
from clip_jax.data.phased_input import PhasedInput
from tests.conftest import small_config


def test_phases_split_the_run_and_unset_keys_take_the_models_values():
    model = small_config(**{"model.image.image_size": 32}).model
    flip = phases.parse("90%: image_size=16, patch_dropout=0.5, context_length=6; 10%", 1000,
                        model)
    assert flip == (phases.Phase(0, 900, 16, 0.5, 6), phases.Phase(900, 1000, 32, 0.0, 8))
    mixed = phases.parse("300: patch_dropout=0.75; 50%: image_size=16; 20%", 1000, model)
    assert [(p.first_step, p.last_step) for p in mixed] == [(0, 300), (300, 800), (800, 1000)]
    assert phases.parse("", 1000, model) == (phases.Phase(0, 1000, 32, 0.0, 8),)
    assert [phases.phase_at(flip, step).image_size for step in (1, 900, 901, 1000)] == [
        16, 16, 32, 32]
    assert phases.with_phase(model, flip[0]).image.image_size == 16
    assert model.image.image_size == 32  # with_phase copies


def _batches(config, run_phases, start_step, state, count):
    with PhasedInput(config, run_phases, state, start_step) as batches:
        return [next(batches) for _ in range(count)]


def test_each_phase_reads_its_sizes_and_a_resumed_phase_reads_the_same(shrunk_data_dir):
    """Steps 1-3 at 8 px and 6-token captions, 4-6 at the model's 16 px and 8:
    the stream goes on where it was at the switch, and a run restarted inside
    either phase (from the saved InputState) reads the same batches."""
    config = small_config(**{"data.data_dir": shrunk_data_dir, "batch_size": 8, "total_steps": 6})
    run_phases = phases.parse("3: image_size=8, context_length=6; 3", 6, config.model)
    straight = _batches(config, run_phases, 0, None, 6)
    shapes = [(batch["images"].shape[1], batch["tokens"].shape[1]) for batch, _ in straight]
    assert shapes == [(8, 6)] * 3 + [(16, 8)] * 3
    # The same records in the order one unphased stream gives them.
    unphased = _batches(config, phases.parse("", 6, config.model), 0, None, 6)
    assert [list(b["indices"]) for b, _ in straight] == [list(b["indices"]) for b, _ in unphased]
    np.testing.assert_array_equal(straight[4][0]["images"], unphased[4][0]["images"])
    # Ends kept: a 6-token caption is the first words, then the end token.
    short, full = straight[0][0]["tokens"], unphased[0][0]["tokens"]
    assert (short.max(axis=1) == 49407).all()
    for resume_after in (1, 4):  # inside the first phase, inside the second
        resumed = _batches(config, run_phases, resume_after, straight[resume_after - 1][1],
                           6 - resume_after)
        for (batch, state), (expected, expected_state) in zip(resumed, straight[resume_after:]):
            for key in ("images", "tokens", "indices"):
                np.testing.assert_array_equal(batch[key], expected[key])
            assert state == expected_state
    assert full.shape[1] == 8
