"""The report's PNG figures (matplotlib, Agg backend), from the cohorts and their scores.

``write_plots(cohorts, rows, out, code_system)``: ``cohorts`` maps "real" and the scored rows
("synthetic", "floor", "baseline", those present) to cohort columns; ``rows`` holds their
metrics; ``code_system`` ("icd9cm" or "icd10cm") names the categories and their titles.
When the real cohort has times (``time_outcome.has_times``) it also draws ``gap_days.png`` and
``stay_days.png`` (histograms of real, synthetic and baseline, those with times; log-x for gaps)
and, when a generated row has times, ``mortality_by_category.png`` (real vs generated in-hospital
death rate per category). Given ``utility`` (``{row: metrics.utility result}``, the report's
train-on-synthetic figures) it also draws ``utility.png``: per task, the AUROC of the model
trained on each row's cohort against the real-trained one, and the group means with their 95%
bootstrap intervals. When the rows carry procedures or medications scored against the real
cohort's (``coherence.modality_coherence``) it also draws ``modality_pairs.png``: per such
modality and row, the within-visit prevalence of each (diagnosis category, category of the
modality) pair, real vs generated, with the row's cross-modality R².
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import ModuleType

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from promptehr_hf.datasets_scripts import code_systems  # noqa: E402
from promptehr_hf.datasets_scripts import incidence as inc  # noqa: E402
from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM  # noqa: E402
from promptehr_hf.metrics.coherence import (  # noqa: E402
    CROSS_KEYS,
    cohorts,
    modality,
    modality_matrices,
    safe_category,
    safe_modality_category,
)
from promptehr_hf.metrics.time_outcome import Times, has_times, mortality_by_category  # noqa: E402

COLORS = {"real": "#333333", "synthetic": "#1f77b4", "floor": "#2ca02c", "baseline": "#ff7f0e"}
N_TOP_CATEGORIES, N_HEATMAP = 20, 15


def _title(code: str, icd: ModuleType) -> str:
    try:
        t = icd.title(code)
    except KeyError:
        return code
    return f"{code} {t[:28]}…" if len(t) > 29 else f"{code} {t}"


def write_plots(cohort_columns: dict[str, dict], rows: dict, out: Path,
                code_system: str = DEFAULT_CODE_SYSTEM, utility: dict | None = None) -> list[Path]:
    """Write the five PNGs (eight with times, one more with ``utility``) into ``out``; returns
    their paths."""
    icd = code_systems.code_system(code_system)
    cs, vocab = cohorts(cohort_columns, code_system)
    names = [n for n in ("synthetic", "floor", "baseline") if n in cs]
    M, categories = inc.group_columns(vocab, partial(safe_category, code_system=code_system))
    cat = {n: inc.collapse(c.X, M) for n, c in cs.items()}
    paths = [
        _code_prevalence(cs, names, rows, out / "code_prevalence.png"),
        _distribution({n: np.diff(c.offsets) for n, c in cs.items()}, ["real", *names], "visits per patient",
                      out / "visits_per_patient.png", cap=10, bars=True),
        _distribution({n: np.diff(c.X.indptr) for n, c in cs.items()}, ["real", *names], "distinct codes per visit",
                      out / "codes_per_visit.png", cap=40, bars=False),
    ]
    share = {n: np.asarray(x.sum(axis=0)).ravel() / max(x.sum(), 1) for n, x in cat.items()}
    top = np.argsort(-share["real"], kind="stable")[:N_TOP_CATEGORIES]
    paths.append(_top_categories(share, top, [_title(categories[k], icd) for k in top], ["real", *names],
                                 out / "top_categories.png"))
    top = np.argsort(-share["real"], kind="stable")[:N_HEATMAP]
    paths.append(_heatmap(cat, top, categories, ["real", *[n for n in names if n != "floor"]],
                          out / "cooccurrence_heatmap.png"))
    if has_times(cohort_columns["real"]):
        paths += _time_plots(cohort_columns, [n for n in names if has_times(cohort_columns[n])], rows, out,
                             code_system)
    if utility:
        paths.append(_utility(utility, out / "utility.png"))
    scored = [m for m in CROSS_KEYS if m in cohort_columns["real"] and any(CROSS_KEYS[m] in rows[n] for n in names)]
    if scored:
        paths.append(_modality_pairs(cohort_columns, cat, names, rows, scored, code_system,
                                     out / "modality_pairs.png"))
    return paths


def _modality_pairs(cohort_columns, cat, names, rows, scored, code_system, path: Path) -> Path:
    """One panel per scored modality (rows) and generated row (columns): x = real, y = the row's
    share of visits holding a (diagnosis category, category of the modality) pair, log-log, one
    dot per pair present in either; dotted lines: pair absent."""
    names = [n for n in names if all(m in cohort_columns[n] for m in scored)]
    fig, axes = plt.subplots(len(scored), len(names), figsize=(4.6 * len(names), 4.4 * len(scored)), squeeze=False)
    for axes_row, name in zip(axes, scored):
        mod = modality(name, code_system)
        matrices, vocab = modality_matrices({n: cohort_columns[n][name] for n in ["real", *names]}, mod)
        M, _ = inc.group_columns(vocab, partial(safe_modality_category, mod))
        pairs = {n: (cat[n].T @ inc.collapse(x, M)).tocsr() / max(x.shape[0], 1) for n, (x, _) in matrices.items()}
        for ax, row in zip(axes_row, names):
            union = (pairs["real"] + pairs[row]).tocoo()
            real = np.asarray(pairs["real"][union.row, union.col]).ravel()
            gen = np.asarray(pairs[row][union.row, union.col]).ravel()
            floor = 0.5 / max(cat["real"].shape[0], cat[row].shape[0], 1)
            x, y = np.maximum(real, floor), np.maximum(gen, floor)
            ax.scatter(x, y, s=5, alpha=0.35, color=COLORS[row], linewidths=0)
            lo, hi = floor * 0.8, max(x.max(initial=floor), y.max(initial=floor)) * 1.3
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
            ax.axhline(floor, color="grey", lw=0.5, ls=":")
            ax.axvline(floor, color="grey", lw=0.5, ls=":")
            ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi),
                   xlabel="real: share of visits with the pair", ylabel=f"{row}: the same")
            ax.set_title(f"{row}, diagnoses × {name}: R² = {rows[row].get(CROSS_KEYS[name], float('nan')):.3f}",
                         fontsize=10)
    fig.suptitle("Within-visit pairs across modalities (diagnosis category × procedure category or drug name), "
                 "real vs generated", fontsize=10)
    return _save(fig, path)


UTILITY_GROUPS = {"mortality": ("in-hospital mortality", "o"), "next_admission": ("next-admission category", "s"),
                  "phenotype": ("chronic phenotype", "^")}


def _utility(utility: dict, path: Path) -> Path:
    """Left: one dot per task and trained row, x = AUROC of the real-trained model, y = that of
    the model trained on the row's cohort (both tested on the held-out real patients). Right: per
    task group, the mean AUROC of the real-trained model and of each row's, with their 95%
    bootstrap intervals."""
    names = list(utility)
    lowest = 0.3
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1, 1.15]})
    for name in names:
        for group, (label, marker) in UTILITY_GROUPS.items():
            done = [t for t in utility[name]["tasks"].values() if t["group"] == group and t["status"] == "ok"]
            if done:
                lowest = min(lowest, *(min(t["real"]["auroc"], t["synthetic"]["auroc"]) for t in done))
                left.scatter([t["real"]["auroc"] for t in done], [t["synthetic"]["auroc"] for t in done], s=22,
                             marker=marker, color=COLORS[name], alpha=0.7, linewidths=0, label=f"{name}: {label}")
    lowest = max(0.0, lowest - 0.02)
    left.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    left.axhline(0.5, color="grey", lw=0.5, ls=":")
    left.set(xlim=(lowest, 1.01), ylim=(lowest, 1.01), xlabel="AUROC, trained on real (train split)",
             ylabel="AUROC, trained on the row's cohort", title="Per task, tested on held-out real patients")
    left.legend(fontsize=7, loc="upper left")
    groups = [g for g in UTILITY_GROUPS if np.isfinite(utility[names[0]].get(f"{g}_auroc_real", np.nan))]
    bars = [("real-trained", "floor", names[0], "_real")] + [(f"{n}-trained", n, n, "") for n in names]
    width = 0.8 / len(bars)
    x = np.arange(len(groups))
    for i, (label, color, name, suffix) in enumerate(bars):
        res = utility[name]
        mean = np.array([res[f"{g}_auroc{suffix}"] for g in groups], dtype=float)
        low = np.array([res[f"{g}_auroc{suffix}_ci_low"] for g in groups], dtype=float)
        high = np.array([res[f"{g}_auroc{suffix}_ci_high"] for g in groups], dtype=float)
        # On few patients a bootstrap percentile interval can miss the point estimate: no negative bar.
        err = np.clip(np.nan_to_num(np.vstack([mean - low, high - mean]), nan=0.0), 0.0, None)
        right.bar(x + (i - (len(bars) - 1) / 2) * width, mean, width=width, color=COLORS[color], label=label,
                  yerr=err, capsize=3, error_kw={"lw": 0.8})
    right.axhline(0.5, color="grey", lw=0.5, ls=":")
    right.set_xticks(x, [f"{UTILITY_GROUPS[g][0]}\n({utility[names[0]][f'{g}_tasks']} tasks)" for g in groups],
                     fontsize=8)
    right.set(ylim=(0, 1.05), ylabel="mean AUROC (95% bootstrap interval)", title="Per task group")
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle("Utility: train on each cohort, test on held-out real patients (logistic regression)", fontsize=10)
    return _save(fig, path)


def _time_plots(cohort_columns: dict[str, dict], names: list[str], rows: dict, out: Path,
                code_system: str) -> list[Path]:
    times = {n: Times(cohort_columns[n]) for n in ("real", *names)}
    shown = ["real", *[n for n in names if n != "floor"]]
    paths = [
        _histogram({n: times[n].gaps() for n in shown}, "days from discharge to the next admission",
                   out / "gap_days.png", log_x=True),
        _histogram({n: times[n].stays() for n in shown}, "length of stay (days)", out / "stay_days.png",
                   log_x=False),
    ]
    if names:  # a generated row to compare with
        paths.append(_mortality(cohort_columns, times, names, rows, out / "mortality_by_category.png", code_system))
    return paths


def _histogram(values: dict[str, np.ndarray], label: str, path: Path, log_x: bool) -> Path:
    """Step histograms, share of values per bin. ``log_x``: log-spaced bins from 0.1 (smaller
    values, 0 included, fall in the first bin); else linear bins up to the 99th percentile of
    the real values (larger ones in the last bin)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    pooled = np.concatenate([v for v in values.values()] + [np.zeros(1)])
    if log_x:
        lo, hi = 0.1, max(float(pooled.max()), 1.0)
        edges = np.geomspace(lo, hi * 1.01, 41)
        clip = (lo, edges[-1] * 0.999)
    else:
        ref = values["real"] if len(values["real"]) else pooled
        hi = max(float(np.percentile(ref, 99)), 1.0)
        edges = np.linspace(min(float(pooled.min()), 0.0), hi, 41)
        clip = (edges[0], hi)
    for name, v in values.items():
        if not len(v):
            continue
        p, _ = np.histogram(np.clip(v, *clip), bins=edges)
        ax.stairs(p / len(v), edges, color=COLORS[name], lw=1.6 if name == "real" else 1.1,
                  label=f"{name} (n {len(v):,}, median {np.median(v):.3g})")
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=label + (" (log scale; below 0.1 in the first bin)" if log_x else
                           f" (above {hi:.3g} in the last bin)"), ylabel="share", title=f"Distribution of {label}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _mortality(cohort_columns, times, names, rows, path: Path, code_system: str) -> Path:
    """Per row, the in-hospital death rate of the visits holding each of the most common real
    categories: real (x) vs the row (y), one dot per category, size by real visits."""
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        by = mortality_by_category(cohort_columns[name], cohort_columns["real"], code_system=code_system,
                                   times=(times[name], times["real"]))
        held = np.isfinite(by["rate"])
        x, y = by["rate_real"][held], by["rate"][held]
        size = 8 + 60 * by["visits_real"][held] / max(int(by["visits_real"].max(initial=1)), 1)
        ax.scatter(x, y, s=size, alpha=0.6, color=COLORS[name], linewidths=0)
        hi = max(float(x.max(initial=0)), float(y.max(initial=0)), 0.01) * 1.1
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--")
        ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="real: in-hospital death rate of the visits with the category",
               ylabel=f"{name}: the same")
        r2 = (rows.get(name) or {}).get("mortality_by_category_r2", float("nan"))
        ax.set_title(f"{name}: R² = {r2:.3f} over {int(held.sum())} categories", fontsize=10)
    fig.suptitle(f"In-hospital mortality by category (the {len(by['categories'])} most common "
                 "real categories; dot size: real visits)", fontsize=10)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _code_prevalence(cs, names, rows, path: Path) -> Path:
    R = cs["real"]
    real = np.asarray(R.X.sum(axis=0)).ravel() / max(R.n_visits, 1)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        c = cs[name]
        syn = np.asarray(c.X.sum(axis=0)).ravel() / max(c.n_visits, 1)
        present = (real > 0) | (syn > 0)
        floor = 0.5 / max(R.n_visits, c.n_visits, 1)  # where absent codes are drawn
        x, y = np.maximum(real[present], floor), np.maximum(syn[present], floor)
        ax.scatter(x, y, s=6, alpha=0.4, color=COLORS[name], linewidths=0)
        lo, hi = floor * 0.8, max(x.max(initial=floor), y.max(initial=floor)) * 1.3
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.axhline(floor, color="grey", lw=0.5, ls=":")
        ax.axvline(floor, color="grey", lw=0.5, ls=":")
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="real: share of visits with the code",
               ylabel=f"{name}: share of visits with the code")
        r2 = rows[name]["r2_code_prevalence"]
        ax.set_title(f"{name}: R² = {r2:.3f}, JS = {rows[name]['code_js']:.3f}", fontsize=10)
        ax.text(0.02, 0.97, "dotted lines: code absent", transform=ax.transAxes, fontsize=7, va="top", color="grey")
    fig.suptitle("Code prevalence per visit, real vs generated (one dot per code)", fontsize=11)
    return _save(fig, path)


