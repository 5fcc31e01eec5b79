"""Where a compiled program's device time goes: a jax.profiler trace of a few
steps, summed by kind of operation (hlo_stats.OP_KINDS: matmul, attention,
fusion, collective, data movement, other), with the busy fraction of the wall
time and the ops that took longest.

This turns an MFU figure into its causes: MFU = (model FLOPs / peak) / step
time, and the step time splits into the time the matmul and attention kernels
run (how close to peak they run is `kernel_flops_fraction`), the time the other
kernels run (elementwise and reduction fusions, layout copies, collectives) and
the time the device sits idle (dispatch, host work).

The trace is read with jax.profiler.ProfileData (part of jaxlib), so nothing
beyond JAX is needed on the machine that measures. Events are attributed to
the program's instructions by the `hlo_op` a profiler records with each one
(an op-level event on TPU and CPU; the annotation of a GPU kernel), and, where
a GPU kernel carries none (a kernel inside a CUDA graph), by the kernel's name.
xprof reads traces fully but is a separate install; this reads the few fields
the summary needs, so that the device check runs on a bare JAX image.
"""

import collections
import contextlib
import dataclasses
import glob
import os
import re
import shutil
import tempfile
import time

import jax
from etils import epath

from clip_jax import hlo_stats

# Lines a profiler adds to a device plane by deriving them from the others.
_DERIVED_LINES = ("XLA Modules", "XLA TraceMe", "Steps", "TensorFlow Ops", "TensorFlow Name Scope",
                  "Framework Ops", "Framework Name Scope", "Source code", "Launch Stats")
_ANNOTATED = re.compile(r"hlo_op=([^,#:]+)")
_ANNOTATED_MODULE = re.compile(r"hlo_module=([^,#:]+)")
# GPU kernel names by kind, for kernels whose instruction is unknown; first match wins.
_KERNEL_NAMES = (
    ("attention", ("fmha", "flash", "sdpa", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "conv")),
    ("collective", ("nccl", "all_reduce", "allreduce", "all_gather", "reduce_scatter")),
    ("data movement", ("memcpy", "memset", "copy", "transpose")),
    ("fusion", ("fusion", "reduce", "triton", "loop_", "input_")),
)


@dataclasses.dataclass(frozen=True)
class Event:
    """One operation's run on a device timeline."""
    device: str  # the profiler's plane: one accelerator, or the host's CPU
    line: str  # the timeline (a GPU stream, a TPU's op line, a CPU thread)
    name: str  # the kernel or op name the profiler gives
    start_ns: float
    duration_ns: float
    hlo_op: str  # the program instruction it ran, "" when the profiler says none
    hlo_module: str  # the program it belongs to, "" when unknown


def _stat_text(stats, key, pattern):
    if isinstance(stats.get(key), str) and stats[key]:
        return stats[key]
    for value in stats.values():
        found = pattern.findall(value) if isinstance(value, str) else None
        if found:
            return found[-1]  # the innermost of an annotation stack
    return ""


def device_events(profile):
    """Events of the device timelines of a jax.profiler.ProfileData: the
    accelerator planes' op or kernel lines, or on a CPU the host threads' events
    that ran a program instruction."""
    planes = list(profile.planes)
    accelerators = [p for p in planes if p.name.startswith("/device:") and "CPU" not in p.name]
    accelerator = bool(accelerators)
    events = []
    # With an accelerator, the host's events that name an instruction are its
    # launches of the device's work, not the work.
    for plane in accelerators or [p for p in planes if p.name == "/host:CPU"]:
        lines = list(plane.lines)
        names = [line.name for line in lines]
        if accelerator and "XLA Ops" in names:
            lines = [line for line in lines if line.name == "XLA Ops"]
        elif accelerator:
            lines = [line for line in lines if line.name not in _DERIVED_LINES]
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                hlo_op = _stat_text(stats, "hlo_op", _ANNOTATED)
                if not accelerator and not hlo_op:
                    continue  # host work that is not the program's (Python, runtime)
                events.append(Event(plane.name, line.name, event.name, event.start_ns, event.duration_ns,
                                    hlo_op, _stat_text(stats, "hlo_module", _ANNOTATED_MODULE)))
    return events


