"""VisitTimeModel: the length of each stay, the gap before each readmission and the patient's death,
drawn for generated patients from their codes (``time_model.safetensors``).

Four heads, each a multinomial logistic regression over the visit's diagnosis categories (a
multi-hot vector), the patient's age band, sex and the visit's index, fitted on the training
cohort (``promptehr_hf.modeling_promptehr.training.time_model``):

- ``stay``: the stay's length, one of ``n`` quantile bins of the training stays, over the visit's
  categories;
- ``gap``: the days from a discharge to the next admission (visits after the first), quantile
  bins, over the previous visit's categories and the current one's;
- ``death``: whether the patient died in hospital, at the last visit (MIMIC's
  ``HOSPITAL_EXPIRE_FLAG``; an in-hospital death ends the record), over the last visit's
  categories and the number of visits;
- ``after``: for the others, the days from the last discharge to a death outside hospital in
  quantile bins, or no known death (the last class).

A value is drawn inside its bin from the training values' own distribution there: each bin keeps
``K + 1`` within-bin quantiles (levels 0, 1/K, ..., 1; the first and last are the bin's edges) and a
draw ``u ~ U(0, 1)`` is interpolated piecewise linearly between them (in ``log1p`` space for gaps and
days to death). A file without these quantiles (written before them) draws uniformly inside the
bin: that is the table with ``K = 1``. The codes are drawn first and are not changed: a cohort
generated without times has the same codes.

Tails: above the upper outer edge (the 99.5% quantile) a head keeps the share of its last bin's
training values beyond it and their mean excess, and draws that share as the edge plus an
exponential of that mean. Calibration: each head may carry a ``shift`` added to its logits
(``calibrated=True``, the default), fitted after training so that its expected rates over the
generator's own patients are the training ones.

Draws are stratified (:mod:`.sampling`): each patient's bin or outcome has its head's probability,
and over the cohort each bin's and outcome's count lies within one of the sum of those
probabilities (systematic sampling, class by class, along the patients in random order); the
uniforms of the values inside one bin fill its quantiles evenly. Independent draws would add the
noise of a binomial count to every rate the cohort reports.

Ages: the patient's age is its age at the first admission; later admissions are older by the
stays and gaps before them. Where a later visit holds a code whose CMS age edit caps the age
(newborn, pediatric, maternity), that visit and the ones before it are moved earlier so that its
age stays inside the edit (gaps, then stays, shortened); counted in ``stats["time_capped_visits"]``.

Shipped with the checkpoint in ``custom_generate/``: imports only numpy, safetensors (a dependency of
transformers), the standard library and the files beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from .prior import AGE_BAND_EDGES, SEXES
from .sampling import stratified_within, systematic_classes

TIME_MODEL_FILE = "time_model.safetensors"
TIME_MODEL_FORMAT = "promptehr-time-model"
HEADS = ("stay", "gap", "death", "after")
BINNED_HEADS = ("stay", "gap", "after")
LOG_HEADS = ("gap", "after")  # days spanning orders of magnitude: drawn inside a bin on a log1p scale
INDEX_BUCKETS = 4  # visit index (or number of visits - 1) 0, 1, 2, 3+
DAYS_PER_YEAR = 365.25
TIME_FIELDS = ("stay_days", "gap_days", "hospital_death", "death_days")


def has_times(patients: Sequence[dict]) -> bool:
    """Whether every patient carries stays and gaps (a cohort read with its times)."""
    return bool(patients) and all(p.get("stay_days") is not None and p.get("gap_days") is not None
                                  for p in patients)


class BinaryRows:
    """Rows of a 0/1 matrix as CSR arrays (``indptr`` [n + 1], ``indices``): the heads' inputs,
    without scipy (which a checkpoint's remote code may not have)."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, width: int):
        self.indptr, self.indices, self.width = indptr, indices, width

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def take(self, rows: np.ndarray) -> "BinaryRows":
        lengths = np.diff(self.indptr)[rows]
        starts = self.indptr[rows]
        pos = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
        return BinaryRows(np.r_[0, np.cumsum(lengths)], self.indices[pos], self.width)

    @staticmethod
    def hstack(parts: Sequence["BinaryRows"]) -> "BinaryRows":
        """Columns side by side (every part has the same rows)."""
        lengths = sum(np.diff(p.indptr) for p in parts)
        offsets = np.cumsum([0] + [p.width for p in parts[:-1]])
        owner = np.concatenate([np.repeat(np.arange(len(p)), np.diff(p.indptr)) for p in parts])
        cols = np.concatenate([p.indices + off for p, off in zip(parts, offsets)])
        order = np.argsort(owner, kind="stable")
        return BinaryRows(np.r_[0, np.cumsum(lengths)], cols[order], int(sum(p.width for p in parts)))

    @staticmethod
    def one_hot(columns: np.ndarray, width: int) -> "BinaryRows":
        return BinaryRows(np.arange(len(columns) + 1), np.asarray(columns, dtype=np.int64), width)

    def dot(self, weight: np.ndarray) -> np.ndarray:
        """[n, K] = rows @ weight.T for ``weight`` [K, width]."""
        out = np.zeros((len(self), weight.shape[0]))
        filled = np.diff(self.indptr) > 0
        if filled.any():
            sums = np.add.reduceat(weight.T[self.indices].astype(np.float64), self.indptr[:-1][filled], axis=0)
            out[filled] = sums
        return out


class VisitFeatures:
    """The heads' inputs: rows of [categories of one or two visits | age band | male | index bucket].

    ``categories``: the category of each column (the training cohort's); ``category_of`` maps a
    code to its category (the tokenizer's ``category_of``); codes of unknown categories add nothing.
    """

    def __init__(self, categories: Sequence[str], category_of: Callable[[str], str]):
        self.categories = list(categories)
        self.column = {c: i for i, c in enumerate(self.categories)}
        self.category_of = category_of
        self.n_bands = len(AGE_BAND_EDGES)

    def visits(self, visits: Sequence[Sequence[str]]) -> BinaryRows:
        """The categories of each visit (one row per visit)."""
        # One category lookup per distinct code, not per code of every visit.
        column = {code: self.column.get(self.category_of(code)) for code in {c for v in visits for c in v}}
        cols = [sorted({column[code] for code in visit} - {None}) for visit in visits]
        lengths = np.fromiter(map(len, cols), dtype=np.int64, count=len(cols))
        flat = np.fromiter((c for row in cols for c in row), dtype=np.int64, count=int(lengths.sum()))
        return BinaryRows(np.r_[0, np.cumsum(lengths)], flat, len(self.categories))

    def rows(self, blocks: Sequence[BinaryRows], ages: np.ndarray, sexes: Sequence[str],
             index: np.ndarray) -> BinaryRows:
        """``[*blocks | age band | male | index bucket]`` (ages in years, index 0-based)."""
        band = np.clip(np.searchsorted(AGE_BAND_EDGES, np.asarray(ages, dtype=np.float64), side="right") - 1,
                       0, self.n_bands - 1)
        male = np.asarray(sexes, dtype=object) == SEXES[1]
        sex = BinaryRows(np.r_[0, np.cumsum(male)], np.zeros(int(male.sum()), dtype=np.int64), 1)
        bucket = np.minimum(np.asarray(index, dtype=np.int64), INDEX_BUCKETS - 1)
        return BinaryRows.hstack([*blocks, BinaryRows.one_hot(band, self.n_bands), sex,
                                  BinaryRows.one_hot(bucket, INDEX_BUCKETS)])


class VisitTimeModel:
    """The four heads' weights and bins (see the module docstring); ``sample`` draws the times."""

    def __init__(self, categories: Sequence[str], weights: dict[str, np.ndarray], biases: dict[str, np.ndarray],
                 edges: dict[str, np.ndarray], quantiles: dict[str, np.ndarray] | None = None,
                 shifts: dict[str, np.ndarray] | None = None, tails: dict[str, np.ndarray] | None = None):
        """``quantiles``: per binned head, [bins, K + 1] within-bin quantiles (the first and last
        column the bin's edges); a head without one draws uniformly inside its bins (``K = 1``).
        ``shifts``: per head, the calibration added to its logits ([K], like its bias) when drawing
        calibrated; zero for a head without one. ``tails``: per binned head, ``[share, mean]``: the
        share of its last bin's training values above the outer edge and their mean excess over
        it (days), drawn as an exponential tail beyond the edge; ``[0, 0]`` (none) by default."""
        self.categories = list(categories)
        self.weights = {h: np.asarray(weights[h], dtype=np.float32) for h in HEADS}
        self.biases = {h: np.asarray(biases[h], dtype=np.float32) for h in HEADS}
        shifts = shifts or {}
        self.shifts = {h: np.asarray(shifts[h], dtype=np.float32) if h in shifts else np.zeros_like(self.biases[h])
                       for h in HEADS}
        self.edges = {h: np.asarray(edges[h], dtype=np.float64) for h in BINNED_HEADS}
        quantiles = quantiles or {}
        self.quantiles = {h: np.asarray(quantiles[h], dtype=np.float64) if h in quantiles
                          else np.stack([self.edges[h][:-1], self.edges[h][1:]], axis=1) for h in BINNED_HEADS}
        tails = tails or {}
        self.tails = {h: np.asarray(tails.get(h, (0.0, 0.0)), dtype=np.float64) for h in BINNED_HEADS}
        for h in BINNED_HEADS:
            if self.tails[h].shape != (2,) or not 0.0 <= self.tails[h][0] < 1.0 or self.tails[h][1] < 0.0:
                raise ValueError(f"{h}: a tail is [share in [0, 1), mean excess >= 0], got {self.tails[h].tolist()}")
            if self.quantiles[h].ndim != 2 or len(self.quantiles[h]) != len(self.edges[h]) - 1:
                raise ValueError(f"{h}: {self.quantiles[h].shape} within-bin quantiles for "
                                 f"{len(self.edges[h]) - 1} bins")

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> str:
        """Write ``time_model.safetensors`` into ``directory`` (bins and categories in its metadata,
        the within-bin quantiles as ``{head}.quantiles`` tensors)."""
        path = Path(directory) / TIME_MODEL_FILE
        tensors = {f"{h}.weight": np.ascontiguousarray(self.weights[h]) for h in HEADS}
        tensors |= {f"{h}.bias": np.ascontiguousarray(self.biases[h]) for h in HEADS}
        tensors |= {f"{h}.quantiles": np.ascontiguousarray(self.quantiles[h]) for h in BINNED_HEADS}
        tensors |= {f"{h}.shift": np.ascontiguousarray(self.shifts[h]) for h in HEADS if self.shifts[h].any()}
        tensors |= {f"{h}.tail": np.ascontiguousarray(self.tails[h]) for h in BINNED_HEADS if self.tails[h].any()}
        metadata = {"format": TIME_MODEL_FORMAT, "categories": json.dumps(self.categories),
                    "edges": json.dumps({h: e.tolist() for h, e in self.edges.items()})}
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)  # never a torn file beside a valid checkpoint
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VisitTimeModel":
        """Read a ``time_model.safetensors`` file, or the one in a checkpoint directory (one without
        within-bin quantiles draws uniformly inside the bins)."""
        path = Path(path)
        if path.is_dir():
            path = path / TIME_MODEL_FILE
        try:
            with safe_open(str(path), framework="numpy") as f:  # load_file drops the metadata
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
            if metadata.get("format") != TIME_MODEL_FORMAT:
                raise ValueError(f"not a {TIME_MODEL_FORMAT} file")
            edges = {h: np.array(e) for h, e in json.loads(metadata["edges"]).items()}
            quantiles = {h: tensors[f"{h}.quantiles"] for h in BINNED_HEADS if f"{h}.quantiles" in tensors}
            shifts = {h: tensors[f"{h}.shift"] for h in HEADS if f"{h}.shift" in tensors}
            tails = {h: tensors[f"{h}.tail"] for h in BINNED_HEADS if f"{h}.tail" in tensors}
            return cls(json.loads(metadata["categories"]), {h: tensors[f"{h}.weight"] for h in HEADS},
                       {h: tensors[f"{h}.bias"] for h in HEADS}, edges, quantiles, shifts, tails)
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"cannot read the time model {path}: {err}") from err

    # ------------------------------------------------------------------ sampling
    def probs(self, head: str, X: BinaryRows, calibrated: bool = True) -> np.ndarray:
        """[n, classes] probabilities of ``head`` for the rows ``X`` (the death head: [alive, died]);
        ``calibrated``: with the head's shift."""
        logits = X.dot(self.weights[head]) + self.biases[head] + (self.shifts[head] if calibrated else 0.0)
        if head == "death":  # the binary head: the logit of class 1
            p = 1.0 / (1.0 + np.exp(-logits))
            return np.hstack([1.0 - p, p])
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    @staticmethod
    def _draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One class per row of ``probs``, each with its row's probabilities; the cohort's count of
        each class is within one of its expectation (systematic sampling)."""
        return systematic_classes(probs / probs.sum(axis=1, keepdims=True), rng)

    def _values(self, head: str, bins: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One value per bin in ``bins``: ``u ~ U(0, 1)`` through the bin's piecewise-linear
        within-bin quantile function (in log1p space for :data:`LOG_HEADS`); the uniforms of one
        bin's values are stratified, so they spread over its quantiles as the training values do.
        A ``K = 1`` table draws uniformly inside the bin. In the last bin, the top ``share`` of
        the uniforms (the training values the outer edge clipped) go to the exponential tail beyond
        the edge (``tails``)."""
        table = self.quantiles[head]
        if head in LOG_HEADS:
            table = np.log1p(table)
        k = table.shape[1] - 1
        u = stratified_within(bins, rng)
        pos = u * k
        seg = np.minimum(pos.astype(np.int64), k - 1)
        lo, hi = table[bins, seg], table[bins, seg + 1]
        value = lo + (pos - seg) * (hi - lo)
        value = np.expm1(value) if head in LOG_HEADS else value
        share, mean = self.tails[head]
        if share > 0:
            top = (bins == len(table) - 1) & (u >= 1.0 - share)
            value[top] = self.edges[head][-1] - mean * np.log1p(-(u[top] - (1.0 - share)) / share)
        return value

    def head_rows(self, patients: Sequence[dict], category_of: Callable[[str], str]) -> dict:
        """Each head's input rows for ``patients`` (dicts with ``age``, ``sex``, ``visits``, at
        least one visit each): ``stay`` one row per visit, ``gap`` one per visit after the first,
        ``death`` and ``after`` one per patient (its last visit); with the bookkeeping ``owner``
        (the patient of each visit), ``start`` (each patient's first visit), ``later`` (the visits
        after a first) and ``visits`` (every visit's codes)."""
        feats = VisitFeatures(self.categories, category_of)
        n = len(patients)
        n_visits = np.array([len(p["visits"]) for p in patients], dtype=np.int64)
        ages = np.array([float(p["age"]) for p in patients])
        sexes = [p["sex"] for p in patients]
        owner = np.repeat(np.arange(n), n_visits)
        start = np.r_[0, np.cumsum(n_visits)[:-1]]
        index = np.arange(len(owner)) - start[owner]
        visits = [v for p in patients for v in p["visits"]]
        V = feats.visits(visits)
        v_sexes = [sexes[i] for i in owner]
        later = np.flatnonzero(index > 0)
        X_last = feats.rows([V.take(start + n_visits - 1)], ages, sexes, n_visits - 1)
        return {"stay": feats.rows([V], ages[owner], v_sexes, index),
                "gap": feats.rows([V.take(later - 1), V.take(later)], ages[owner[later]],
                                  [v_sexes[i] for i in later], index[later]) if len(later) else None,
                "death": X_last, "after": X_last, "owner": owner, "start": start, "later": later,
                "n_visits": n_visits, "ages": ages, "visits": visits}

    def sample(self, patients: Sequence[dict], rng: np.random.Generator, category_of: Callable[[str], str],
               age_caps: Callable[[Sequence[str]], float] | None = None,
               calibrated: bool = True) -> tuple[list[dict], dict]:
        """The patients with ``stay_days``, ``gap_days``, ``hospital_death`` and ``death_days`` drawn.

        Args:
            patients: [n] dicts with ``age``, ``sex`` and ``visits`` (their codes are kept as they are).
            rng: the random stream of the times (the codes' stream is not touched).
            category_of: code -> category (the tokenizer's ``category_of``).
            age_caps: visit codes -> the highest whole-year age their CMS edits allow (``inf`` for
                none); None: no cap.
            calibrated: add each head's calibration shift (``shifts``) to its logits.
        Returns:
            (patients, stats): new dicts; stats ``time_capped_visits``, ``hospital_deaths``.
        """
        n = len(patients)
        if n == 0:
            return [], {"time_capped_visits": 0, "hospital_deaths": 0}
        rows = self.head_rows(patients, category_of)
        owner, start, later, n_visits, ages = (rows[k] for k in ("owner", "start", "later", "n_visits", "ages"))
        visits = rows["visits"]

        stay_bins = self._draw(self.probs("stay", rows["stay"], calibrated), rng)
        stays = self._values("stay", stay_bins, rng)
        gaps = np.zeros(len(owner))
        if len(later):
            gaps[later] = self._values("gap", self._draw(self.probs("gap", rows["gap"], calibrated), rng), rng)
        died = self._draw(self.probs("death", rows["death"], calibrated), rng) == 1
        # Days to a later death only for the patients who left hospital alive: drawn among them, the
        # count of later deaths is near its expectation too.
        none = len(self.edges["after"]) - 1  # the last class: no known death
        alive = np.flatnonzero(~died)
        after_bins = np.full(n, none)
        after_bins[alive] = self._draw(self.probs("after", rows["after"].take(alive), calibrated), rng)
        known = after_bins < none
        after = np.full(n, np.nan)
        after[known] = self._values("after", after_bins[known], rng)

        capped = 0
        if age_caps is not None:
            caps = np.array([age_caps(v) for v in visits], dtype=np.float64)
            stays, gaps, capped = _cap_ages(ages, n_visits, stays, gaps, caps)
        out = []
        for i, p in enumerate(patients):
            s, e = start[i], start[i] + n_visits[i]
            out.append({**p, "stay_days": stays[s:e].tolist(), "gap_days": gaps[s:e].tolist(),
                        "hospital_death": bool(died[i]),
                        "death_days": None if np.isnan(after[i]) else float(after[i])})
        return out, {"time_capped_visits": int(capped), "hospital_deaths": int(died.sum())}


