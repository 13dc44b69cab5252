"""Sparse incidence matrices of patient cohorts (shared by the metrics and the trainer).

A *cohort* is any of: a sequence of patient dicts in the package schema, a table with those
columns (a ``datasets.Dataset``, a dict of columns, a ``pyarrow.Table``, a pandas DataFrame), or
(for the visit helpers) a plain sequence of per-patient visit lists ``list[list[list[str]]]``.
Only the ``visits`` field is read here, its codes normalised to the dotless form of their code
system (``normalize`` of ``code_systems.code_system(code_system)``, in ``cohort_visits``; ICD-9-CM
unless a helper is told ``code_system="icd10cm"``) so that ``"401.9"`` and ``"4019"`` (or
``"E11.9"`` and ``"E119"``) are one code.

Matrices are ``scipy.sparse.csr_matrix`` of dtype int32 holding 0/1: a code listed twice in one
visit is one entry. With 0/1 entries the usual counts are matrix products:

- ``X.T @ X`` (``cooccurrence``): ``C[i, j]`` = visits holding both codes ``i`` and ``j``
  (diagonal: visits holding code ``i``);
- ``transitions(X, offsets)``: ``T[i, j]`` = consecutive visit pairs (t, t+1) of one patient with
  code ``i`` in visit t and code ``j`` in visit t+1;
- ``collapse(X, group_columns(vocab, category)[0])``: the same incidence at category level, e.g.
  ``collapse(X, M).T @ collapse(X, M)`` = category co-occurrence counts;
- ``hamming_blocks`` / ``nearest_hamming``: Hamming distances between 0/1 rows as
  ``|a| + |b| - 2 a.b``, in row blocks so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import chain, repeat
from typing import Any

import numpy as np
import scipy.sparse as sp

from promptehr_hf.datasets_scripts import code_systems
from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM

# Dense distance blocks hold at most this many entries (64 MB per float32 or int32 array).
_BLOCK_ENTRIES = 16_000_000


def cohort_column(cohort: Any, name: str) -> list:
    """One field of every patient, as a list, from a sequence of patient dicts or a table with
    that column: a dict of columns, a ``datasets.Dataset``, a ``pyarrow.Table`` or a DataFrame
    (an empty sequence gives an empty list for any column)."""
    if isinstance(cohort, dict) or hasattr(cohort, "column_names") or hasattr(cohort, "columns"):
        names = cohort.column_names if hasattr(cohort, "column_names") else list(cohort.keys())
        if name not in names:
            raise KeyError(f"cohort has no column {name!r}")
        values = cohort[name]
        for to_list in ("to_pylist", "tolist"):  # pyarrow, then numpy / pandas
            if hasattr(values, to_list):
                return getattr(values, to_list)()
        return list(values[:])
    if not len(cohort):  # no patient: every column is empty
        return []
    if isinstance(cohort[0], dict):
        return [p[name] for p in cohort]
    if name == "visits":  # a plain list of per-patient visit lists
        return list(cohort)
    raise TypeError(f"cannot read column {name!r} from a {type(cohort).__name__}")


def cohort_visits(cohort: Any, *, code_system: str = DEFAULT_CODE_SYSTEM) -> list[list[list[str]]]:
    """The visits of every patient, checked to be lists of visits of string codes (a bare string
    or a non-string code is a TypeError), with every code in the canonical dotless form of
    ``code_system`` (``"icd9cm"``: ``"401.9"`` -> ``"4019"``; ``"icd10cm"``: ``"E11.9"`` ->
    ``"E119"``): the one code identity of every count here. The input lists are returned as they
    are when every code is already canonical. ``code_system=None``: the codes are taken as they are
    (a tokenizer's code tokens, e.g. multimodal visits with ``PX:`` / ``RX:`` tokens)."""
    normalize = (lambda c: c) if code_system is None else code_systems.code_system(code_system).normalize
    visits = cohort_column(cohort, "visits")
    for row, patient in enumerate(visits):
        if isinstance(patient, str) or any(isinstance(v, str) for v in patient):
            raise TypeError(f"patient row {row}: visits must be a list of lists of codes, got {patient!r:.80}")
    codes = set(chain.from_iterable(chain.from_iterable(visits)))
    bad = [c for c in codes if not isinstance(c, str)]
    if bad:
        raise TypeError(f"codes must be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
    canonical = {c: normalize(c) for c in codes}
    if all(k == v for k, v in canonical.items()):
        return visits
    return [[[canonical[c] for c in visit] for visit in patient] for patient in visits]


def visit_offsets(visits: Sequence[Sequence]) -> np.ndarray:
    """int64 [n_patients + 1]: the visit rows of patient ``p`` are ``offsets[p]:offsets[p + 1]``."""
    counts = np.fromiter(map(len, visits), dtype=np.int64, count=len(visits))
    return np.concatenate([[0], np.cumsum(counts)])


def build_vocab(*cohorts: Any, code_system: str = DEFAULT_CODE_SYSTEM) -> list[str]:
    """Sorted distinct codes (normalised, ``cohort_visits``) of the given cohorts."""
    codes = set()
    for cohort in cohorts:
        codes.update(chain.from_iterable(chain.from_iterable(cohort_visits(cohort, code_system=code_system))))
    return sorted(codes)


def visit_matrix(cohort: Any, vocab: Sequence[str] | None = None, *, unknown: str = "error",
                 code_system: str = DEFAULT_CODE_SYSTEM):
    """Visit-by-code incidence.

    Returns ``(X, vocab)``: ``X`` csr int32 [n_visits, len(vocab)], rows = visits in patient order
    (see ``visit_offsets``), ``X[v, j] = 1`` iff visit ``v`` lists ``vocab[j]``. ``vocab`` defaults
    to the cohort's sorted codes. ``unknown``: "error" (KeyError naming the patient row and code)
    or "ignore" (drop codes outside ``vocab``). ``code_system``: the codes' system (``cohort_visits``).
    """
    visits = cohort_visits(cohort, code_system=code_system)
    flat = list(chain.from_iterable(visits))  # every visit, patient after patient
    if vocab is None:
        vocab = build_vocab(visits, code_system=code_system)
    index = {c: i for i, c in enumerate(vocab)}
    codes = list(chain.from_iterable(flat))
    cols = np.array(list(map(index.get, codes, repeat(-1))), dtype=np.int64)
    lengths = np.fromiter(map(len, flat), dtype=np.int64, count=len(flat))
    rows = np.repeat(np.arange(len(flat)), lengths)
    missing = cols < 0
    if missing.any():
        if unknown == "error":
            at = int(np.flatnonzero(missing)[0])
            visit = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
            patient = int(np.searchsorted(visit_offsets(visits), visit, side="right") - 1)
            raise KeyError(f"patient row {patient}: code {codes[at]!r} is not in the vocabulary")
        rows, cols = rows[~missing], cols[~missing]
    X = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, cols)), shape=(len(flat), len(vocab)))
    X.data[:] = 1  # duplicates were summed by the constructor
    return X, list(vocab)