def _distribution(values: dict[str, np.ndarray], names, label: str, path: Path, cap: int, bars: bool) -> Path:
    """Share of patients/visits per count: grouped bars on a log scale (few values, long tail)
    or step lines (many values)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    bins = np.arange(0, cap + 1)
    for i, name in enumerate(names):
        v = np.minimum(values[name], cap)
        p = np.bincount(v, minlength=cap + 1)[: cap + 1] / max(len(v), 1)
        tag = f"{name} (mean {values[name].mean():.2f})" if len(v) else name
        if bars:
            ax.bar(bins + (i - (len(names) - 1) / 2) * width, p, width=width, color=COLORS[name], label=tag)
        else:
            ax.step(bins, p, where="mid", color=COLORS[name], label=tag, lw=1.6 if name == "real" else 1.1)
    if bars:
        ax.set_yscale("log")
    ax.set(xlabel=f"{label} ({cap} = {cap} or more)", ylabel="share" + (" (log scale)" if bars else ""),
           title=f"Distribution of {label}")
    ax.set_xlim(0.5 if min(int(values[n].min(initial=1)) for n in names) > 0 else -0.5, cap + 0.5)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _top_categories(share, top, labels, names, path: Path) -> Path:
    """Horizontal bars of the ``top`` categories' shares, labelled ``labels`` (one per top category)."""
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(top) + 1.2))
    height = 0.8 / len(names)
    y = np.arange(len(top))
    for i, name in enumerate(names):
        ax.barh(y + (i - (len(names) - 1) / 2) * height, share[name][top], height=height, color=COLORS[name],
                label=name)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="share of all (visit, category) occurrences",
           title=f"The {len(top)} most common categories of the real cohort")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _heatmap(cat, top, categories, names, path: Path) -> Path:
    """log2 lift of within-visit category pairs, P(i and j) / (P(i) P(j)), per cohort: red =
    together more often than chance, blue = less; an independent sampler is flat."""
    lifts = {}
    for name in names:
        x = cat[name][:, top]
        n = max(x.shape[0], 1)
        joint = (x.T @ x).toarray().astype(np.float64) / n
        prev = np.diag(joint).copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.log2(joint / np.outer(prev, prev))
        np.fill_diagonal(lift, np.nan)  # the diagonal is prevalence, not a pair
        lift[~np.isfinite(lift)] = np.nan  # never together (or category absent)
        lifts[name] = lift
    finite = np.concatenate([m[np.isfinite(m)] for m in lifts.values()])
    # A robust bound: one extreme pair (e.g. two exclusive categories) must not wash out the rest.
    bound = float(np.clip(np.percentile(np.abs(finite), 98), 0.5, 4.0)) if finite.size else 1.0
    fig, axes = plt.subplots(1, len(names), figsize=(4.3 * len(names) + 1.2, 4.9), squeeze=False,
                             constrained_layout=True)
    labels = [categories[k] for k in top]
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
    for ax, name in zip(axes[0], names):
        im = ax.imshow(lifts[name], cmap=cmap, vmin=-bound, vmax=bound)
        ax.set_xticks(range(len(top)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(top)), labels, fontsize=7)
        ax.set_title(name, fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="log2 P(both) / (P(i) P(j))")
    fig.suptitle(f"Within-visit co-occurrence lift of the {len(top)} most common real categories "
                 "(grey: diagonal, or never together)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