def _cap_ages(ages: np.ndarray, n_visits: np.ndarray, stays: np.ndarray, gaps: np.ndarray,
              caps: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Move admissions earlier so that the whole-year age at each admission is at most its cap.

    ``caps``: per visit, the highest whole-year age its codes allow. A later admission must be at
    most (cap + 1 - age) years after the first (less a day); every earlier admission then also
    moves, keeping the order; a stay longer than the time left before the next admission is
    shortened. Returns (stays, gaps, visits moved)."""
    n, width = len(n_visits), int(n_visits.max())
    mask = np.arange(width)[None, :] < n_visits[:, None]
    S, G, C = _pad(stays, mask, 0.0), _pad(gaps, mask, 0.0), _pad(caps, mask, np.inf)
    admit = np.cumsum(G, axis=1) + np.concatenate([np.zeros((n, 1)), np.cumsum(S, axis=1)[:, :-1]], axis=1)
    limit = (C + 1.0 - ages[:, None]) * DAYS_PER_YEAR - 1.0
    limit = np.minimum.accumulate(limit[:, ::-1], axis=1)[:, ::-1]  # a later cap binds the earlier visits
    limit = np.where(mask, np.maximum(limit, 0.0), np.inf)
    moved = mask & (admit > limit)
    if not moved.any():
        return stays, gaps, 0
    admit = np.where(moved, limit, admit)
    admit[:, 0] = 0.0
    nxt = np.concatenate([admit[:, 1:], np.full((n, 1), np.inf)], axis=1)
    S = np.where(mask, np.minimum(S, nxt - admit), 0.0)
    prev_end = np.concatenate([np.zeros((n, 1)), (admit + S)[:, :-1]], axis=1)
    G = np.where(mask, np.maximum(admit - prev_end, 0.0), 0.0)
    G[:, 0] = 0.0
    return S[mask], G[mask], int(moved.sum())


def _pad(values: np.ndarray, mask: np.ndarray, fill: float) -> np.ndarray:
    out = np.full(mask.shape, fill, dtype=np.float64)
    out[mask] = values
    return out
