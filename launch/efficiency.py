"""A sweep's training efficiency, as in the CLIP paper's Figure 2: a metric
against images seen (step x batch size), the images each run needs to reach a
target value, and the ratios between runs that the sweep's config compares
(`get_comparisons`), next to the paper's.

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


def tables(runs, metric, target, comparisons):
    """(per-run (header, rows), comparison (header, rows)) at `target`."""
    run_header = ["run", "images seen", f"best {metric}", f"final {metric}",
                  f"images to reach {target:.4g}"]
    run_rows, reaches = [], {}
    for run in runs:
        points = images_seen(run, metric)
        if not points:
            continue
        reaches[run["name"]] = reach = images_to_reach(points, target)
        run_rows.append([label(run), points[-1][0], max(value for _, value in points),
                         points[-1][1], reach.cell()])
    comparison_header = ["comparison", "slower", "faster", "measured ratio", "paper"]
    comparison_rows = []
    for comparison in comparisons:
        slower, faster = (_matching(runs, comparison[side]) for side in ("slower", "faster"))
        if slower is None or faster is None or not {slower["name"], faster["name"]} <= set(reaches):
            measured = "n/a (run missing)"
        else:
            measured = ratio_cell(reaches[slower["name"]], reaches[faster["name"]])
        comparison_rows.append([
            comparison["label"], label(slower) if slower else str(comparison["slower"]),
            label(faster) if faster else str(comparison["faster"]), measured,
            f"{comparison['paper']:g}x"])
    return (run_header, run_rows), (comparison_header, comparison_rows)


def plot(series, path, metric, target, title):
    """`metric` against images seen, one line per run, the target dashed, PNG at `path`."""
    import matplotlib  # noqa: PLC0415 (plotting only when collecting)
    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        axes.plot([images for images, _ in points], [value for _, value in points],
                  marker="o", markersize=3, label=name)
    axes.axhline(target, color="grey", linestyle="--", linewidth=1,
                 label=f"target {target:.3g}")
    axes.set_xlabel("images seen")
    axes.set_ylabel(metric)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