def patient_matrix(cohort: Any, vocab: Sequence[str] | None = None, *, unknown: str = "error",
                   code_system: str = DEFAULT_CODE_SYSTEM):
    """Patient-by-code incidence: ``(P, vocab)``, ``P`` csr int32 [n_patients, len(vocab)],
    ``P[p, j] = 1`` iff any visit of patient ``p`` lists ``vocab[j]``."""
    visits = cohort_visits(cohort, code_system=code_system)
    X, vocab = visit_matrix(visits, vocab, unknown=unknown, code_system=code_system)
    return collapse(patient_rows(visit_offsets(visits)), X), vocab


def patient_rows(offsets: np.ndarray) -> sp.csr_matrix:
    """Patient-by-visit membership, csr int32 [n_patients, n_visits]: ``patient_rows(o) @ X`` sums
    the visit rows of each patient."""
    n_patients, n_visits = len(offsets) - 1, int(offsets[-1])
    owner = np.repeat(np.arange(n_patients), np.diff(offsets))
    return sp.csr_matrix((np.ones(n_visits, np.int32), (owner, np.arange(n_visits))), shape=(n_patients, n_visits))


def group_columns(vocab: Sequence[str], key: Callable[[str], str]):
    """Code -> group map, e.g. ``key=icd9.category``: ``(M, groups)``, ``M`` csr int32
    [len(vocab), len(groups)] with ``M[i, g] = 1`` iff ``key(vocab[i]) == groups[g]``;
    ``groups`` sorted. ``key`` is called once per code of the vocabulary."""
    labels = [key(c) for c in vocab]
    groups = sorted(set(labels))
    index = {g: i for i, g in enumerate(groups)}
    cols = np.array([index[g] for g in labels], dtype=np.int64)
    M = sp.csr_matrix((np.ones(len(vocab), np.int32), (np.arange(len(vocab)), cols)), shape=(len(vocab), len(groups)))
    return M, groups