def self_times(events):
    """{event: its duration less that of the events nested in it on its own line}
    (a loop's event spans its body's ops on some timelines)."""
    by_line = collections.defaultdict(list)
    for event in events:
        by_line[event.device, event.line].append(event)
    own = {}
    for line_events in by_line.values():
        line_events.sort(key=lambda e: (e.start_ns, -e.duration_ns))
        enclosing = []  # the events the current one starts inside, outermost first
        for event in line_events:
            while enclosing and _end(enclosing[-1]) <= event.start_ns:
                enclosing.pop()
            own[event] = event.duration_ns
            if enclosing:
                parent = enclosing[-1]
                own[parent] -= min(_end(event), _end(parent)) - event.start_ns
            enclosing.append(event)
    return own


def _end(event):
    return event.start_ns + event.duration_ns


def busy_ns(events):
    """Nanoseconds in which at least one of `events` ran (overlaps counted once);
    the events of one device."""
    intervals = sorted((e.start_ns, e.start_ns + e.duration_ns) for e in events)
    total, end = 0.0, float("-inf")
    for start, stop in intervals:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def kernel_kind(name):
    """The OP_KINDS entry a GPU kernel's name suggests."""
    lower = name.lower()
    return next((kind for kind, words in _KERNEL_NAMES if any(w in lower for w in words)),
                "other")


def summarize(events, hlo_text, steps, wall_s, module=None, top=12):
    """Per-step device time by kind of `events` (one program's run of `steps`
    steps, taking `wall_s` seconds in all), their busy fraction, and the `top`
    instructions by time, each per device (the mean over the traced devices).
    `module`: the program's name (`HloModule` line), to leave out events of
    other programs where the profiler names them."""
    kinds = hlo_stats.instruction_kinds(hlo_text)
    if module:
        # A profiler that names modules otherwise than the HLO text leaves nothing:
        # then every traced event counts.
        events = [e for e in events if not e.hlo_module or e.hlo_module == module] or events
    own = self_times(events)
    by_kind = dict.fromkeys(hlo_stats.OP_KINDS, 0.0)
    by_op = collections.defaultdict(lambda: [0.0, 0, "", ""])
    unattributed = 0.0
    for event, nanoseconds in own.items():
        # A TPU's op line names each event by its instruction.
        known = kinds.get(event.hlo_op) or kinds.get(event.name)
        if known is None:
            unattributed += nanoseconds
        kind, source = known or (kernel_kind(event.name), "")
        by_kind[kind] += nanoseconds
        entry = by_op[event.hlo_op or event.name]
        entry[0] += nanoseconds
        entry[1] += 1
        entry[2], entry[3] = kind, source
    devices = sorted({event.device for event in events}) or [None]
    scale = 1e9 * steps * len(devices)  # ns over all devices -> s per device per step
    by_kind = {kind: ns / scale for kind, ns in by_kind.items()}
    op_ns = sum(by_kind.values())
    busy = sum(busy_ns([e for e in events if e.device == device]) for device in devices) / scale
    ranked = sorted(by_op.items(), key=lambda item: -item[1][0])[:top]
    return {
        "steps": steps, "devices": len(devices), "wall_s_per_step": wall_s / steps,
        "busy_s_per_step": busy, "busy_fraction": busy * steps / wall_s if wall_s else None,
        "op_s_per_step": by_kind,
        # CPU threads run ops side by side: op time can exceed busy time there.
        "op_s_total_per_step": op_ns,
        "unattributed_fraction": unattributed / scale / op_ns if op_ns else None,
        "top_ops": [{"op": name, "kind": kind, "s_per_step": ns / scale,
                     "calls_per_step": calls / steps / len(devices), "source": source[-120:]}
                    for name, (ns, calls, kind, source) in ranked],
    }


def module_name(hlo_text):
    """The program's name from its `HloModule NAME, ...` line."""
    found = re.match(r"HloModule ([^\s,]+)", hlo_text)
    return found.group(1) if found else None


