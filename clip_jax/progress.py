"""Training progress for a person at a terminal or for a log file.

At a terminal, tqdm's bar. When the output is a file (SLURM, a TPU VM's log,
`> run.log`) a bar writes a carriage-return frame per update, over a thousand
for a 1,200-step run; there, one line per logged step instead. Either way the
ETA is the remaining steps at the measured training throughput, which leaves
out compilation and evaluation time (tqdm's own rate would count both).
"""

import sys

import tqdm


def is_terminal(stream=None):
    """Whether `stream` (default: stderr, where bars go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def duration(seconds):
    """'1h 02m', '3m 05s', '42s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


class StepProgress:
    """Steps `initial + 1 .. total` of a run; prints only where `enabled`
    (process 0). `update()` after each step, `log(...)` at logged steps,
    `write(...)` for any other line."""

    def __init__(self, total, initial=0, enabled=True, terminal=None):
        self.total, self.enabled = total, enabled
        terminal = is_terminal() if terminal is None else terminal
        self.bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                             ) if enabled and terminal else None

    def update(self):
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step, loss, samples_per_sec, batch_size):
        """The line (or bar postfix) of a logged step; samples_per_sec None for
        the first step of a run (it includes compilation)."""
        if not self.enabled:
            return
        fields = [f"loss {loss:.4f}"]
        if samples_per_sec:
            eta = (self.total - step) * batch_size / samples_per_sec
            fields += [f"{samples_per_sec:,.0f} samples/s", f"ETA {duration(eta)}"]
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(fields))
        else:
            print(f"step {step}/{self.total}: " + ", ".join(fields), flush=True)

    def write(self, message):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