def collapse(X: sp.spmatrix, M: sp.spmatrix) -> sp.csr_matrix:
    """0/1 incidence over groups: row r has group g iff it has any code of g. [n_rows, n_groups]."""
    Y = sp.csr_matrix(X @ M)
    Y.data[:] = 1
    return Y


def cooccurrence(X: sp.spmatrix) -> sp.csr_matrix:
    """``X.T @ X`` (int64 to be safe on large cohorts): [n_codes, n_codes] visit counts of code
    pairs; the diagonal holds per-code visit counts."""
    X = sp.csr_matrix(X, dtype=np.int64)
    return sp.csr_matrix(X.T @ X)


def transitions(X: sp.spmatrix, offsets: np.ndarray) -> sp.csr_matrix:
    """Ordered consecutive-visit pair counts [n_codes, n_codes]: ``T[i, j]`` = number of
    (visit t, visit t+1) pairs of the same patient with code i in t and code j in t+1."""
    last = np.zeros(X.shape[0], dtype=bool)
    ends = offsets[1:][np.diff(offsets) > 0] - 1
    last[ends] = True
    prev = np.flatnonzero(~last)  # every visit that has a successor of the same patient
    X = sp.csr_matrix(X, dtype=np.int64)
    return sp.csr_matrix(X[prev].T @ X[prev + 1])


def hamming_blocks(A: sp.spmatrix, B: sp.spmatrix, block_rows: int | None = None,
                   dense_share: float = 2e-4) -> Iterator[tuple[slice, np.ndarray]]:
    """Hamming distances between the 0/1 rows of ``A`` [n_a, K] and ``B`` [n_b, K], by row block:
    yields ``(rows, D)`` with ``D`` int32 [len(rows), n_b] = ``|a| + |b| - 2 a.b``.

    ``a.b`` is split by column: columns held by more than ``dense_share`` of all (a, b) row pairs
    (at most 512) go through a dense float32 product (BLAS; exact for counts < 2**24), the rest
    through a sparse product whose output stays sparse. Frequent codes are what make ``A @ B.T``
    dense; the default threshold was the fastest on MIMIC-shaped cohorts."""
    A, B = sp.csr_matrix(A, dtype=np.float32), sp.csr_matrix(B, dtype=np.float32)
    na = np.asarray(A.sum(axis=1)).ravel().astype(np.int32)
    nb = np.asarray(B.sum(axis=1)).ravel().astype(np.int32)
    share = A.getnnz(axis=0).astype(np.float64) * B.getnnz(axis=0) / max(1, A.shape[0] * B.shape[0])
    dense = np.sort(np.argsort(-share, kind="stable")[: min(512, int((share > dense_share).sum()))])
    rare = np.setdiff1d(np.arange(A.shape[1]), dense)
    A_dense, A_rare = A[:, dense], A[:, rare]
    B_dense_T = B[:, dense].toarray().T.copy()  # [n_dense, n_b]
    B_rare_T = sp.csc_matrix(B[:, rare].T)
    step = block_rows or max(1, _BLOCK_ENTRIES // max(1, B.shape[0]))
    for start in range(0, A.shape[0], step):
        rows = slice(start, min(start + step, A.shape[0]))
        G = A_dense[rows].toarray() @ B_dense_T
        R = (A_rare[rows] @ B_rare_T).tocoo()
        G[R.row, R.col] += R.data  # entries of a sparse product are unique
        G *= -2
        G += na[rows, None]
        G += nb[None, :]
        yield rows, G.astype(np.int32)


def nearest_hamming(A: sp.spmatrix, B: sp.spmatrix, *, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest row of ``B`` for each row of ``A`` by Hamming distance: ``(dist, index)``, both
    int [n_a]; ties go to the lowest index. ``exclude_self``: ``A`` and ``B`` are the same rows,
    and row i may not match itself (leave-one-out; a duplicate row elsewhere still counts)."""
    dist = np.empty(A.shape[0], dtype=np.int64)
    index = np.empty(A.shape[0], dtype=np.int64)
    for rows, D in hamming_blocks(A, B):
        if exclude_self:
            r = np.arange(rows.start, rows.stop)
            D[r - rows.start, r] = np.iinfo(np.int32).max
        index[rows] = D.argmin(axis=1)
        dist[rows] = D[np.arange(D.shape[0]), index[rows]]
    return dist, index
