"""A sweep's training efficiency, as in the CLIP paper's Figure 2: a metric
against images seen (step x batch size) and, where the runs logged it, against
training time (`train/seconds`: the step loop's wall-clock, compilation and
evaluation left out); the images (and seconds) each run needs to reach a
target value, and the ratios between runs that the sweep's config compares
(`get_comparisons`), next to the published ones.

Images to reach the target interpolate linearly between evaluations at the
first crossing. A run already at the target at its first evaluation reached it
at or before then ("<= N"); a run that never reaches it is "not reached" and
only bounds a ratio from one side.
"""

import dataclasses
import math

from launch import ablation


def images_seen(run, metric):
    """[(images seen, value), ...] of `metric` by step: step x the run's batch size."""
    batch_size = ablation.swept_value(run, "batch_size")
    return [(step * int(batch_size), value)
            for step, value in ablation.history(run["rows"], metric).items()]


def training_seconds(run, metric):
    """[(training seconds, value), ...] of `metric` by step, at the steps that also
    logged train/seconds; [] for runs that did not log it."""
    seconds = ablation.history(run["rows"], "train/seconds")
    return [(seconds[step], value) for step, value in ablation.history(run["rows"], metric).items()
            if step in seconds]


@dataclasses.dataclass(frozen=True)
class Reach:
    """When a run reached the target: between `low` and `high` images seen
    (equal when interpolated; low 0 when the first evaluation was already there;
    high infinite when never reached, low then the images it saw)."""
    low: float
    high: float

    def cell(self):
        if self.low == self.high:
            return f"{self.low:,.0f}"
        if math.isinf(self.high):
            return f"not reached (> {self.low:,.0f})"
        return f"<= {self.high:,.0f}"


def images_to_reach(points, target):
    """The Reach of `target` by [(images, value), ...] in order of images."""
    previous = None
    for images, value in points:
        if value >= target:
            if previous is None:
                return Reach(0.0, float(images))
            last_images, last_value = previous
            images = last_images + (target - last_value) / (value - last_value) * (
                images - last_images)
            return Reach(float(images), float(images))
        previous = (images, value)
    return Reach(float(points[-1][0]) if points else 0.0, math.inf)


def ratio_cell(slower, faster):
    """'3.1x', or a bound ('>= 2.0x', '<= 5.0x'), or 'n/a': images the slower run
    needs over images the faster one needs, from their Reaches."""
    low = slower.low / faster.high if faster.high > 0 else math.inf
    high = slower.high / faster.low if faster.low > 0 else math.inf
    if low == high:
        return f"{low:.2f}x"
    if math.isinf(high) and low > 0:
        return f">= {low:.2f}x"
    if not math.isinf(high):
        return f"<= {high:.2f}x"
    return "n/a"


def label(run):
    """A run's overrides as 'key=value, ...' (its name without any)."""
    return ", ".join(f"{key}={value}" for key, value in run["overrides"].items()) or run["name"]


def default_target(series):
    """The highest value every run reaches: the lowest of the runs' best values."""
    return min(max(value for _, value in points) for points in series.values())


def _matching(runs, overrides):
    found = [run for run in runs if run["overrides"] == overrides]
    return found[0] if found else None


def timed(runs, metric):
    """Whether every run logged its training time at each evaluation of `metric`."""
    return all(len(training_seconds(run, metric)) == len(images_seen(run, metric))
               for run in runs)


def _published(value):
    return value if isinstance(value, str) else f"{value:g}x"


def tables(runs, metric, target, comparisons):
    """(per-run (header, rows), comparison (header, rows)) at `target`; with the
    seconds to reach it and the time ratios too when every run logged its time."""
    with_time = timed(runs, metric)
    run_header = ["run", "images seen", f"best {metric}", f"final {metric}",
                  f"images to reach {target:.4g}"]
    run_header += ["training seconds", f"seconds to reach {target:.4g}"] if with_time else []
    run_rows, reaches, time_reaches = [], {}, {}
    for run in runs:
        points = images_seen(run, metric)
        if not points:
            continue
        reaches[run["name"]] = reach = images_to_reach(points, target)
        row = [label(run), points[-1][0], max(value for _, value in points), points[-1][1],
               reach.cell()]
        if with_time:
            seconds = training_seconds(run, metric)
            time_reaches[run["name"]] = time_reach = images_to_reach(seconds, target)
            row += [f"{seconds[-1][0]:,.0f}", time_reach.cell()]
        run_rows.append(row)
    comparison_header = ["comparison", "slower", "faster", "measured ratio (images)"]
    comparison_header += ["measured ratio (time)"] if with_time else []
    comparison_header += ["published"]
    comparison_rows = []
    for comparison in comparisons:
        slower, faster = (_matching(runs, comparison[side]) for side in ("slower", "faster"))
        found = (slower is not None and faster is not None
                 and {slower["name"], faster["name"]} <= set(reaches))
        measured = [ratio_cell(found_reaches[slower["name"]], found_reaches[faster["name"]])
                    if found else "n/a (run missing)"
                    for found_reaches in ([reaches, time_reaches] if with_time else [reaches])]
        comparison_rows.append([
            comparison["label"], label(slower) if slower else str(comparison["slower"]),
            label(faster) if faster else str(comparison["faster"]), *measured,
            _published(comparison["paper"])])
    return (run_header, run_rows), (comparison_header, comparison_rows)


def plot(series, path, metric, target, title, time_series=None):
    """`metric` against images seen, one line per run, the target dashed, PNG at
    `path`; beside it against training seconds when `time_series` is given."""
    import matplotlib  # noqa: PLC0415 (plotting only when collecting)
    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415
    panels = [(series, "images seen")] + ([(time_series, "training seconds")]
                                          if time_series else [])
    figure, all_axes = pyplot.subplots(1, len(panels), figsize=(7 * len(panels), 4.5),
                                       squeeze=False)
    for axes, (panel, x_label) in zip(all_axes[0], panels):
        for name, points in panel.items():
            axes.plot([x for x, _ in points], [value for _, value in points],
                      marker="o", markersize=3, label=name)
        axes.axhline(target, color="grey", linestyle="--", linewidth=1,
                     label=f"target {target:.3g}")
        axes.set_xlabel(x_label)
        axes.set_ylabel(metric)
        axes.set_title(title, fontsize=10)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
