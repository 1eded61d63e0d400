"""PNG plots: benchmark throughput per configuration and against steps, quality against speed (sweeps), and the
speed / quality plane of a model comparison (``dinfill compare``, ``dinfill report --plot``).

matplotlib is an optional extra (``pip install dinfill[plot]``); :func:`require_matplotlib` is called before
any benchmark runs, so a missing install fails in a second rather than after the measurements. The Agg
backend is forced: benchmarks run on headless machines.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["require_matplotlib", "plot_bench", "plot_comparison", "plot_quality_vs_speed"]


def require_matplotlib() -> None:
    """Raise a clear error when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'dinfill[plot]' (or matplotlib)")


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write ``throughput.png`` (tokens/s per configuration, reference beside it) and, when several step
    counts were run, ``steps.png`` (tokens/s against steps per alg / cache / batch). Returns the paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ValueError("no records to plot")
    device = records[0].get("env", {}).get("device", "?")
    labels = [r["label"] for r in records]
    ours = [r["metrics"]["tokens_per_s"] for r in records]
    refs = [(r.get("reference") or {}).get("tokens_per_s") for r in records]
    paths = []

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(records)))
    y = list(range(len(records)))
    has_ref = any(v is not None for v in refs)
    height = 0.4 if has_ref else 0.7
    ax.barh([i - (height / 2 if has_ref else 0) for i in y], ours, height=height, label="dinfill")
    if has_ref:
        ax.barh([i + height / 2 for i in y], [v or 0 for v in refs], height=height, label="reference")
        for i, r in enumerate(records):
            sp = (r.get("reference") or {}).get("speedup")
            if sp:
                ax.text(ours[i], i - height / 2, f" {sp:.1f}x", va="center", fontsize=8)
        ax.legend(loc="lower right")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("generated tokens / s")
    ax.set_title(f"dinfill bench on {device}", fontsize=10)
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    diffusion = [r for r in records if r["config"]["kind"] == "diffusion"]
    if len({r["config"]["steps"] for r in diffusion}) > 1:
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in diffusion:
            c = r["config"]
            key = f"{c['alg']} cache={c['cache']} B={c['batch']} {c['length']}"
            series[key].append((c["steps"], r["metrics"]["tokens_per_s"]))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("diffusion steps")
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"throughput against steps ({device})", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "steps.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def plot_quality_vs_speed(rows: Sequence[dict[str, Any]], path: str | Path, *, metric: str, title: str) -> Path:
    """Scatter of ``metric`` (quality) against problems/s, one series per alg / length mode, points labelled
    with their step count. When no row has a quality value (random weights), the speed side alone is drawn:
    problems/s against steps, and the y label says quality was not measured."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        series[f"{r.get('alg') or r.get('kind')} / {r['length']}"].append(r)
    speed_only = all(r.get(metric) is None for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, pts in sorted(series.items()):
        pts = sorted(pts, key=lambda r: r.get("steps") or 0)
        if speed_only:
            ax.plot([r.get("steps") or 0 for r in pts], [r["problems_per_s"] for r in pts], marker="o", label=key)
            continue
        xs, ys = [r["problems_per_s"] for r in pts], [r.get(metric) for r in pts]
        ax.plot(xs, ys, marker="o", label=key)
        for x, yv, r in zip(xs, ys, pts, strict=True):
            if r.get("steps"):
                ax.annotate(str(r["steps"]), (x, yv), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if speed_only:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("diffusion steps")
        ax.set_ylabel(f"problems / s ({metric} not measured: random weights)")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("problems / s")
        ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9, wrap=True)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_comparison(
    points: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    sweeps: Sequence[dict[str, Any]] = (),
    title: str = "",
) -> Path:
    """The speed / quality plane of a comparison, one panel per task, plus the steps sweep curve when given.

    Parameters
    ----------
    points : sequence of dict
        One per run: ``label``, ``kind``, ``task``, ``metric`` (its name), ``quality`` (a rate in [0, 1]) and
        ``ms_per_problem``; a point without quality or time is left out (and the panel says so when it is empty).
    path : path
        The PNG to write.
    sweeps : sequence of dict
        ``dinfill sweep`` rows (``model``, ``task``, ``steps``, ``alg``, ``length``, ``quality``,
        ``quality_metric``, ``problems_per_s``): drawn as quality against steps, one line per model, task, alg and
        length mode (problems / s against steps where no quality was measured: random weights).
    title : str
        Figure title (the device, for example).

    Returns
    -------
    Path
        ``path``.
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(p["task"] for p in points))
    if not tasks and not sweeps:
        raise ValueError("nothing to plot: no runs and no sweep results")
    panels = len(tasks) + bool(sweeps)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.8), squeeze=False)
    markers = {"diffusion": "o", "ar": "s"}
    # one colour per label in every panel, named once in the figure's legend (labels of close points would overlap)
    labels = list(dict.fromkeys(p["label"] for p in points))
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    handles = {}
    for ax, task in zip(axes[0], tasks, strict=False):
        pts = [p for p in points if p["task"] == task and p.get("quality") is not None and p.get("ms_per_problem")]
        metric = next((p["metric"] for p in points if p["task"] == task), "quality")
        for p in pts:
            x, y = p["ms_per_problem"], 100 * p["quality"]
            handles[p["label"]] = ax.scatter(
                [x], [y], marker=markers.get(p.get("kind"), "^"), s=45, color=colours[p["label"]], label=p["label"]
            )
        if pts:
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no run with a score and a time yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("ms per problem (generation; log scale)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(-3, 103)  # the whole scale: panels and runs compare at a glance
        ax.set_title(f"{task}: quality against time (o diffusion, □ AR)", fontsize=9)
        ax.grid(alpha=0.3)
    if sweeps:
        ax = axes[0][-1]
        measured = [r for r in sweeps if r.get("quality") is not None]
        rows = measured or list(sweeps)
        series: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            series[f"{r.get('model')} {r.get('task')} {r.get('alg')} {r.get('length')}"].append(r)
        for key, pts in sorted(series.items()):
            pts = sorted(pts, key=lambda r: r["steps"])
            ys = [100 * r["quality"] if measured else r["problems_per_s"] for r in pts]
            ax.plot([r["steps"] for r in pts], ys, marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("diffusion steps")
        metric = next((r.get("quality_metric") for r in measured if r.get("quality_metric")), "quality")
        ax.set_ylabel(f"{metric} (%)" if measured else "problems / s (quality not measured: random weights)")
        ax.set_title("dinfill sweep: steps", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(handles) + 2) // 3), 1, 1) if handles else None)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
