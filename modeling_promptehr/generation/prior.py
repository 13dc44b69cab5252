"""CohortPrior: the empirical distributions of a training cohort that unconditional generation
draws from (demographics, visits per patient, codes per visit, visit types, within-visit code
pairs), saved as ``cohort_prior.json``.

Shipped with the checkpoint in ``custom_generate/``: imports only numpy, the standard library and
the files beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .sampling import stratified_choice

PRIOR_FILE = "cohort_prior.json"
# The patient schema's sexes (x_cat index: F = 0, M = 1) and age cap (datasets_scripts.schema),
# repeated here because this file travels without the package.
SEXES = ("F", "M")
AGE_CAP = 90.0
PRIOR_FORMAT = "promptehr-cohort-prior"
# Age bands for the visit-count and visit-length distributions: newborn, child, young adult,
# adult, older, oldest (the CMS newborn/pediatric edges and MIMIC's age structure).
AGE_BAND_EDGES = (0.0, 1.0, 18.0, 45.0, 65.0, 80.0)
# Pseudo-pairs of the recurrence odds ratios: a category or code seen in few pairs stays near its
# predicted rate. Predicted rates are kept inside [floor, 1 - floor].
RECURRENCE_SMOOTHING = 1.0
RATE_FLOOR = 1e-4
VISIT_INDEX_CAP = 3  # visit lengths are conditioned on visit index 0, 1, 2, and 3+
VISIT_COUNT_CAP = 3  # the first visit's type is conditioned on the patient having 1, 2, or 3+ visits
AGE_RESOLUTION = 0.1  # ages are stored floored to 0.1 year (an aggregate, not per-patient ages)
# Other modalities' code counts are drawn given the visit type and its diagnosis count, capped
# here; a cell with fewer training visits than MODALITY_CELL_MIN backs off to the type alone.
MODALITY_DIAGNOSIS_CAP = 20
MODALITY_CELL_MIN = 10
# The patient field of each modality beyond the diagnoses (the schema's), and its token prefix
# (the tokenizer's), repeated here because this file travels without the package.
MODALITY_FIELDS = {"procedures": ("procedures", "PX:"), "medications": ("medications", "RX:")}
# Within-visit code pairs seen in fewer training visits than this are not stored: a rare pair
# can single out a patient, and its count says little.
PAIR_MIN_COUNT = 5


class _Empirical:
    """An empirical distribution over integer (or float) values: ``sample(rng, size)`` draws
    ``size`` values stratified (each from the distribution, the counts near ``size`` x the
    probabilities)."""

    def __init__(self, counts: dict):
        values = sorted(counts)
        self.values = np.array(values)
        self.counts = np.array([int(counts[v]) for v in values], dtype=np.int64)
        self.probs = self.counts / self.counts.sum()

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return stratified_choice(self.values, self.probs, size, rng)

    def mean(self) -> float:
        return float((self.values * self.probs).sum())


def _counts(values: np.ndarray) -> dict[str, int]:
    """{value: count} with string keys, as JSON stores them."""
    vals, counts = np.unique(values, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(vals, counts)}


class CohortPrior:
    """Empirical distributions of a training cohort, used for unconditional generation.

    - demographics: the joint distribution of (age floored to 0.1 year, sex);
    - visits per patient given the age band;
    - codes per visit given the age band and the visit index (capped at ``visit_index_cap``);
    - with visit types (a model conditioned on them): the first visit's type given the age band
      and the number of visits (1, 2, ``VISIT_COUNT_CAP`` or more), a later visit's type given the
      previous visit's type, codes per visit given the type and the visit index (capped at
      ``visit_index_cap``), how many visits of each type hold each code (stage two given the
      type), and how often a category or code of one visit recurs in the next
      (:meth:`recurrence_log_lift`). Patients who come back differ from those who do not in their
      first visit, and a type's later visits are longer than its first ones: drawing the first
      type without the visit count, or lengths without the index, shortens later visits.

    With ``modalities`` beyond the diagnoses: the number of codes of each other modality in a
    visit, drawn jointly given the visit type and its number of diagnoses (capped at
    ``MODALITY_DIAGNOSIS_CAP``; :meth:`sample_modality_lengths`), and the type code counts include
    those modalities' code tokens (``"PX:<code>"``, ``"RX:<code>"``).

    Per modality, every code with the visits holding it and the within-visit pairs of codes seen
    together in at least ``PAIR_MIN_COUNT`` visits (:meth:`code_pairs`; stage two given the
    visit's codes).

    Empty cells back off to the pooled distribution (over bands, then over visit indices; over
    first visits, resp. later visits, for the types; to the age band alone for a first type, to the
    type alone for a length).
    Saved as ``cohort_prior.json`` beside the checkpoint (:meth:`save` / :meth:`load`).
    """

    def __init__(self, table: dict):
        if table.get("format") != PRIOR_FORMAT:
            raise ValueError(f"not a PromptEHR cohort prior (format {table.get('format')!r}, "
                             f"expected {PRIOR_FORMAT!r})")
        self.table = table
        self.edges = np.array(table["age_band_edges"], dtype=np.float64)
        self.visit_index_cap = int(table["visit_index_cap"])
        demo = table["demographics"]
        self._ages = np.array(demo["age"], dtype=np.float64)
        self._sexes = np.array(demo["sex"])
        self._demo_p = np.array(demo["count"], dtype=np.float64) / np.sum(demo["count"])
        n_bands = len(self.edges)
        vpp = {int(b): _Empirical({int(k): v for k, v in c.items()}) for b, c in table["visits_per_patient"].items()}
        self._visits_pooled = _Empirical(_merge([table["visits_per_patient"][b] for b in table["visits_per_patient"]]))
        self._visits = [vpp.get(b, self._visits_pooled) for b in range(n_bands)]
        cpv = table["codes_per_visit"]
        pooled_idx = {}
        for i in range(self.visit_index_cap + 1):
            cells = [cpv[b][str(i)] for b in cpv if str(i) in cpv[b]]
            pooled_idx[i] = _Empirical(_merge(cells)) if cells else None
        all_cells = [c for b in cpv for c in cpv[b].values()]
        self._codes_pooled = _Empirical(_merge(all_cells))
        self._codes = [
            [
                _Empirical({int(k): v for k, v in cpv[str(b)][str(i)].items()})
                if str(b) in cpv and str(i) in cpv[str(b)]
                else (pooled_idx[i] or self._codes_pooled)
                for i in range(self.visit_index_cap + 1)
            ]
            for b in range(n_bands)
        ]
        self.max_codes_per_visit = int(self._codes_pooled.values.max())
        vt = table.get("visit_types")
        self.n_types = int(vt["n_types"]) if vt else 0
        if vt:
            def cells(group: dict) -> dict[int, _Empirical]:
                return {int(k): _Empirical({int(t): c for t, c in v.items()}) for k, v in group.items() if v}

            first, after = cells(vt["first"]), cells(vt["transition"])
            first_pooled = _Empirical(_merge(vt["first"].values()))
            after_pooled = _Empirical(_merge(vt["transition"].values())) if after else first_pooled
            self._first_type = [first.get(b, first_pooled) for b in range(n_bands)]
            self._next_type = [after.get(m, after_pooled) for m in range(self.n_types)]
            by_type = cells(vt["codes_per_visit"])
            self._codes_by_type = [by_type.get(m, self._codes_pooled) for m in range(self.n_types)]
            # Tables counted before these two existed: the first type by band alone, lengths by type alone.
            self._first_type_by_visits = {
                (int(b), int(k)): _Empirical({int(t): c for t, c in cell.items()})
                for b, group in vt.get("first_by_visits", {}).items() for k, cell in group.items() if cell}
            self._codes_by_type_index = {
                (int(m), int(i)): _Empirical({int(n): c for n, c in cell.items()})
                for m, group in vt.get("codes_per_visit_by_index", {}).items() for i, cell in group.items() if cell}
            # visits of each type holding each code: {type: {code: n}}
            self.type_code_counts = {int(m): dict(c) for m, c in vt.get("code_counts", {}).items()}
            rec = vt.get("recurrence", {})
            self._recurrence = {kind: {k: tuple(v) for k, v in rec.get(kind, {}).items()}
                                for kind in ("categories", "codes")}

        mod = table.get("modalities")
        self.modalities: tuple[str, ...] = ("diagnoses", *(mod["names"] if mod else ()))
        if mod:
            def joint(cell: dict) -> tuple[np.ndarray, _Empirical]:
                keys = sorted(cell)
                return (np.array([[int(x) for x in k.split(",")] for k in keys], dtype=np.int64),
                        _Empirical({i: cell[k] for i, k in enumerate(keys)}))

            self._modality_cells = {tuple(int(x) for x in key.split("|")): joint(cell)
                                    for key, cell in mod["cells"].items()}
            self._modality_by_type = {int(m): joint(cell) for m, cell in mod["by_type"].items()}
            self._modality_pooled = joint(mod["pooled"])

    @classmethod
    def from_patients(cls, patients, age_band_edges: Sequence[float] = AGE_BAND_EDGES,
                      visit_index_cap: int = VISIT_INDEX_CAP, visit_types: Sequence[Sequence[int]] | None = None,
                      n_types: int | None = None, category=None,
                      modalities: Sequence[str] = ("diagnoses",)) -> "CohortPrior":
        """Count the distributions of a training split (patient dicts or a datasets.Dataset).

        ``visit_types``: the type (0..``n_types`` - 1) of every visit of every patient, in the
        patients' order, for a model conditioned on visit types; None: no type distributions.
        ``category``: code -> its category (the tokenizer's); with ``visit_types``, also count
        how categories and codes recur from one visit to the next (none without it).
        ``modalities``: the tokenizer's; beyond ``"diagnoses"``, count the other modalities' codes
        per visit (the patients' ``procedures`` / ``medications`` lists; a patient without one
        counts 0 codes).
        """
        ages, sexes, visits = columns(patients)
        extra = [m for m in modalities if m != "diagnoses"]
        unknown = [m for m in extra if m not in MODALITY_FIELDS]
        if unknown:
            raise ValueError(f"CohortPrior.from_patients: unknown modalities {unknown}")
        other = _modality_columns(patients, extra, visits)
        if len(ages) == 0:
            raise ValueError("CohortPrior.from_patients: no patients")
        bad = [s for s in set(sexes) if s not in SEXES]
        if bad:
            raise ValueError(f"CohortPrior.from_patients: unknown sex values {bad}; expected {SEXES}")
        n_visits = np.array([len(v) for v in visits], dtype=np.int64)
        if (n_visits == 0).any():
            raise ValueError(f"CohortPrior.from_patients: {int((n_visits == 0).sum())} patients have no visit")
        edges = np.asarray(age_band_edges, dtype=np.float64)
        floored = np.round(np.floor(np.minimum(ages, AGE_CAP) / AGE_RESOLUTION + 1e-6) * AGE_RESOLUTION, 6)
        keys, counts = np.unique(np.stack([floored.astype(str), np.asarray(sexes)], 1), axis=0, return_counts=True)
        bands = _band(ages, edges)
        lengths = np.array([len(v) for vs in visits for v in vs], dtype=np.int64)
        visit_band = np.repeat(bands, n_visits)
        visit_index = np.minimum(np.concatenate([np.arange(k) for k in n_visits]), visit_index_cap)
        table = {
            "format": PRIOR_FORMAT,
            "version": 1,
            "n_patients": int(len(ages)),
            "n_visits": int(n_visits.sum()),
            "age_band_edges": [float(e) for e in edges],
            "age_bands": _band_labels(edges),
            "visit_index_cap": int(visit_index_cap),
            "age_resolution": AGE_RESOLUTION,
            "demographics": {
                "age": [float(a) for a in keys[:, 0]],
                "sex": [str(s) for s in keys[:, 1]],
                "count": [int(c) for c in counts],
            },
            "visits_per_patient": {str(b): _counts(n_visits[bands == b]) for b in np.unique(bands)},
            "codes_per_visit": {
                str(b): {
                    str(i): _counts(lengths[(visit_band == b) & (visit_index == i)])
                    for i in np.unique(visit_index[visit_band == b])
                }
                for b in np.unique(visit_band)
            },
        }
        if visit_types is not None:
            merged = visits if not extra else [
                [[*v, *(MODALITY_FIELDS[m][1] + c for m, lists in zip(extra, rows) for c in lists[k])]
                 for k, v in enumerate(vs)] for vs, rows in zip(visits, zip(*other.values()))]
            table["visit_types"] = _type_counts(visits, visit_types, n_types, bands, lengths, visit_index,
                                                code_visits=merged)
            if category is not None:
                table["visit_types"]["recurrence"] = _recurrence_counts(visits, visit_types, table["visit_types"],
                                                                        category)
        table["code_pairs"] = {
            "min_count": PAIR_MIN_COUNT,
            "n_visits": int(n_visits.sum()),
            "modalities": {m: _pair_counts([v for vs in lists for v in vs], prefix, PAIR_MIN_COUNT)
                           for m, prefix, lists in [("diagnoses", "", visits),
                                                    *((m, MODALITY_FIELDS[m][1], other[m]) for m in extra)]},
        }
        if extra:
            flat_types = (np.concatenate([np.asarray(t, dtype=np.int64) for t in visit_types])
                          if visit_types is not None else np.full(len(lengths), -1, dtype=np.int64))
            counts = np.stack([np.array([len(x) for lists in other[m] for x in lists], dtype=np.int64)
                               for m in extra], 1)
            table["modalities"] = _modality_counts(extra, flat_types, lengths, counts)
        return cls(table)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``directory/cohort_prior.json`` (atomically); returns its path."""
        # A temporary file renamed onto the destination, as file_utils.write_json_atomic does:
        # this file travels without the package, so it cannot import file_utils.
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PRIOR_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.table, f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CohortPrior":
        """Read a ``cohort_prior.json`` file, or the one in a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / PRIOR_FILE
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the cohort prior {path}: {err}") from err
        try:
            return cls(table)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: invalid cohort prior ({err})") from err

    # -------------------------------------------------------------------------- sampling
    def age_band(self, ages) -> np.ndarray:
        """Band index of each age ([n] int)."""
        return _band(np.asarray(ages, dtype=np.float64), self.edges)

    def sample_demographics(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """n (age, sex) pairs from the joint training distribution (stratified)."""
        pick = stratified_choice(np.arange(len(self._demo_p)), self._demo_p, n, rng)
        return self._ages[pick].copy(), [str(s) for s in self._sexes[pick]]

    def sample_n_visits(self, ages, rng: np.random.Generator) -> np.ndarray:
        """Visits per patient given each patient's age band ([n] int)."""
        bands = self.age_band(ages)
        out = np.zeros(len(bands), dtype=np.int64)
        for b in np.unique(bands):
            rows = np.nonzero(bands == b)[0]
            out[rows] = self._visits[b].sample(rng, len(rows))
        return out

    def sample_codes_per_visit(self, ages, visit_index, rng: np.random.Generator) -> np.ndarray:
        """Codes per visit given the patient's age band and the visit index (both [m]) -> [m] int."""
        bands = self.age_band(ages)
        idx = np.minimum(np.asarray(visit_index, dtype=np.int64), self.visit_index_cap)
        out = np.zeros(len(bands), dtype=np.int64)
        for b, i in set(zip(bands.tolist(), idx.tolist())):
            rows = np.nonzero((bands == b) & (idx == i))[0]
            out[rows] = self._codes[b][i].sample(rng, len(rows))
        return out

    def sample_visit_types(self, ages, n_visits, rng: np.random.Generator) -> list[np.ndarray]:
        """The type of every visit of each patient: the first given the age band and the number of
        visits, each later one given the previous type (a Markov chain); ``ages`` and ``n_visits``
        are [n]."""
        if not self.n_types:
            raise ValueError("this cohort prior has no visit types (the model is not conditioned on them)")
        bands = self.age_band(ages)
        n_visits = np.asarray(n_visits, dtype=np.int64)
        count = np.minimum(n_visits, VISIT_COUNT_CAP)
        out = np.zeros((len(bands), int(n_visits.max(initial=0))), dtype=np.int64)
        first = np.nonzero(n_visits > 0)[0]
        for b, k in sorted(set(zip(bands[first].tolist(), count[first].tolist()))):
            sel = first[(bands[first] == b) & (count[first] == k)]
            out[sel, 0] = self._first_cell(b, k).sample(rng, len(sel))
        for t in range(1, out.shape[1]):
            rows = np.nonzero(n_visits > t)[0]
            keys = out[rows, t - 1]
            for k in np.unique(keys):
                sel = rows[keys == k]
                out[sel, t] = self._next_type[int(k)].sample(rng, len(sel))
        return [out[i, :k] for i, k in enumerate(n_visits)]

    def first_type_probs(self, ages, n_visits) -> np.ndarray:
        """P(first visit's type | age band, number of visits) of each patient ([n, n_types]): the
        distribution :meth:`sample_visit_types` draws from, backoffs included."""
        if not self.n_types:
            raise ValueError("this cohort prior has no visit types (the model is not conditioned on them)")
        bands = self.age_band(ages)
        count = np.minimum(np.asarray(n_visits, dtype=np.int64), VISIT_COUNT_CAP)
        return np.stack([self._dense(self._first_cell(int(b), int(k)))
                         for b, k in zip(bands, count)]) if len(bands) else np.zeros((0, self.n_types))

    def transition_probs(self) -> np.ndarray:
        """P(next visit's type | previous visit's type) ([n_types, n_types]), backoffs included."""
        if not self.n_types:
            raise ValueError("this cohort prior has no visit types (the model is not conditioned on them)")
        return np.stack([self._dense(cell) for cell in self._next_type])

    def _first_cell(self, band: int, count: int) -> "_Empirical":
        """The first type's distribution for an age band and a capped visit count; a cell the
        training split left empty (or a prior counted before the count) backs off to the band."""
        return self._first_type_by_visits.get((band, count), self._first_type[band])

    def _dense(self, cell: "_Empirical") -> np.ndarray:
        out = np.zeros(self.n_types)
        out[cell.values.astype(np.int64)] = cell.probs
        return out

    def recurrence_log_lift(self, kind: str, smoothing: float = RECURRENCE_SMOOTHING) -> dict[str, float]:
        """Log odds ratio of recurrence per category (``kind="categories"``) or code (``"codes"``).

        Over the N training pairs of consecutive visits (t, t+1) whose visit t holds it (for a
        code: and whose visit t+1 holds its category), O pairs hold it again in t+1, where the
        visit types predict E (a category: P(category in a visit of type m), m the next type
        drawn from the chain given the type of t, which is what generation knows when it writes
        t+1; a code: P(code | category, type of t+1), what stage two draws from). With
        p = E / N and p* = (O + s p) / (N + s) (``s`` pseudo-pairs at the predicted rate), the
        value is log(p* (1 - p) / (p (1 - p*))): the shift of the log-odds that turns the predicted
        rate into the observed one. Empty without visit types or recurrence counts."""
        if not self.n_types:
            return {}
        out = {}
        for key, (o, e, n) in self._recurrence[kind].items():
            p = min(max(e / n, RATE_FLOOR), 1 - RATE_FLOOR)
            target = (o + smoothing * p) / (n + smoothing)
            out[key] = float(np.log(target * (1 - p) / (p * (1 - target))))
        return out

    def sample_codes_per_visit_by_type(self, types, visit_index, rng: np.random.Generator) -> np.ndarray:
        """Codes per visit given each visit's type and index in its patient (both [m] int) -> [m] int."""
        types = np.asarray(types, dtype=np.int64)
        idx = np.minimum(np.asarray(visit_index, dtype=np.int64), self.visit_index_cap)
        out = np.zeros(len(types), dtype=np.int64)
        for m, i in sorted(set(zip(types.tolist(), idx.tolist()))):
            rows = np.nonzero((types == m) & (idx == i))[0]
            out[rows] = self._codes_by_type_index.get((m, i), self._codes_by_type[m]).sample(rng, len(rows))
        return out

    def sample_modality_lengths(self, types, n_diagnoses, rng: np.random.Generator) -> np.ndarray:
        """Codes of each modality beyond the diagnoses (``modalities[1:]``) for visits of the given
        types (``None`` or -1 for a prior without types) and diagnosis counts (both [m]) -> [m, M - 1]
        int, drawn jointly from the training visits of the same type and diagnosis count (capped at
        ``MODALITY_DIAGNOSIS_CAP``), backing off to the type, then to all visits."""
        if len(self.modalities) == 1:
            raise ValueError("this cohort prior counted diagnoses only")
        n_dx = np.minimum(np.asarray(n_diagnoses, dtype=np.int64), MODALITY_DIAGNOSIS_CAP)
        types = np.full(len(n_dx), -1, dtype=np.int64) if types is None else np.asarray(types, dtype=np.int64)
        out = np.zeros((len(n_dx), len(self.modalities) - 1), dtype=np.int64)
        for m, k in sorted(set(zip(types.tolist(), n_dx.tolist()))):
            rows = np.nonzero((types == m) & (n_dx == k))[0]
            values, cell = self._modality_cells.get(
                (m, k), self._modality_by_type.get(m, self._modality_pooled))
            out[rows] = values[cell.sample(rng, len(rows))]
        return out

    def code_pairs(self) -> tuple[list[str], np.ndarray, int, int, np.ndarray, np.ndarray, np.ndarray]:
        """The within-visit code pairs the prior counted: ``(tokens, visits, n_visits, min_count,
        a, b, n)``: every code token of every modality with the training visits holding it, the
        training visits, the storage threshold, and each stored pair (``tokens[a]``, ``tokens[b]``,
        seen together in ``n`` visits; pairs never cross modalities). Empty when none were counted."""
        table = self.table.get("code_pairs") or {"modalities": {}, "n_visits": 0, "min_count": PAIR_MIN_COUNT}
        tokens: list[str] = []
        visits, a, b, n = [], [], [], []
        for cell in table["modalities"].values():
            a.append(np.asarray(cell["a"], dtype=np.int64) + len(tokens))
            b.append(np.asarray(cell["b"], dtype=np.int64) + len(tokens))
            n.append(np.asarray(cell["n"], dtype=np.int64))
            visits.append(np.asarray(cell["visits"], dtype=np.int64))
            tokens += cell["codes"]

        def cat(parts: list) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

        return tokens, cat(visits), int(table["n_visits"]), int(table["min_count"]), cat(a), cat(b), cat(n)

    def summary(self) -> dict:
        """Means of the stored distributions (visits per patient, codes per visit)."""
        return {
            "n_patients": self.table["n_patients"],
            "mean_visits_per_patient": self._visits_pooled.mean(),
            "mean_codes_per_visit": self._codes_pooled.mean(),
        }


def _merge(cells: Iterable[dict]) -> dict[int, int]:
    out: dict[int, int] = {}
    for cell in cells:
        for k, v in cell.items():
            out[int(k)] = out.get(int(k), 0) + int(v)
    return out


def _modality_columns(patients, modalities: Sequence[str], visits) -> dict[str, list]:
    """{modality: per patient, per visit, its code list} (empty lists where the patient has none)."""
    out = {}
    for m in modalities:
        field = MODALITY_FIELDS[m][0]
        if not hasattr(patients, "column_names"):
            column = [p.get(field) for p in patients]
        elif field in patients.column_names:
            column = patients[field]
        else:
            column = [None] * len(visits)
        out[m] = [[[] for _ in vs] if lists is None else lists for vs, lists in zip(visits, column)]
        for vs, lists in zip(visits, out[m]):
            if len(lists) != len(vs):
                raise ValueError(f"CohortPrior.from_patients: a patient has {len(vs)} visits but "
                                 f"{len(lists)} {m} lists")
    return out


def _modality_counts(names: list[str], types: np.ndarray, n_dx: np.ndarray, counts: np.ndarray) -> dict:
    """The ``modalities`` table: joint counts of the other modalities' code counts ("a,b") per
    (type, capped diagnosis count), per type, and pooled; cells under MODALITY_CELL_MIN visits left out."""
    keys = np.array([",".join(map(str, row)) for row in counts.tolist()], dtype=object)
    capped = np.minimum(n_dx, MODALITY_DIAGNOSIS_CAP)

    def cell(mask: np.ndarray) -> dict[str, int]:
        vals, n = np.unique(keys[mask], return_counts=True)
        return {str(v): int(c) for v, c in zip(vals, n)}

    cells = {}
    for m, k in sorted(set(zip(types.tolist(), capped.tolist()))):
        mask = (types == m) & (capped == k)
        if mask.sum() >= MODALITY_CELL_MIN:
            cells[f"{m}|{k}"] = cell(mask)
    return {"names": list(names), "diagnosis_cap": MODALITY_DIAGNOSIS_CAP, "cells": cells,
            "by_type": {str(m): cell(types == m) for m in np.unique(types).tolist()},
            "pooled": cell(np.ones(len(types), dtype=bool))}


def _pair_counts(visits: list[list[str]], prefix: str, min_count: int) -> dict:
    """One modality's codes and their within-visit pairs seen together in at least ``min_count``
    visits: ``{"codes": [token, ...], "visits": [visits holding each code], "a": [...], "b": [...],
    "n": [...]}`` (pair ``k`` is ``codes[a[k]]``, ``codes[b[k]]``, ``a[k] < b[k]``, seen in
    ``n[k]`` visits; a token is ``prefix + code``)."""
    lengths = np.fromiter(map(len, visits), dtype=np.int64, count=len(visits))
    if lengths.sum() == 0:
        return {"codes": [], "visits": [], "a": [], "b": [], "n": []}
    vocab, code = np.unique(np.fromiter((c for v in visits for c in v), dtype=object, count=int(lengths.sum()))
                            .astype(str), return_inverse=True)
    row = np.repeat(np.arange(len(visits)), lengths)
    # One entry per (visit, code), sorted by visit then code: a visit's codes are then ascending.
    keys = np.unique(row * len(vocab) + code)
    row, code = keys // len(vocab), keys % len(vocab)
    per_visit = np.bincount(row, minlength=len(visits))
    starts = np.concatenate([[0], np.cumsum(per_visit)[:-1]])
    pairs = []
    for size in np.unique(per_visit[per_visit >= 2]):  # visits of one size at a time: no loop per visit
        ids = code[starts[per_visit == size][:, None] + np.arange(size)]
        a, b = np.triu_indices(size, 1)
        pairs.append(ids[:, a].ravel() * len(vocab) + ids[:, b].ravel())
    keys, n = np.unique(np.concatenate(pairs) if pairs else np.zeros(0, np.int64), return_counts=True)
    keys, n = keys[n >= min_count], n[n >= min_count]
    return {"codes": [prefix + c for c in vocab.tolist()], "visits": np.bincount(code, minlength=len(vocab)).tolist(),
            "a": (keys // len(vocab)).tolist(), "b": (keys % len(vocab)).tolist(), "n": n.tolist()}


def _type_counts(visits, visit_types, n_types, bands: np.ndarray, lengths: np.ndarray,
                 visit_index: np.ndarray, code_visits=None) -> dict:
    """The type tables of :meth:`CohortPrior.from_patients` (JSON-ready counts); the code counts
    come from ``code_visits`` (the visits with their other modalities' code tokens) when given."""
    if n_types is None or int(n_types) < 1:
        raise ValueError("CohortPrior.from_patients: visit_types needs n_types >= 1")
    types = [np.asarray(t, dtype=np.int64) for t in visit_types]
    if len(types) != len(visits) or any(len(t) != len(v) for t, v in zip(types, visits)):
        raise ValueError("CohortPrior.from_patients: visit_types must give one type per visit of every patient")
    flat = np.concatenate(types) if types else np.zeros(0, np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= n_types):
        raise ValueError(f"CohortPrior.from_patients: visit types must be in [0, {n_types})")
    code_counts: dict[str, dict[str, int]] = {}
    for codes_of_patient, types_of_patient in zip(visits if code_visits is None else code_visits, types):
        for visit, m in zip(codes_of_patient, types_of_patient.tolist()):
            cell = code_counts.setdefault(str(m), {})
            for code in set(visit):
                cell[code] = cell.get(code, 0) + 1
    first = np.array([t[0] for t in types], dtype=np.int64)
    count = np.minimum([len(t) for t in types], VISIT_COUNT_CAP)
    prev = np.concatenate([t[:-1] for t in types]) if types else np.zeros(0, np.int64)
    nxt = np.concatenate([t[1:] for t in types]) if types else np.zeros(0, np.int64)
    return {
        "n_types": int(n_types),
        "first": {str(b): _counts(first[bands == b]) for b in np.unique(bands)},
        "first_by_visits": {str(b): {str(k): _counts(first[(bands == b) & (count == k)])
                                     for k in np.unique(count[bands == b])} for b in np.unique(bands)},
        "transition": {str(m): _counts(nxt[prev == m]) for m in np.unique(prev)},
        "codes_per_visit": {str(m): _counts(lengths[flat == m]) for m in np.unique(flat)},
        "codes_per_visit_by_index": {str(m): {str(i): _counts(lengths[(flat == m) & (visit_index == i)])
                                              for i in np.unique(visit_index[flat == m])} for m in np.unique(flat)},
        "code_counts": {m: dict(sorted(code_counts[m].items())) for m in sorted(code_counts, key=int)},
    }


def _recurrence_counts(visits, visit_types, type_table: dict, category) -> dict:
    """[O, E, N] per category and per code for :meth:`CohortPrior.recurrence_log_lift` (JSON-ready)."""
    n_types = int(type_table["n_types"])
    transition = np.zeros((n_types, n_types))
    for m, cell in type_table["transition"].items():
        for k, c in cell.items():
            transition[int(m), int(k)] = c
    transition /= np.maximum(transition.sum(1, keepdims=True), 1)
    types = [np.asarray(t).tolist() for t in visit_types]
    visit_cats = [[{category(c) for c in visit} for visit in codes_of_patient] for codes_of_patient in visits]
    n_of_type = np.zeros(n_types)
    cat_visits: dict[str, np.ndarray] = {}  # category -> [n_types] visits of each type holding it
    for cats_of_patient, types_of_patient in zip(visit_cats, types):
        for visit_categories, m in zip(cats_of_patient, types_of_patient):
            n_of_type[m] += 1
            for k in visit_categories:
                cat_visits.setdefault(k, np.zeros(n_types))[m] += 1
    cat_share = {k: v / np.maximum(n_of_type, 1) for k, v in cat_visits.items()}
    code_counts = type_table["code_counts"]
    cat_total: dict[tuple[str, str], int] = {}  # (type, category) -> visits-codes of the category
    for m, cell in code_counts.items():
        for c, n in cell.items():
            key = (m, category(c))
            cat_total[key] = cat_total.get(key, 0) + n
    cats: dict[str, list[float]] = {}
    codes: dict[str, list[float]] = {}
    for codes_of_patient, cats_of_patient, types_of_patient in zip(visits, visit_cats, types):
        for t in range(1, len(codes_of_patient)):
            before, after = set(codes_of_patient[t - 1]), set(codes_of_patient[t])
            m_prev, m = types_of_patient[t - 1], str(types_of_patient[t])
            cats_after = cats_of_patient[t]
            for k in cats_of_patient[t - 1]:
                cell = cats.setdefault(k, [0.0, 0.0, 0])
                cell[0] += k in cats_after
                cell[1] += float(transition[m_prev] @ cat_share[k])
                cell[2] += 1
            for c in before:
                k = category(c)
                if k in cats_after:
                    cell = codes.setdefault(c, [0.0, 0.0, 0])
                    cell[0] += c in after
                    cell[1] += code_counts.get(m, {}).get(c, 0) / max(cat_total.get((m, k), 0), 1)
                    cell[2] += 1
    def as_json(cells: dict[str, list[float]]) -> dict[str, list]:
        return {k: [int(o), round(e, 4), n] for k, (o, e, n) in sorted(cells.items())}

    return {"categories": as_json(cats), "codes": as_json(codes)}


def _band(ages: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, ages, side="right") - 1, 0, len(edges) - 1)


def _band_labels(edges: np.ndarray) -> list[str]:
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"{edges[-1]:g}+"]


def columns(patients) -> tuple[np.ndarray, list[str], list[list[list[str]]]]:
    """(ages [n], sexes, visits) of patient dicts or a datasets.Dataset in the patient schema."""
    if hasattr(patients, "column_names"):
        return np.asarray(patients["age"], dtype=np.float64), list(patients["sex"]), list(patients["visits"])
    patients = list(patients)
    return (
        np.array([float(p["age"]) for p in patients], dtype=np.float64),
        [p["sex"] for p in patients],
        [p["visits"] for p in patients],
    )


