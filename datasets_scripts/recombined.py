"""A cohort with real co-occurrence: synthetic patients recombined from the admissions of real ones.

``recombine(patients, n_patients, seed)`` draws ``n_patients`` patients from a (small) real
cohort, such as the 100-patient MIMIC-III demo, so that the model benchmarks can train on a
cohort of useful size whose code pairs, consecutive-visit pairs and demographics come from real
records, while no patient is a copy of a real one. One synthetic patient is drawn as follows.

1. **Template.** A real patient drawn uniformly (with replacement) among the *usable* ones: every
   admission holds at least one valid ICD-9-CM code that the CMS age/sex edits allow for the
   patient's own age and sex.
2. **Demographics.** The template's sex; its age moved by Uniform(-``age_jitter``,
   +``age_jitter``) years, rounded to 0.01 and kept in [1, 90] (ages under one year are kept as
   they are, neonatal codes depend on them). When the moved age would make one of the template's
   own codes break a CMS edit it did not break before, the template's age is kept instead.
3. **Visits.** One per admission of the template, in the same order (so consecutive visits are
   consecutive real admissions of one patient). From the real admission's valid codes that the
   patient's demographics allow:
   - each code is kept with probability ``p_keep``, in the admission's order; an admission of two
     or more codes always loses at least one (drawn uniformly among those kept, the first code
     excepted) and keeps at least its first;
   - the visit is topped up to the admission's size with co-occurrence neighbours of the kept
     codes: code ``j`` weighs ``sum over kept k of C[k, j]``, ``C`` counting the real admissions
     that hold both codes, less the source admission itself; codes already in the visit, codes of
     the source admission and codes the patient's age/sex forbid are not drawn. Draws are without
     replacement (Efraimidis-Spirakis keys), appended in draw order; a visit whose kept codes have
     too few neighbours stays shorter.

Every code is therefore valid ICD-9-CM, at most once per visit, and allowed for the patient by
the CMS edits (``icd9.violations``). All draws are vectorised over the whole cohort (numpy and
scipy.sparse); ``recombine`` is deterministic for a seed. subject_ids are 1..n_patients.

``build_recombined_cohort(demo_dir, n, seed)`` reads a MIMIC-III folder with
``mimic3.read_mimic3`` and recombines it; ``write_recombined_cohort`` also writes the result as a
MIMIC-III folder (``cohort_io.write_mimic3_csvs``), for anything that reads one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from promptehr_hf.datasets_scripts import icd9
from promptehr_hf.datasets_scripts.cohort_io import write_mimic3_csvs
from promptehr_hf.datasets_scripts.mimic3 import read_mimic3
from promptehr_hf.datasets_scripts.schema import AGE_CAP, SEXES

DEFAULT_PATIENTS = 12_000
P_KEEP = 0.8
AGE_JITTER = 2.0


def _forbidden(vocab: Sequence[str]) -> np.ndarray:
    """bool [91 * 2, K]: row ``2 * whole_years + sex`` (F = 0, M = 1) marks the codes a CMS
    edit forbids at that age and sex (ages 90 and over share row 90)."""
    K = len(vocab)
    rows = []
    for years in range(int(AGE_CAP) + 1):
        for sex in SEXES:
            rows.append(icd9.violations(vocab, float(years), sex) != "" if K else np.zeros(0, bool))
    return np.array(rows, dtype=bool).reshape(len(rows), K)


def _age_class(age: np.ndarray, sex: np.ndarray) -> np.ndarray:
    years = np.clip(np.floor(age), 0, AGE_CAP).astype(np.int64)
    return 2 * years + sex


def recombine(patients: Sequence[dict], n_patients: int = DEFAULT_PATIENTS, seed: int = 0, *,
              p_keep: float = P_KEEP, age_jitter: float = AGE_JITTER) -> list[dict]:
    """``n_patients`` recombined patients (schema: subject_id, age, sex, visits) from real
    ``patients`` (the same schema), as the module docstring describes. Deterministic for a seed.

    Raises ValueError for a negative ``n_patients``, ``p_keep`` outside [0, 1], a negative
    ``age_jitter``, or a real cohort without a usable patient.
    """
    if n_patients < 0:
        raise ValueError(f"n_patients must be >= 0, got {n_patients}")
    if not 0.0 <= p_keep <= 1.0:
        raise ValueError(f"p_keep must be in [0, 1], got {p_keep}")
    if age_jitter < 0:
        raise ValueError(f"age_jitter must be >= 0, got {age_jitter}")
    if n_patients == 0:
        return []
    rng = np.random.default_rng(seed)

    # --- the real cohort as flat arrays: admission a holds codes flat[adm_ptr[a]:adm_ptr[a+1]]
    names = sorted({icd9.normalize(c) for p in patients for v in p["visits"] for c in v})
    vocab = [c for c in names if icd9.is_valid(c)]
    index = {c: i for i, c in enumerate(vocab)}
    K = len(vocab)
    adm_codes: list[list[int]] = []
    for p in patients:
        for v in p["visits"]:
            ids = [index.get(icd9.normalize(c), -1) for c in v]
            adm_codes.append(list(dict.fromkeys(i for i in ids if i >= 0)))  # valid, distinct, in order
    adm_len = np.fromiter(map(len, adm_codes), dtype=np.int64, count=len(adm_codes))
    adm_ptr = np.r_[0, np.cumsum(adm_len)].astype(np.int64)
    flat = np.fromiter((c for a in adm_codes for c in a), dtype=np.int64, count=int(adm_len.sum()))
    n_adm = np.fromiter((len(p["visits"]) for p in patients), dtype=np.int64, count=len(patients))
    pat_ptr = np.r_[0, np.cumsum(n_adm)].astype(np.int64)
    real_age = np.array([float(p["age"]) for p in patients], dtype=np.float64)
    real_sex = np.array([SEXES.index(p["sex"]) for p in patients], dtype=np.int64)
    forbidden = _forbidden(vocab)

    # Usable templates: every admission keeps at least one code allowed at the patient's own age.
    adm_patient = np.repeat(np.arange(len(patients)), n_adm)
    code_adm = np.repeat(np.arange(len(adm_len)), adm_len)
    own_class = _age_class(real_age, real_sex)
    allowed = ~forbidden[own_class[adm_patient[code_adm]], flat]
    adm_ok = np.bincount(code_adm, weights=allowed, minlength=len(adm_len)) > 0
    bad_patients = np.bincount(adm_patient, weights=~adm_ok, minlength=len(patients)) > 0
    usable = np.flatnonzero((n_adm > 0) & ~bad_patients)
    if usable.size == 0:
        raise ValueError("recombine: the real cohort has no patient whose every admission has a usable code")

    # Co-occurrence of the real admissions, diagonal included (it only ever meets kept codes).
    X = sp.csr_matrix((np.ones(len(flat), np.float64), (code_adm, flat)), shape=(len(adm_len), K))
    X.sum_duplicates()
    C = sp.csr_matrix(X.T @ X)

    # --- 1-2: templates and demographics
    tmpl = usable[rng.integers(usable.size, size=n_patients)]
    sex = real_sex[tmpl]
    age = real_age[tmpl]
    moved = np.round(np.clip(age + rng.uniform(-age_jitter, age_jitter, size=n_patients), 1.0, AGE_CAP), 2)
    moved = np.where(age < 1.0, age, moved)
    # Synthetic visits: one per template admission.
    n_vis = n_adm[tmpl]
    vis_ptr = np.r_[0, np.cumsum(n_vis)].astype(np.int64)
    V = int(vis_ptr[-1])
    vis_patient = np.repeat(np.arange(n_patients), n_vis)
    src = pat_ptr[tmpl][vis_patient] + (np.arange(V) - vis_ptr[vis_patient])  # source admission of each visit
    e_vis = np.repeat(np.arange(V), adm_len[src])  # one entry per source code of each visit
    e_pos = np.arange(len(e_vis)) - np.repeat(np.r_[0, np.cumsum(adm_len[src])[:-1]], adm_len[src])
    e_code = flat[adm_ptr[src][e_vis] + e_pos]
    e_patient = vis_patient[e_vis]
    # Keep the template's age where the moved one would forbid one of its codes.
    old_class = _age_class(age, sex)
    new_class = _age_class(moved, sex)
    newly = forbidden[new_class[e_patient], e_code] & ~forbidden[old_class[e_patient], e_code]
    revert = np.bincount(e_patient, weights=newly, minlength=n_patients) > 0
    age = np.where(revert, age, moved)
    cls = _age_class(age, sex)
    ok = ~forbidden[cls[e_patient], e_code]
    src_keys = np.unique(e_vis * K + e_code)  # every code of each visit's source admission
    e_vis, e_pos, e_code = e_vis[ok], e_pos[ok], e_code[ok]

    # --- 3a: keep each code with p_keep; the first code always; at least one dropped when 2+
    n_src = np.bincount(e_vis, minlength=V)  # allowed source codes per visit (>= 1, usable templates)
    first = np.r_[0, np.cumsum(n_src)[:-1]]
    keep = rng.random(len(e_vis)) < p_keep
    keep[first] = True
    n_kept = np.bincount(e_vis, weights=keep, minlength=V).astype(np.int64)
    full = np.flatnonzero((n_kept == n_src) & (n_src >= 2))
    drop = first[full] + 1 + (rng.random(full.size) * (n_src[full] - 1)).astype(np.int64)
    keep[drop] = False
    n_kept = np.bincount(e_vis, weights=keep, minlength=V).astype(np.int64)
    k_vis, k_code = e_vis[keep], e_code[keep]

    # --- 3b: top up from co-occurrence neighbours of the kept codes, less the source admission
    need = adm_len[src] - n_kept
    Kmat = sp.csr_matrix((np.ones(len(k_vis)), (k_vis, k_code)), shape=(V, K))
    W = sp.csr_matrix(Kmat @ C - sp.diags(n_kept.astype(np.float64)) @ X[src])
    W.eliminate_zeros()
    W = W.tocoo()
    c_vis, c_code, c_w = W.row.astype(np.int64), W.col.astype(np.int64), W.data
    # Exclude the source admission's codes (kept, dropped, or forbidden) and forbidden codes.
    good = (c_w > 0) & ~np.isin(c_vis * K + c_code, src_keys) & ~forbidden[cls[vis_patient[c_vis]], c_code]
    c_vis, c_code, c_w = c_vis[good], c_code[good], c_w[good]
    # Efraimidis-Spirakis: u ** (1 / w) in (0, 1), larger drawn first; one float sort orders
    # the candidates by visit, then by key (the fraction never reaches the next visit's integer).
    key = np.exp(np.log(rng.random(len(c_w))) / c_w)
    order = np.argsort(c_vis + (1.0 - key) * 0.5, kind="stable")
    c_vis, c_code = c_vis[order], c_code[order]
    rank = np.arange(len(c_vis)) - np.searchsorted(c_vis, c_vis, side="left")
    take = rank < need[c_vis]
    t_vis, t_code = c_vis[take], c_code[take]

    # --- assemble: kept codes in admission order, then the top-up in draw order
    all_vis = np.r_[k_vis, t_vis]
    all_code = np.r_[k_code, t_code]
    all_rank = np.r_[e_pos[keep], 1_000_000 + rank[take]]
    order = np.lexsort((all_rank, all_vis))
    codes = np.asarray(vocab, dtype=object)[all_code[order]].tolist()
    bounds = np.searchsorted(all_vis[order], np.arange(V + 1)).tolist()
    visits = [codes[bounds[v]:bounds[v + 1]] for v in range(V)]
    vp = vis_ptr.tolist()
    return [{"subject_id": i + 1, "age": float(age[i]), "sex": SEXES[int(sex[i])], "visits": visits[vp[i]:vp[i + 1]]}
            for i in range(n_patients)]


def build_recombined_cohort(demo_dir: str | os.PathLike, n: int = DEFAULT_PATIENTS, seed: int = 0,
                            **kwargs) -> list[dict]:
    """Read the MIMIC-III folder ``demo_dir`` (``read_mimic3``) and ``recombine`` ``n`` patients
    from it with ``seed`` (keyword arguments go to ``recombine``)."""
    patients, _ = read_mimic3(demo_dir)
    return recombine(patients, n, seed, **kwargs)


def write_recombined_cohort(demo_dir: str | os.PathLike, out_dir: str | os.PathLike, n: int = DEFAULT_PATIENTS,
                            seed: int = 0) -> dict[str, Path]:
    """``build_recombined_cohort(demo_dir, n, seed)`` written as a MIMIC-III folder in ``out_dir``
    (``write_mimic3_csvs``, dates drawn with ``seed``); returns the table paths."""
    return write_mimic3_csvs(build_recombined_cohort(demo_dir, n, seed), out_dir, seed=seed)
