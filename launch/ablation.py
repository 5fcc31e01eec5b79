"""A finished (or running) sweep as an ablation table: one row per run, the swept
config values, then the final and best values of a metric; as Markdown, CSV and a
PNG plot.

Each run directory holds the trainer's metrics.jsonl and config.json, and the
sweep's record of its overrides (sweep.json); a run launched elsewhere without
sweep.json is described by the config values in which the runs differ.
"""

import csv
import io
import json
import os

SWEEP_FILE = "sweep.json"  # {"sweep", "config", "overrides", "set"} of a run
TRAIN_LOSS = "train/loss"


def _filesystem(path):
    """os-like (open, exists, listdir, isdir) for local paths, tf.io.gfile for URLs (gs://)."""
    if "://" not in path:
        return open, os.path.exists, os.listdir, os.path.isdir
    import tensorflow as tf  # noqa: PLC0415 (only remote sweeps need it)
    return tf.io.gfile.GFile, tf.io.gfile.exists, tf.io.gfile.listdir, tf.io.gfile.isdir


def _read_json(path):
    open_file, exists, *_ = _filesystem(path)
    if not exists(path):
        return None
    with open_file(path) as f:
        return json.load(f)


def read_metrics(path):
    """The rows of a metrics.jsonl; a line cut short by a killed run is left out."""
    open_file, exists, *_ = _filesystem(path)
    if not exists(path):
        return []
    with open_file(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def read_runs(root):
    """[{name, overrides (None without sweep.json), record (sweep.json or None), config
    (None before the trainer wrote it), rows}] of every run directory under `root`, by
    name."""
    _, _, listdir, isdir = _filesystem(root)
    runs = []
    for name in sorted(entry.rstrip("/") for entry in listdir(root)):
        directory = os.path.join(root, name)
        if not isdir(directory):
            continue
        record = _read_json(os.path.join(directory, SWEEP_FILE))
        config = _read_json(os.path.join(directory, "config.json"))
        if record is None and config is None:
            continue  # not a run (e.g. the ablation output)
        runs.append(dict(name=name, overrides=record and record["overrides"], record=record,
                         config=config,
                         rows=read_metrics(os.path.join(directory, "metrics.jsonl"))))
    return runs


_MISSING = object()


def lookup(config, dotted):
    """config["a"]["b"] for "a.b"; _MISSING where the path does not exist."""
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return _MISSING
        config = config[part]
    return config


def _flatten(config, prefix=""):
    """{dotted key: leaf value} of a nested dict."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_values(configs):
    """Per config, {dotted key: value} of the keys whose values differ between them."""
    flat = [_flatten(config) for config in configs]
    keys = sorted(set().union(*flat)) if flat else []
    differing = [key for key in keys
                 if len({json.dumps(f.get(key), sort_keys=True) for f in flat}) > 1]
    return [{key: f.get(key) for key in differing} for f in flat]


def with_overrides(runs):
    """`runs` where every run has overrides: its sweep.json's, else the config values
    that differ between the runs without one."""
    unrecorded = [run for run in runs if run["overrides"] is None and run["config"]]
    inferred = differing_values([run["config"] for run in unrecorded])
    by_name = {run["name"]: overrides for run, overrides in zip(unrecorded, inferred)}
    return [dict(run, overrides=run["overrides"] if run["overrides"] is not None
                 else by_name.get(run["name"], {})) for run in runs]


def swept_keys(runs):
    """The override keys of all runs, in the order they first appear."""
    return list(dict.fromkeys(key for run in runs for key in run["overrides"]))


def history(rows, metric):
    """{step: value} of `metric`, by step; a step logged again after a resume keeps
    its latest value."""
    values = {}
    for row in rows:
        if metric in row:
            values[int(row["step"])] = row[metric]
    return dict(sorted(values.items()))


def _best(values, goal):
    """(best value, its first step) of {step: value}; (None, None) when empty."""
    if not values:
        return None, None
    pick = max if goal == "max" else min
    best = pick(values.values())
    return best, min(step for step, value in values.items() if value == best)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sort_key(value):
    """Numbers by value, then strings, then missing values."""
    if _is_number(value):
        return (0, value, "")
    return (2, 0, "") if value is None else (1, 0, str(value))


def swept_value(run, key):
    """The run's value of a swept key: its override, else its config's, else None."""
    if key in run["overrides"]:
        return run["overrides"][key]
    value = lookup(run["config"] or {}, key)
    return None if value is _MISSING else value


def in_swept_order(runs):
    """`runs` sorted by their swept values, the first swept key first."""
    keys = swept_keys(runs)
    return sorted(runs, key=lambda run: [_sort_key(swept_value(run, key)) for key in keys])


def table(runs, metric, goal="max"):
    """(header, rows): per run the swept values, its last step, the final `metric` and
    train/loss, and the best `metric` with the step it was reached at; rows sorted by
    the swept values."""
    keys = swept_keys(runs)
    header = [*keys, "steps", f"final {metric}", f"final {TRAIN_LOSS}", f"best {metric}",
              "best at step"]
    rows = []
    for run in in_swept_order(runs):
        values, losses = history(run["rows"], metric), history(run["rows"], TRAIN_LOSS)
        steps = max((int(row["step"]) for row in run["rows"]), default=None)
        rows.append([*(swept_value(run, key) for key in keys), steps,
                     values[max(values)] if values else None,
                     losses[max(losses)] if losses else None, *_best(values, goal)])
    return header, rows


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(header, rows):
    """A GitHub Markdown table; numbers rounded for reading (the CSV keeps them whole)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header, rows):
    """The table as CSV, full precision, empty cells for missing values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if value is None else value for value in row] for row in rows])
    return buffer.getvalue()


def series_against(runs, metric, x_key):
    """{label: [(x value, final metric), ...] sorted by x}: one line per combination of
    the swept keys other than `x_key` (label 'k=v, ...'; `metric` when there are none)."""
    others = [key for key in swept_keys(runs) if key != x_key]
    lines = {}
    for run in in_swept_order(runs):
        values = history(run["rows"], metric)
        if not values:
            continue
        label = ", ".join(f"{key}={swept_value(run, key)}" for key in others) or metric
        lines.setdefault(label, []).append((swept_value(run, x_key), values[max(values)]))
    return {label: sorted(points, key=lambda point: _sort_key(point[0]))
            for label, points in lines.items()}


def series_over_steps(runs, metric):
    """{run name: [(step, metric), ...]} of the runs that logged `metric`."""
    return {run["name"]: list(history(run["rows"], metric).items())
            for run in in_swept_order(runs) if history(run["rows"], metric)}


def use_log_scale(values):
    """Whether x values are all positive numbers spanning at least a factor of 10."""
    return (bool(values) and all(_is_number(v) and v > 0 for v in values)
            and max(values) / min(values) >= 10)


def plot(series, path, x_label, y_label, title):
    """Draws {label: [(x, y), ...]} as lines with markers into the PNG at `path`.
    Non-numeric x values become evenly spaced categories."""
    import matplotlib  # noqa: PLC0415 (plotting only when collecting)
    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415
    xs = [x for points in series.values() for x, _ in points]
    categories = None if all(_is_number(x) for x in xs) else list(dict.fromkeys(map(str, xs)))
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        x = [categories.index(str(p[0])) if categories else p[0] for p in points]
        axes.plot(x, [p[1] for p in points], marker="o", label=label)
    if categories:
        axes.set_xticks(range(len(categories)), categories)
    elif use_log_scale(xs):
        axes.set_xscale("log")
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    if series:
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