class Trace:
    """A jax.profiler trace of what runs between start() and stop(), read back."""

    def __init__(self):
        self._directory = None

    def start(self):
        self._directory = tempfile.mkdtemp(prefix="clip_jax_trace_")
        jax.profiler.start_trace(self._directory)

    def stop(self, keep_as=None):
        """Ends the trace -> its jax.profiler.ProfileData. `keep_as`: a path (local
        or gs://) the trace's .xplane.pb is copied to, for xprof or TensorBoard's
        profile plugin."""
        try:
            jax.profiler.stop_trace()
            found = glob.glob(os.path.join(self._directory, "**", "*.xplane.pb"), recursive=True)
            if not found:
                raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {self._directory}")
            if keep_as:
                kept = epath.Path(keep_as)
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_bytes(epath.Path(found[0]).read_bytes())
            return jax.profiler.ProfileData.from_file(found[0])
        finally:
            shutil.rmtree(self._directory, ignore_errors=True)


@contextlib.contextmanager
def traced(keep_as=None):
    """Traces the block; yields a list that holds, after the block, the trace's
    ProfileData (Trace.stop's `keep_as`)."""
    result, trace = [], Trace()
    trace.start()
    try:
        yield result
    except BaseException:
        trace.stop()  # the profiler takes one trace at a time: end this one
        raise
    result.append(trace.stop(keep_as))


class StepWindow:
    """Profiles steps `first` .. `first + count - 1` of a loop that dispatches one
    step after another: before(step) ahead of each dispatch, after(step, ...)
    once it is dispatched; after() returns the summary at the window's last step
    (else None). `keep_as`: where the trace is kept (Trace.stop)."""

    def __init__(self, first, count, keep_as=None):
        self.first, self.last, self.keep_as = first, first + count - 1, keep_as
        self._trace = self._started = None

    def before(self, step, pending=None):
        """`pending`: the earlier steps' results still being computed, waited for
        before the trace starts so that it holds the window's steps alone."""
        if step == self.first:
            jax.block_until_ready(pending)
            self._trace, self._started = Trace(), time.perf_counter()
            self._trace.start()

    def after(self, step, outputs, hlo_text):
        """`outputs`: the step's results (waited for); `hlo_text()`: the step's
        compiled program as text."""
        if step != self.last or self._trace is None:
            return None
        jax.block_until_ready(outputs)
        wall = time.perf_counter() - self._started
        trace, self._trace = self._trace, None
        profile = trace.stop(self.keep_as)
        text = hlo_text()
        return summarize(device_events(profile), text, self.last - self.first + 1, wall,
                         module_name(text))


def describe(summary):
    """Lines for a log: device time per step by kind of op, the busy share of the
    wall time, and the slowest ops with their JAX source."""
    kinds = ", ".join(f"{kind} {seconds * 1e3:.1f}" for kind, seconds
                      in summary["op_s_per_step"].items() if seconds > 0)
    lines = [f"device time per step: {kinds} ms (op time over {summary['steps']} traced steps); "
             f"device busy {100 * summary['busy_fraction']:.0f}% of the wall time"]
    if summary.get("kernel_flops_fraction") is not None:
        lines.append(f"matmul and attention kernels at "
                     f"{100 * summary['kernel_flops_fraction']:.0f}% of peak FLOP/s while they run")
    lines += [f"  {op['s_per_step'] * 1e3:8.2f} ms  {op['kind']:<13} {op['op']:<28} "
              f"{op['source'][-60:]}" for op in summary["top_ops"][:8]]
    return lines


def kernel_flops_fraction(summary, model_flops_per_step, peak_flops):
    """How close to `peak_flops` the matmul and attention kernels run: the step's
    model FLOPs over the time those kernels take, as a fraction of peak (None
    without a peak or without such kernels)."""
    compute_s = summary["op_s_per_step"]["matmul"] + summary["op_s_per_step"]["attention"]
    if not peak_flops or compute_s <= 0:
        return None
    return model_flops_per_step / compute_s / peak_flops

