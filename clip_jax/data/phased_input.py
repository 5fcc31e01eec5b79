"""Training input of a run with phases (clip_jax.phases): each phase's batches
at its own image size and caption length."""

from clip_jax import phases as phases_lib
from clip_jax.data.pipeline import TrainInput


class PhasedInput:
    """Endless iterator of (batch, InputState) for train steps start_step + 1,
    start_step + 2, ...: a TrainInput at the phase's image size and caption
    length, closed and reopened from the current InputState where they change.

    The switch is exact, so a run resumed inside any phase reads what an
    uninterrupted one read: each sample is a function of its stream position
    (and the sizes), not of when or by which worker it was decoded. Blocks the
    old workers had decoded ahead are dropped, not consumed. The first
    TrainInput opens at the first `next()`.
    """

    def __init__(self, config, run_phases, state, start_step, **input_kwargs):
        self._config, self._phases, self._state = config, run_phases, state
        self._step, self._input_kwargs = start_step, input_kwargs
        self._input, self._sizes = None, None

    def __iter__(self):
        return self

    def __next__(self):
        self._step += 1
        phase = phases_lib.phase_at(self._phases, self._step)
        sizes = (phase.image_size, phase.context_length)
        if sizes != self._sizes:
            self.close()
            self._input = TrainInput(self._config, self._state, image_size=phase.image_size,
                                     context_length=phase.context_length, **self._input_kwargs)
            self._sizes = sizes
        batch, self._state = next(self._input)
        return batch, self._state

    def close(self):
        if self._input is not None:
            self._input.close()
            self._input = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
