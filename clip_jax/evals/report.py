"""An evaluation report people can look at: a Markdown table, a bar chart of the
metrics and, for zero-shot classification, the classes it gets most wrong."""

import collections
import os
import re

import numpy as np

# Metrics that are fractions in [0, 1] (what the bar chart shows); the rest are
# counts and settings, listed in the table only.
_RATE_SUFFIXES = ("/top1", "/top5", "/validation_top1", "_r1", "_r5", "_r10")
WORST_CLASSES = 10


def natural_order(names):
    """Names sorted with their numbers compared as numbers (r1, r5, r10)."""
    return sorted(names, key=lambda name: [int(part) if part.isdigit() else part
                                           for part in re.split(r"(\d+)", name)])


def rate_metrics(metrics):
    return {name: value for name, value in metrics.items() if name.endswith(_RATE_SUFFIXES)}


def worst_classes(details, count=WORST_CLASSES):
    """[(class name, top-1 accuracy, examples, [(confused-with name, share), ...])] for the
    `count` classes with the lowest accuracy (ties: lower class index first)."""
    names, labels, predictions = details["class_names"], details["labels"], details["top5"][:, 0]
    rows = []
    for label in np.unique(labels):
        predicted = predictions[labels == label]
        accuracy = float(np.mean(predicted == label))
        wrong = collections.Counter(int(p) for p in predicted if p != label)
        confused = [(names[p], n / len(predicted)) for p, n in
                    sorted(wrong.items(), key=lambda item: (-item[1], item[0]))[:3]]
        rows.append((int(label), accuracy, len(predicted), confused))
    rows.sort(key=lambda row: (row[1], row[0]))
    return [(names[label], accuracy, n, confused) for label, accuracy, n, confused in rows[:count]]


def format_value(name, value):
    if name.endswith(_RATE_SUFFIXES):
        return f"{value:.4f}"
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def markdown(metrics, results, title):
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| `{name}` | {format_value(name, value)} |" for name, value in
              ((name, metrics[name]) for name in natural_order(metrics))]
    for prefix, result in sorted(results.items()):
        if "class_names" not in result.details:
            continue
        lines += ["", f"## {prefix}: the {WORST_CLASSES} worst classes", "",
                  "| class | top-1 | images | most often taken for |", "|---|---|---|---|"]
        for name, accuracy, count, confused in worst_classes(result.details):
            taken_for = ", ".join(f"{other} ({share:.0%})" for other, share in confused) or "-"
            lines.append(f"| {name} | {accuracy:.3f} | {count} | {taken_for} |")
    return "\n".join(lines) + "\n"


def _bar_chart(metrics, path, title):
    import matplotlib  # noqa: PLC0415 (plotting is optional at import time)
    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415
    rates = rate_metrics(metrics)
    figure, axes = pyplot.subplots(figsize=(8, 0.35 * len(rates) + 1.2))
    names = natural_order(rates)
    axes.barh(range(len(names)), [rates[name] for name in names], color="tab:blue")
    axes.set_yticks(range(len(names)), names, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("score")
    axes.set_title(title, fontsize=10)
    for row, name in enumerate(names):
        axes.text(min(rates[name] + 0.01, 0.9), row, f"{rates[name]:.3f}", va="center",
                  fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _confusion_chart(details, path, title):
    """The worst classes' rows of the confusion matrix, over the classes they are
    taken for (the ones that matter), as a heat map."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415
    names, labels, predictions = details["class_names"], details["labels"], details["top5"][:, 0]
    worst = [names.index(name) for name, *_ in worst_classes(details)]
    columns = sorted(set(worst) | {int(p) for p in predictions[np.isin(labels, worst)]})
    matrix = np.array([[np.mean(predictions[labels == row] == column) for column in columns]
                       for row in worst])
    figure, axes = pyplot.subplots(figsize=(1.2 + 0.4 * len(columns), 1.2 + 0.4 * len(worst)))
    image = axes.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    axes.set_xticks(range(len(columns)), [names[c] for c in columns], rotation=90, fontsize=7)
    axes.set_yticks(range(len(worst)), [names[r] for r in worst], fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true class")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def write_report(directory, metrics, results, title="clip_jax evaluation"):
    """Writes DIRECTORY/report.md, metrics.png and confusion_<dataset>.png (zero-shot);
    returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, "report.md"), os.path.join(directory, "metrics.png")]
    text = markdown(metrics, results, title)
    if rate_metrics(metrics):
        _bar_chart(metrics, paths[1], title)
        text += "\n![metrics](metrics.png)\n"
    else:
        paths.pop()
    for prefix, result in sorted(results.items()):
        if "class_names" in result.details and len(result.details["labels"]):
            name = f"confusion_{prefix.split('/')[1]}.png"
            _confusion_chart(result.details, os.path.join(directory, name),
                             f"{prefix}: worst classes")
            text += f"\n![{prefix} confusion]({name})\n"
            paths.append(os.path.join(directory, name))
    with open(paths[0], "w") as f:
        f.write(text)
    return paths
