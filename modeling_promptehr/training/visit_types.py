"""Visit types: a mixture of multivariate Bernoullis over the code sets of the training visits.

A visit's codes are far from independent: a sepsis admission lists septicemia, severe sepsis,
shock and acute kidney failure together, a newborn admission its own codes. A sequence model
trained for minutes learns such higher-order structure slowly, and its visits drift toward
independent codes. A mixture of ``n_types`` Bernoulli components, fitted by EM on the training
visits, captures it in seconds: component m holds P(code c in the visit | type m) for every code,
and each visit gets its most likely type (MAP). The model is then conditioned on the type of the
visit it writes (a categorical prompt beside sex, and a per-type bias on its logits that starts
from the mixture's log-probabilities, :func:`type_logit_bias`), and generation draws each visit's
type first, from the training distribution of types given the age band (first visit) or the
previous type.

Privacy: a component is an average over its visits; components that end with fewer than
``min_visits`` visits are removed while fitting (their visits go to the others), so no type
describes a handful of patients.

Everything is vectorised: the E step is one sparse [visits x codes] by dense [codes x types]
product, the M step one sparse transpose product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

DEFAULT_TYPES = 256  # the most types auto_types gives
MIN_AUTO_TYPES = 32
VISITS_PER_TYPE = 100  # auto_types: about this many training visits per type
DEFAULT_MIN_VISITS = 20
DEFAULT_ITERATIONS = 40
THETA_FLOOR = 1e-4  # P(code | type) is kept in [floor, 1 - floor]: no log(0)


@dataclass
class VisitTypes:
    """A fitted mixture: ``codes`` [K] (the columns), ``theta`` [M, K] P(code | type), ``weights`` [M]."""

    codes: list[str]
    theta: np.ndarray
    weights: np.ndarray

    @property
    def n_types(self) -> int:
        return len(self.weights)

    def _matrix(self, visits: Sequence[Sequence[str]]) -> sp.csr_matrix:
        return visit_matrix(visits, {c: i for i, c in enumerate(self.codes)})

    def log_posterior(self, X: sp.csr_matrix) -> np.ndarray:
        """[n, M] unnormalised log P(type, visit) of the rows of the visit matrix ``X``."""
        log_p, log_q = np.log(self.theta), np.log1p(-self.theta)
        return np.asarray(X @ (log_p - log_q).T) + log_q.sum(1) + np.log(self.weights)

    def assign(self, visits: Sequence[Sequence[str]]) -> np.ndarray:
        """The most likely type of each visit ([n] int); codes the mixture never saw are ignored."""
        if len(visits) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.log_posterior(self._matrix(visits)).argmax(1).astype(np.int64)

    def assign_patients(self, patients_visits: Sequence[Sequence[Sequence[str]]]) -> list[list[int]]:
        """Types of every visit of every patient (visits as lists of codes), per patient."""
        flat = [v for visits in patients_visits for v in visits]
        types = self.assign(flat).tolist()
        out, k = [], 0
        for visits in patients_visits:
            out.append(types[k: k + len(visits)])
            k += len(visits)
        return out


def type_logit_bias(mixture: VisitTypes, tokenizer, vocab_size: int | None = None) -> np.ndarray:
    """[M, V] float32 starting values of the model's per-type logit bias, from the mixture.

    A category token gets log P(some code of the category is in the visit | type) (the visit's
    next category is drawn among those present), a code token log P(code | its category, type)
    (what the code step chooses); codes the mixture never saw (catch-alls) get the floor, and
    every other token (``</v>``, specials) 0.
    """
    V = int(vocab_size or len(tokenizer))
    log_floor = np.log(THETA_FLOOR)
    bias = np.zeros((mixture.n_types, V), dtype=np.float64)
    col = {c: j for j, c in enumerate(mixture.codes)}
    for cat_id, kids in tokenizer.category_children.items():
        tokens = tokenizer.convert_ids_to_tokens(kids)
        cols = [col.get(t) for t in tokens]
        known = [j for j in cols if j is not None]
        theta = mixture.theta[:, known] if known else np.zeros((mixture.n_types, 0))
        present = 1.0 - np.exp(np.log1p(-theta).sum(1))
        bias[:, cat_id] = np.log(np.clip(present, THETA_FLOOR, 1.0))
        total = theta.sum(1)
        for kid, j in zip(kids, cols):
            bias[:, kid] = log_floor if j is None else np.log(mixture.theta[:, j] / total)
    return bias.astype(np.float32)


def visit_matrix(visits: Sequence[Sequence[str]], index: dict[str, int]) -> sp.csr_matrix:
    """[n, K] binary CSR matrix: visit i holds code index[c] (codes outside ``index`` are skipped)."""
    rows, cols = [], []
    for r, visit in enumerate(visits):
        for c in visit:
            j = index.get(c)
            if j is not None:
                rows.append(r)
                cols.append(j)
    X = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(visits), len(index)))
    X.sum_duplicates()
    X.data[:] = 1.0  # a code listed twice in a visit counts once
    return X


def auto_types(n_visits: int) -> int:
    """The number of visit types for a cohort of ``n_visits`` training visits: the power of two
    nearest to n_visits / 100, within [32, 256]. Types are averages over their visits: on a small
    cohort, many types would each hold few visits, and the model conditioned on them overfits
    them as it trains longer."""
    nearest = 2 ** int(np.round(np.log2(max(n_visits, 1) / VISITS_PER_TYPE)))
    return int(min(max(nearest, MIN_AUTO_TYPES), DEFAULT_TYPES))


def fit_visit_types(visits: Sequence[Sequence[str]], n_types: int = DEFAULT_TYPES, *,
                    min_visits: int = DEFAULT_MIN_VISITS, iterations: int = DEFAULT_ITERATIONS, seed: int = 0,
                    progress: bool = True) -> VisitTypes:
    """Fit a mixture of ``n_types`` multivariate Bernoullis to the code sets of ``visits`` by EM.

    Components start from ``n_types`` training visits drawn without replacement with ``seed``
    (P(code | type) halfway between the visit's 0/1 and the code's training frequency); after
    every M step, components holding fewer than ``min_visits`` visits (posterior mass) are
    removed. Deterministic for a seed.

    Raises ValueError when there are no codes or ``n_types < 1``.
    """
    if n_types < 1:
        raise ValueError(f"n_types must be >= 1, got {n_types}")
    codes = sorted({c for v in visits for c in v})
    if not codes:
        raise ValueError("fit_visit_types: the visits hold no code")
    X = visit_matrix(visits, {c: i for i, c in enumerate(codes)})
    n = X.shape[0]
    freq = np.clip(np.asarray(X.mean(0)).ravel(), THETA_FLOOR, 1 - THETA_FLOOR)
    rng = np.random.default_rng(seed)
    start = rng.choice(n, size=min(n_types, n), replace=False)
    theta = np.clip(0.5 * X[start].toarray() + 0.5 * freq, THETA_FLOOR, 1 - THETA_FLOOR)
    model = VisitTypes(codes, theta, np.full(len(start), 1.0 / len(start)))
    Xt = X.T.tocsr()
    for _ in tqdm(range(iterations), desc="visit types (EM)", disable=not progress):
        log_joint = model.log_posterior(X)
        log_joint -= log_joint.max(1, keepdims=True)
        resp = np.exp(log_joint)
        resp /= resp.sum(1, keepdims=True)
        mass = resp.sum(0)
        keep = mass >= min(min_visits, mass.max())
        resp, mass = resp[:, keep], mass[keep]
        theta = np.asarray(Xt @ resp).T / mass[:, None]
        model = VisitTypes(codes, np.clip(theta, THETA_FLOOR, 1 - THETA_FLOOR), mass / mass.sum())
    return model


__all__ = ["DEFAULT_MIN_VISITS", "DEFAULT_TYPES", "VisitTypes", "auto_types", "fit_visit_types", "type_logit_bias",
           "visit_matrix"]
