"""The built-in simulated cohort: a documented generative process over real ICD-9-CM codes.

Nobody can ship MIMIC-III, so the default cohort is simulated. It is calibrated to the public
MIMIC-III figures (46,520 patients, 56% male, ~17% neonates,
~1.27 admissions per patient, ~11.3 codes per admission, the top-20 codes; in-hospital mortality
~10% of admissions and a median stay of ~6.6 days; ~4.1 procedures per admission) and, being a
known process, it is also the ground truth fidelity is measured against. Admissions carry
diagnoses, procedures and medications.

Everything that defines the process is in the tables below (``PARAMS``, ``PHENOTYPES``,
``EXCLUDES``); the code only samples from them. One patient is drawn as follows.

1. **Demographics.** Neonate (age 0) with probability ``PARAMS.p_neonate``; otherwise an adult
   with age ``age_min + (age_max - age_min) * Beta(age_a, age_b)``, rounded to 0.01 year and
   capped at 90 (MIMIC-III shifts patients over 89). Sex is male with ``PARAMS.p_male``.
2. **Phenotypes** (latent clinical profiles, a mixture per patient). For every eligible phenotype
   (age window, sex) in table order, membership ~ Bernoulli(sigmoid(``logit`` +
   ``age_slope`` * (age - 65) / 10 + ``male`` * [sex = M] + the ``boosts`` of the earlier
   phenotypes the patient already has)). Strong boosts nest phenotypes (coronary disease, heart
   failure and CKD mostly arise in cardiometabolic patients), negative ones separate them
   (cardiac surgery and sepsis are different admissions, as CSRU and MICU are).
3. **Admissions.** 1 + Poisson(lambda) admissions, lambda = ``readmit_rate`` (adult or neonate)
   * exp(sum of the members' ``readmit``) * Gamma(``readmit_shape``)
   (over-dispersed: most patients have one admission, a few have many), at most ``max_visits``.
4. **Each admission, in order** (later admissions depend on earlier ones):
   - a phenotype is *active* with probability ``episode`` = (first, keep, new): at its first
     admission, after an admission where it was active, after one where it was not. Chronic
     phenotypes are active at every admission (1, 1, 1); acute ones (sepsis, trauma) come as
     episodes.
   - each ``Condition`` of an active phenotype is coded with ``p_first`` at the phenotype's first
     active admission, then with ``p_keep`` if it was coded at the previous active admission
     (chronic conditions persist) or ``p_new`` if not (incidence). A condition with ``requires``
     is coded only when that condition is coded in the same admission.
   - a condition writes one *variant* (one or more codes) drawn once per patient by weight among
     the variants the patient's age and sex allow; at each later admission a coded condition
     moves to its ``progress`` variant with probability ``p_progress`` (CKD stage 3 -> 4 -> 5 ->
     ESRD, diabetes -> diabetic nephropathy, metastases ...).
   - the long tail: each active phenotype adds *tail entries* from its ``tail`` categories (real
     billable v32 codes, no core code); an entry writes one code, or two codes of different
     categories. All the tail's structure is fixed by ``PARAMS.structure_seed`` and the
     phenotype names, not by the sampling seed:

     * *Category weight.* The categories of a phenotype's pool are ranked by a seeded
       permutation; the category of rank R weighs (R + ``zipf_q``)^-``zipf_s``: the far tail
       leaves whole categories unused, as in MIMIC.
     * *Codes inside a category belong to phenotypes.* The n codes of a category have one seeded
       order; the u phenotypes whose tails cover it (the background included) take consecutive
       blocks of b = clip(n // u, 1, ``tail_codes`` + 1) codes of that order, in an order of the
       phenotypes seeded per category (blocks wrap around when n < u). A phenotype writes the
       first min(b, ``tail_codes``) codes of its block alone, the one at place r weighing
       r^-``zipf_within``, together (1 - ``pair_share``) of the category's weight. So
       P(code | category) depends on the phenotype: two phenotypes sharing a category write
       different codes of it, wherever it has enough codes.
     * *Code pairs.* The remaining ``pair_share`` of the category's weight is one pair entry: the
       last code of the phenotype's block written together with a code of a partner category of
       the same pool (drawn by category weight among the pool's other categories), taken among
       that category's codes after all its blocks (among all its codes if it has none left).
       The pair ties two codes, not their categories: the other codes of both categories do not
       come with it. A pool of one category has no pair entry.

     An active phenotype draws Poisson(``tail_rate`` / m) entries by weight among those the
     patient's age and sex allow, m the mean number of codes of an entry so drawn, so
     ``tail_rate`` is the mean number of tail codes it adds. Each tail entry of the previous
     admission returns with ``PARAMS.tail_keep`` (a pair returns whole). An admission with no
     code gets one tail entry of the background phenotype (of the neonatal one for a newborn).
   - codes are de-duplicated, ``EXCLUDES`` applied (e.g. hypertensive CKD 40390 replaces 4019),
     ordered like MIMIC's ``seq_num`` by ``rank`` + N(0, ``PARAMS.order_noise``) (principal acute
     diagnosis first, chronic conditions, status V codes and external-cause E codes last), and
     cut at ``PARAMS.max_codes`` (MIMIC's maximum, 39) or, for the ``PARAMS.capped_share`` of
     patients coded under the old 9-diagnosis billing limit, at ``PARAMS.capped_codes`` (the real
     MIMIC-III demo has 20 of its 129 admissions at exactly 9 codes): such admissions lose their
     chronic comorbidities first.

5. **Times** (``simulate(..., times=True)``, the default; tables ``TIMES``, ``TIME_PARAMS``). Each
   admission gets a length of stay, each readmission a gap since the previous discharge, each
   patient possibly a death, from the phenotypes:

   - *Linear predictors of an admission.* At the first admission, the sum of the ``TIMES``
     effects (``death``, ``stay``) of the phenotypes active there plus the ``conditions``
     effects of the conditions that happened there (drawn, whether or not the code system can
     write them). At a later admission, the phenotypes' *expected* effects: each member
     phenotype's effect times its long-run probability of being active (the stationary
     probability of its ``episode`` chain), its conditions' effects times their long-run
     probability of being coded (requirements multiplied in). The later admissions' codes are
     drawn from a stream that differs between code systems after the first admission, so they
     cannot drive times that both code systems share.
   - *Stay* (days) = exp(log ``stay_median`` + predictor + ``stay_sigma`` * N(0, 1)), adult or
     neonate, at least ``stay_min``, rounded to 0.01 day.
   - *In-hospital death*, admission by admission in order: Bernoulli(sigmoid(``death_logit`` +
     ``death_age`` * (age - 65) / 10 for adults + predictor)); the first admission where it is
     drawn is the patient's last: the later admissions are dropped (their codes were drawn, so
     the kept ones are exactly those of ``times=False``), and ``hospital_death`` is True.
   - *Gap* before each readmission (days; 0 for the first admission) = exp(log ``gap_median``
     + the members' ``gap`` effects - ``gap_intensity`` * log(lambda / ``readmit_rate``) +
     ``gap_sigma`` * N(0, 1)), at most ``gap_max``: chronic phenotypes come back sooner, and
     so does a patient whose readmission rate (step 3, over-dispersion included) is high.
   - *Ages stay in their CMS class.* The codes were drawn for the age at the first admission; a
     patient whose later admissions (age + days before them / 365.25) would reach the next
     whole year where an age edit starts or ends (``AGE_EDIT_BOUNDARIES``: a newborn's first
     birthday, 18, and for women 56 and 65) has their gaps shrunk by one factor to stay under it
     (their earlier stays too, should those alone reach it).
   - *Death after discharge*, for a patient who did not die in hospital: Bernoulli(sigmoid(
     ``after_logit`` + ``after_age`` * (age - 65) / 10 + the members' ``after`` effects)), after
     ``death_days`` = exp(log ``after_median`` + the members' ``after_days`` + ``after_sigma`` *
     N(0, 1)) days (at least 0.01); else ``death_days`` is None.

   The times come from their own random stream (child 0 of the block's SeedSequence), so the
   codes' stream is untouched, and they depend on nothing the code system changes: an ICD-10-CM
   cohort has the ICD-9-CM cohort's times and admissions. ``benchmarks/simulator_calibration.py``
   compares them with MIMIC-III's published figures and the demo.

6. **Procedures and medications** (``simulate(..., modalities=...)``, by default all three;
   tables ``PROCEDURES``, ``MEDICATIONS``, ``PCS_CODES``, ``MODALITY_PARAMS``). Each admission
   gets a list of ICD-9-CM v32 procedure codes and one of ``"<DRUG NAME>//<FORMULARY CODE>"``
   medication codes (the ``medications`` module), from what was drawn for it above:

   - *Orders.* An ``Order`` (central line, mechanical ventilation, CABG, norepinephrine,
     furosemide, vitamin K for a newborn...) has causes: a base probability at any adult or
     neonatal admission, and a probability per phenotype active at the admission
     (``"sepsis"``) or condition coded there (``"sepsis.septic_shock"``). The admission gets it
     with P = 1 - exp(-``hazard_scale`` * s * sum of the present causes' -log(1 - p)) (each
     cause on its own, noisy-OR), s its care intensity ~ Gamma(``intensity_shape``) with mean 1,
     shared by both modalities (a sicker admission gets more of both). It then writes one of
     its variants (one or more codes: "3615 3612", a drug's formulary products) drawn by
     weight among those the patient's sex allows (CMS procedure sex edits: 640 circumcision for
     boys, 741 caesarean for women).
   - *Background procedures*: Poisson(``tail_rate`` * s) more per admission, drawn among all the
     billable v32 procedure codes outside ``PROCEDURES`` that the sex allows, by a seeded Zipf
     weight (the breadth of PROCEDURES_ICD). Medications have no background: their codes are
     the table's (179, where the demo prescribes 837).
   - Codes are de-duplicated and ordered by the order's ``rank`` + N(0, ``order_noise``)
     (principal operation first; for drugs, the order of first prescription).

   The tables are hand-written: their probabilities come from the MIMIC-III demo's aggregate
   shares of admissions (overall and given the diagnoses present) and clinical practice; the
   medication codes are the demo's vocabulary (newborns', absent from the adult demo, in its
   style). ``hazard_scale`` calibrates the codes per admission to MIMIC-III's table sizes
   (``benchmarks/simulator_calibration.py``). The draws come from streams of their own (children
   1, 2 and 3 of the block's SeedSequence: intensity, procedures, medications) after everything
   else, from what the admissions coded, so the diagnoses, demographics and times are exactly
   those of ``modalities=("diagnoses",)``, and each modality is the same with or without the
   other. In an ICD-10-CM cohort the procedures are written in ICD-10-PCS through
   ``PCS_CODES`` (the table's codes, mapped by hand and checked against the ICD-10-PCS titles;
   the ICD-9 adjunct codes 0040-0046, qualifiers in ICD-10-PCS, are left out); the background
   procedures are left out there too, as no ICD-9 -> ICD-10-PCS map ships offline.

Every code is a billable v32 leaf, and every record respects the CMS Medicare Code Editor age/sex
edits by construction: variants and tail entries are drawn only among those whose codes
``icd9.violations`` all allows for the patient's whole-year age and sex (one allowed set per
class of ages and sex, precomputed).

**ICD-10-CM** (``simulate(..., code_system="icd10cm")``). The same process, written in
ICD-10-CM: each ICD-9-CM code of the simulator's vocabulary is mapped once, when the tables are
compiled, to the first of its CMS GEM targets (``icd10.from_icd9``) that is a billable ICD-10-CM
FY2021 code, else to the unspecified billable code under its first target that has one (the GEMs
predate FY2021, which split some targets: 2724 -> E784 -> E7849, ``icd10.billable_form``), and
every draw writes that code. ICD-9-CM codes with no target of either kind are dropped from the
vocabulary (a variant or tail entry left without any code is never drawn;
:func:`vocabulary_summary` counts them); two codes mapped to one are one code of the visit. The
CMS guarantee above holds with ``icd10``'s edits, computed on the ICD-10-CM vocabulary (whose
maternity range, 9-64, is not ICD-9-CM's). So the cohort has the structure of the ICD-9-CM one,
not the coding habits of a real ICD-10-CM hospital.

Sampling is vectorised with numpy over blocks of ``PARAMS.block_size`` patients; block b uses
the random stream ``SeedSequence(seed).spawn`` child b, so ``simulate(n, seed)`` is deterministic
and a smaller cohort is the start of a larger one with the same seed.

CLI: ``promptehr simulate --patients N --seed S --out DIR`` writes MIMIC-III CSVs through
``promptehr_hf.datasets_scripts.cohort_io.write_mimic3_csvs`` (PROCEDURES_ICD.csv and
PRESCRIPTIONS.csv beside DIAGNOSES_ICD.csv; ``--modalities diagnoses`` leaves them out); with
``--code-system icd10cm``, the ICD-10-CM cohort as a MIMIC-IV folder (``write_mimic4_csvs``,
``hosp/*.csv.gz``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from promptehr_hf.datasets_scripts import code_systems, icd9, icd10, medications
from promptehr_hf.datasets_scripts.code_systems import CODE_SYSTEMS, DEFAULT_CODE_SYSTEM
from promptehr_hf.datasets_scripts.cohort_io import write_mimic3_csvs, write_mimic4_csvs
from promptehr_hf.datasets_scripts.procedures import FOR_DIAGNOSES, ICD9PROC, procedure_system
from promptehr_hf.datasets_scripts.schema import AGE_CAP, SEXES
from promptehr_hf.file_utils import check_output, replace_folder

# ======================================================================================
# Parameters: the one place that defines the process
# ======================================================================================


@dataclass(frozen=True)
class Condition:
    """One clinical condition of a phenotype, coded as one variant of real ICD-9-CM codes.

    variants: ``{"code [code ...]": weight}``; a variant is drawn once per patient (among those
        the CMS edits allow for the patient's age and sex) and written as all its codes.
    p_first / p_keep / p_new: P(coded at an admission where the phenotype is active) at the
        phenotype's first active admission / after being coded at the previous active one /
        after not being coded there.
    requires: name of a condition of the same phenotype that must be coded in the same admission.
    rank: position in the admission's code order (0 = principal acute diagnosis, 1 acute
        complication, 2 active secondary, 3 chronic comorbidity, 4 status V code, 5 E code).
    progress: ``{variant: next variant}`` taken with ``p_progress`` at each later coded admission.
    """

    name: str
    variants: Mapping[str, float]
    p_first: float
    p_keep: float
    p_new: float
    rank: float = 3.0
    requires: str | None = None
    progress: Mapping[str, str] = field(default_factory=dict)
    p_progress: float = 0.0


def chronic(name, variants, p, keep=0.9, new=0.08, rank=3.0, **kw) -> Condition:
    """A persistent condition: coded with p at first, then mostly kept."""
    return Condition(name, variants if isinstance(variants, Mapping) else {variants: 1.0}, p, keep, new, rank, **kw)


def acute(name, variants, p, rank=1.0, **kw) -> Condition:
    """An episodic condition: coded with p at every active admission, no memory."""
    return Condition(name, variants if isinstance(variants, Mapping) else {variants: 1.0}, p, p, p, rank, **kw)


@dataclass(frozen=True)
class Phenotype:
    """A latent clinical profile: who has it, when it is active, and the codes it writes.

    ages: eligible whole-year age window (inclusive); sex: "F", "M" or None (both).
    logit, age_slope (per decade from 65), male, boosts ({earlier phenotype: logit
        increment}): membership ~ Bernoulli(sigmoid(sum)).
    episode: (first, keep, new) probabilities of being active at an admission (see module doc).
    readmit: added to the log readmission rate of members.
    conditions: the core codes. tail: category ranges ("390-459", "V01-V91", "E800-E999") of the
        long tail; tail_rate: mean tail codes per active admission (a code pair counts two);
        tail_rank: their order rank.
    """

    name: str
    note: str
    ages: tuple[int, int]
    logit: float
    conditions: tuple[Condition, ...]
    tail: tuple[str, ...]
    tail_rate: float
    age_slope: float = 0.0
    male: float = 0.0
    boosts: Mapping[str, float] = field(default_factory=dict)
    sex: str | None = None
    episode: tuple[float, float, float] = (1.0, 1.0, 1.0)
    readmit: float = 0.0
    tail_rank: float = 2.5


@dataclass(frozen=True)
class CohortParams:
    """Global parameters of the simulated cohort (see the module docstring for their roles)."""

    p_neonate: float = 0.17  # MIMIC-III: ~7,870 of 46,520 patients admitted at age 0
    p_male: float = 0.56  # 26,121 M / 20,399 F
    age_min: float = 16.0  # adults: age_min + (age_max - age_min) * Beta(age_a, age_b), capped at 90
    age_max: float = 100.0
    age_a: float = 3.0
    age_b: float = 2.25
    readmit_rate: tuple[float, float] = (0.11, 0.02)  # (adult, neonate) base of lambda
    readmit_shape: float = 0.5  # Gamma shape of the over-dispersion (mean 1)
    max_visits: int = 40
    max_codes: int = 39  # MIMIC-III seq_num reaches 39
    capped_share: float = 0.2  # patients whose admissions keep only the first capped_codes codes
    capped_codes: int = 9
    tail_keep: float = 0.3
    zipf_s: float = 8.0  # tail weight of a category: (category rank + zipf_q)^-zipf_s
    zipf_q: float = 400.0
    tail_codes: int = 4  # at most this many codes of a tail category a phenotype writes alone,
    zipf_within: float = 1.5  # the one at place r weighing r^-zipf_within
    pair_share: float = 0.25  # share of a tail category's weight on its code-pair entry
    order_noise: float = 0.8
    structure_seed: int = 2015  # fixes the tail entries: part of the process, not of a sample
    block_size: int = 4096


PARAMS = CohortParams()

ADULT = (15, 124)
NEONATE = (0, 0)

# The phenotypes, in membership order (a phenotype's boosts name earlier ones).
PHENOTYPES: tuple[Phenotype, ...] = (
    Phenotype(
        "background", "Every adult: the broad long tail of rarer codes from all chapters (no core codes).",
        ADULT, logit=20.0, tail=("001-629", "680-759", "780-999", "V01-V91", "E930-E949"), tail_rate=2.2,
        tail_rank=3.0, conditions=(),
    ),
    Phenotype(
        "general", "Common comorbidities of hospitalised adults, more frequent with age.",
        ADULT, logit=1.5, age_slope=0.45, tail=("240-289", "710-739"), tail_rate=0.3,
        conditions=(
            chronic("gerd", "53081", 0.15),
            chronic("hypothyroidism", "2449", 0.12),
            chronic("anemia", {"2859": 0.8, "2809": 0.2}, 0.10, keep=0.6, new=0.1),
            chronic("depression", "311", 0.035),
            chronic("anxiety", "30000", 0.04),
            chronic("osteoarthritis", "71590", 0.03),
            chronic("osteoporosis", "73300", 0.04),
            chronic("bph", "60000", 0.07),
            chronic("gout", "2749", 0.03),
            chronic("tobacco_history", "V1582", 0.07, rank=4),
            chronic("dnr", "V4986", 0.04, keep=0.7, rank=4),
            chronic("long_term_meds", {"V5869": 0.45, "V5866": 0.3, "V5865": 0.15, "V5868": 0.1}, 0.12, rank=4),
            chronic("history", {"V1251": 0.2, "V1254": 0.2, "V1272": 0.15, "V1011": 0.1, "V1005": 0.1, "V4364": 0.1,
                                "V4365": 0.1, "V1588": 0.05}, 0.12, rank=4),
            chronic("neuropathy", "3569", 0.03),
            chronic("aortic_atherosclerosis", "4400", 0.03),
            chronic("rheumatoid_arthritis", "7140", 0.02),
            chronic("upper_gi", {"53550": 0.5, "5533": 0.5}, 0.04),
            acute("adverse_drug_effect", {"E9342": 0.3, "E9320": 0.2, "E9300": 0.15, "E8798": 0.2, "E8788": 0.15}, 0.08,
                  rank=5),
            acute("dehydration", "27651", 0.05, rank=2),
            acute("delirium", {"2930": 0.6, "29281": 0.2, "78097": 0.2}, 0.05, rank=2),
            acute("urinary_retention", "78820", 0.03, rank=2),
            acute("diarrhea", "78791", 0.03, rank=2),
            acute("cellulitis", {"6826": 0.6, "6827": 0.4}, 0.02, rank=1),
            acute("ileus", {"5601": 0.6, "5609": 0.4}, 0.02, rank=1),
            acute("tachycardia", "7850", 0.03, rank=2),
            acute("fever", "78060", 0.03, rank=2),
            acute("electrolytes", {"2761": 0.5, "2768": 0.35, "2752": 0.15}, 0.06, rank=2),
            acute("uti", {"5990": 0.8, "5990 04149": 0.2}, 0.07, rank=2),
            acute("thrombocytopenia", "2875", 0.04, rank=2),
            acute("hypotension", "4589", 0.025, rank=2),
            acute("pressure_ulcer", {"70703": 0.6, "70707": 0.4}, 0.02, rank=2),
        ),
    ),
    Phenotype(
        "cardiometabolic", "Hypertension, dyslipidaemia, type 2 diabetes, obesity: the metabolic core that the "
        "coronary, heart and renal phenotypes mostly arise from.",
        ADULT, logit=0.55, age_slope=0.55, male=0.25, readmit=0.15,
        tail=("240-279", "401-405", "440-448"), tail_rate=0.35,
        conditions=(
            chronic("hypertension", "4019", 0.97, keep=0.97, new=0.5),
            chronic("hyperlipidemia", {"2724": 0.58, "2720": 0.42}, 0.60, keep=0.9, new=0.15),
            chronic("diabetes", {"25000": 0.75, "25002": 0.06, "25001": 0.04, "25040 58381": 0.05, "25060 3572": 0.04,
                                 "25060 5363": 0.02, "25050 36201": 0.02, "25070 44381": 0.02},
                    0.45, keep=0.92, new=0.06, progress={"25000": "25040 58381"}, p_progress=0.04),
            chronic("insulin", "V5867", 0.30, rank=4, requires="diabetes"),
            chronic("obesity", {"27800": 0.6, "27801": 0.4}, 0.12),
            chronic("pvd", {"4439": 0.7, "44020": 0.3}, 0.05),
        ),
    ),
    Phenotype(
        "coronary", "Coronary artery disease: old infarction, bypass or stent status, angina.",
        ADULT, logit=-4.0, age_slope=0.5, male=0.6, boosts={"cardiometabolic": 3.0}, readmit=0.1,
        tail=("410-414",), tail_rate=0.25,
        conditions=(
            chronic("cad", "41401", 0.95, keep=0.95, new=0.5, rank=2.5),
            chronic("old_mi", "412", 0.25, requires="cad"),
            chronic("revascularised", {"V4581": 0.6, "V4582": 0.4}, 0.28, rank=4, requires="cad"),
            chronic("angina", {"4139": 0.6, "4148": 0.4}, 0.06),
        ),
    ),
    Phenotype(
        "heart", "Heart failure, atrial fibrillation and other arrhythmias, valve disease.",
        ADULT, logit=-3.55, age_slope=0.6, male=0.1, boosts={"cardiometabolic": 3.3}, readmit=0.35,
        tail=("390-398", "415-429"), tail_rate=0.45,
        conditions=(
            chronic("atrial_fibrillation", "42731", 0.80, keep=0.95, new=0.15),
            chronic("anticoagulation", "V5861", 0.55, rank=4, requires="atrial_fibrillation"),
            chronic("heart_failure", {"4280": 0.34, "4280 42832": 0.18, "4280 42833": 0.14, "4280 42822": 0.1,
                                      "4280 42823": 0.1, "4280 42843": 0.07, "4280 42830": 0.07},
                    0.80, keep=0.95, new=0.18, progress={"4280 42832": "4280 42833", "4280 42822": "4280 42823"},
                    p_progress=0.3),
            chronic("flutter", "42732", 0.06),
            chronic("valve", {"4240": 0.55, "4241": 0.45}, 0.14),
            chronic("pulmonary_hypertension", "4168", 0.10),
            chronic("cardiomyopathy", {"4254": 0.7, "42511": 0.3}, 0.07),
            chronic("pacemaker", {"V4501": 0.7, "V4502": 0.3}, 0.07, rank=4),
            acute("ventricular_tachycardia", "4271", 0.05),
            acute("cardiogenic_shock", "78551", 0.04, rank=0.5),
            acute("cardiorenal_aki", "5849", 0.10),
            acute("hyperkalemia", "2767", 0.03, rank=2),
            acute("hypotension", "4589", 0.04, rank=2),
            acute("anemia", "2859", 0.07, rank=2),
        ),
    ),
    Phenotype(
        "cardiac_surgery", "Coronary or valve surgery, acute coronary syndromes (the CSRU/CCU population).",
        (35, 124), logit=-4.0, age_slope=0.1, male=0.5, boosts={"cardiometabolic": 1.0, "coronary": 2.5, "heart": 0.4},
        episode=(0.92, 0.05, 0.04), tail=("410-414", "996-999", "E870-E879"), tail_rate=0.5,
        conditions=(
            acute("cad", "41401", 0.9, rank=0),
            acute("aortic_valve", "4241", 0.22, rank=0.5),
            acute("mitral_valve", "4240", 0.10, rank=1),
            acute("acute_mi", {"41071": 0.7, "41041": 0.15, "41011": 0.15}, 0.25, rank=0),
            acute("unstable_angina", "4111", 0.12, rank=0.5),
            acute("blood_loss_anemia", "2851", 0.33, rank=2),
            acute("postop_af", "42731", 0.30, rank=2),
            acute("cardiac_complication", "9971", 0.12, rank=1),
            acute("procedure_hemorrhage", "99811", 0.05, rank=1),
            acute("surgery_ecode", {"E8781": 0.6, "E8782": 0.4}, 0.14, rank=5),
            acute("atelectasis", "5180", 0.08, rank=2),
            acute("pleural_effusion", "5119", 0.10, rank=2),
            acute("heart_failure", "4280", 0.15, rank=2),
        ),
    ),
    Phenotype(
        "renal", "Chronic kidney disease with stage progression to ESRD and dialysis; acute kidney injury.",
        ADULT, logit=-3.0, age_slope=0.35, male=0.2, boosts={"cardiometabolic": 1.5, "heart": 0.5},
        readmit=0.5, tail=("580-599", "270-279"), tail_rate=0.35,
        conditions=(
            chronic("ckd", {"5859 40390": 0.28, "5853 40390": 0.24, "5854 40390": 0.12, "5855 40391": 0.05,
                            "5856 40391 V4511": 0.21, "5852 40390": 0.1},
                    0.75, keep=0.95, new=0.2, p_progress=0.2,
                    progress={"5852 40390": "5853 40390", "5853 40390": "5854 40390", "5854 40390": "5855 40391",
                              "5855 40391": "5856 40391 V4511"}),
            acute("aki", {"5849": 0.85, "5845": 0.15}, 0.30, rank=0.5),
            chronic("ckd_anemia", "28521", 0.30, requires="ckd"),
            chronic("hyperparathyroidism", "58881", 0.18, requires="ckd"),
            acute("hyperkalemia", "2767", 0.12, rank=2),
            acute("fluid_overload", "27669", 0.08, rank=2),
            acute("acidosis", "2762", 0.10, rank=2),
            acute("dialysis_complication", "99673", 0.04, rank=0.5),
            chronic("kidney_transplant", "V420", 0.05, rank=4),
        ),
    ),
    Phenotype(
        "respiratory", "COPD, asthma, pneumonia, hypoxaemic respiratory failure.",
        ADULT, logit=-0.95, age_slope=0.3, male=0.1, readmit=0.3,
        tail=("460-519",), tail_rate=0.45,
        conditions=(
            chronic("copd", {"496": 0.62, "49121": 0.22, "4928": 0.10, "49120": 0.06}, 0.53, keep=0.9, new=0.1),
            chronic("asthma", "49390", 0.10),
            chronic("sleep_apnea", "32723", 0.07),
            chronic("tobacco", {"3051": 0.6, "V1582": 0.4}, 0.08),
            chronic("home_oxygen", "V462", 0.05, rank=4),
            acute("pneumonia", "486", 0.12, rank=0),
            acute("bacterial_pneumonia", {"4821": 0.3, "48241": 0.25, "48242": 0.25, "4870": 0.2}, 0.06, rank=0),
            acute("respiratory_failure", {"51881": 0.8, "51884": 0.12, "51883": 0.08}, 0.20, rank=0.5),
            acute("aspiration", "5070", 0.12, rank=0.5),
            acute("pleural_effusion", "5119", 0.10, rank=2),
            acute("hypoxemia", "79902", 0.06, rank=2),
            acute("pulmonary_embolism", "41519", 0.03, rank=0),
            acute("pulmonary_edema", "5184", 0.03, rank=1),
        ),
    ),
    Phenotype(
        "liver_gi", "Cirrhosis and its complications, hepatitis C, GI bleeding, pancreatitis.",
        ADULT, logit=-1.9, age_slope=-0.1, male=0.35, readmit=0.45,
        tail=("520-579",), tail_rate=0.55,
        conditions=(
            chronic("cirrhosis", {"5715": 0.5, "5712": 0.45, "5716": 0.05}, 0.42, keep=0.95, new=0.08),
            chronic("portal_hypertension", "5723", 0.45, requires="cirrhosis"),
            acute("ascites", "78959", 0.40, rank=2, requires="cirrhosis"),
            acute("encephalopathy", "5722", 0.22, rank=1, requires="cirrhosis"),
            chronic("varices", {"4561": 0.5, "45621": 0.5}, 0.25, requires="cirrhosis"),
            acute("hepatorenal", "5724", 0.06, rank=1, requires="cirrhosis"),
            acute("sbp", "56723", 0.05, rank=0.5, requires="cirrhosis"),
            chronic("hepatitis_c", {"07054": 0.6, "07070": 0.4}, 0.22),
            acute("gi_bleed", {"5789": 0.45, "5781": 0.2, "5780": 0.15, "53140": 0.1, "53240": 0.1}, 0.32, rank=0),
            acute("blood_loss_anemia", "2851", 0.40, rank=2, requires="gi_bleed"),
            chronic("gerd", "53081", 0.20),
            acute("pancreatitis", {"5770": 0.75, "5771": 0.25}, 0.10, rank=0),
            acute("coagulopathy", {"2869": 0.6, "2875": 0.4}, 0.2, rank=2),
            acute("hyponatremia", "2761", 0.12, rank=2),
            acute("c_difficile", "00845", 0.05, rank=1),
            chronic("diverticulosis", "56210", 0.05),
        ),
    ),
    Phenotype(
        "sepsis", "Sepsis and critical illness: septicaemia, severe sepsis, shock, organ failure.",
        ADULT, logit=-1.0, age_slope=0.2,
        boosts={"renal": 0.4, "liver_gi": 0.6, "respiratory": 0.3, "cardiac_surgery": -4.0}, episode=(0.65, 0.3, 0.2),
        readmit=0.2,
        tail=("001-041", "590-599", "680-686", "995-995"), tail_rate=0.55,
        conditions=(
            acute("septicemia", {"0389": 0.7, "03842": 0.07, "03811": 0.06, "03812": 0.05, "03849": 0.05, "0380": 0.04,
                                 "03843": 0.03}, 0.70, rank=0),
            acute("severe_sepsis", "99592", 0.75, rank=1, requires="septicemia"),
            acute("septic_shock", "78552", 0.55, rank=1, requires="severe_sepsis"),
            acute("sepsis", "99591", 0.07, rank=1),
            acute("aki", {"5849": 0.9, "5845": 0.1}, 0.75, rank=1),
            acute("respiratory_failure", "51881", 0.65, rank=1),
            acute("acidosis", "2762", 0.50, rank=2),
            acute("uti", {"5990": 0.75, "5990 04149": 0.25}, 0.45, rank=1),
            acute("pneumonia", "486", 0.40, rank=1),
            acute("aspiration", "5070", 0.06, rank=1),
            acute("thrombocytopenia", {"2875": 0.8, "2866": 0.2}, 0.10, rank=2),
            acute("electrolytes", {"2761": 0.4, "2768": 0.3, "2767": 0.3}, 0.12, rank=2),
            acute("hypotension", "4589", 0.06, rank=2),
            acute("c_difficile", "00845", 0.05, rank=1),
            acute("bacteremia", "7907", 0.04, rank=1),
            acute("ards", "51882", 0.05, rank=1),
        ),
    ),
    Phenotype(
        "oncology", "Solid and haematological cancers, metastases, chemotherapy complications.",
        ADULT, logit=-2.1, age_slope=0.3, readmit=0.5, tail=("140-239",), tail_rate=0.6,
        conditions=(
            chronic("primary", {"1629": 0.24, "1539": 0.07, "1579": 0.08, "1550": 0.05, "1749": 0.07, "185": 0.06,
                                "1890": 0.03, "1519": 0.03, "1830": 0.02, "20280": 0.06, "20300": 0.04, "20500": 0.05,
                                "1919": 0.04, "1509": 0.03, "1889": 0.03, "1541": 0.02},
                    1.0, keep=0.95, new=0.0, rank=0.5),
            chronic("metastasis", {"1977": 0.3, "1983": 0.25, "1985": 0.25, "1970": 0.1, "1976": 0.1}, 0.35,
                    keep=0.9, new=0.2, rank=1),
            acute("neutropenia", {"28800": 0.6, "28803": 0.4}, 0.10, rank=1),
            acute("pancytopenia", {"28419": 0.5, "28411": 0.5}, 0.06, rank=1),
            acute("anemia", {"2859": 0.7, "28522": 0.3}, 0.28, rank=2),
            acute("chemo_adverse", "E9331", 0.10, rank=5),
            acute("fever", "78060", 0.10, rank=2),
            acute("hypercalcemia", "27542", 0.05, rank=2),
            acute("thrombosis", {"45341": 0.5, "41519": 0.5}, 0.08, rank=1),
            acute("malnutrition", {"2639": 0.6, "7994": 0.4}, 0.10, rank=2),
            acute("pleural_effusion", "5119", 0.10, rank=2),
            chronic("dnr", "V4986", 0.10, rank=4),
        ),
    ),
    Phenotype(
        "trauma", "Injuries of younger adults: motor-vehicle crashes, assaults, head, chest and spine trauma.",
        ADULT, logit=-2.3, age_slope=-0.35, male=0.8, episode=(0.95, 0.05, 0.03),
        tail=("800-869", "900-929", "E810-E829", "E880-E888", "E960-E969"), tail_rate=0.9,
        conditions=(
            acute("mechanism", {"E8120": 0.25, "E8160": 0.08, "E8190": 0.12, "E8859": 0.15, "E8889": 0.1, "E8809": 0.05,
                                "E9600": 0.08, "E9654": 0.05, "E8147": 0.05, "E8261": 0.07}, 0.85, rank=5),
            acute("place", {"E8490": 0.4, "E8495": 0.4, "E8499": 0.2}, 0.45, rank=5.5),
            acute("brain_injury", {"85200": 0.2, "85220": 0.25, "85221": 0.1, "85300": 0.05, "85400": 0.1, "85100": 0.1,
                                   "85101": 0.1, "80100": 0.1}, 0.35, rank=0),
            acute("rib_fractures", {"80702": 0.3, "80703": 0.25, "80704": 0.15, "80701": 0.2, "80700": 0.1}, 0.25,
                  rank=0.5),
            acute("pneumothorax", {"8600": 0.6, "8602": 0.3, "8604": 0.1}, 0.15, rank=1),
            acute("spine_fracture", {"80501": 0.15, "8052": 0.3, "8054": 0.35, "80506": 0.2}, 0.15, rank=0.5),
            acute("limb_fracture", {"8088": 0.3, "82300": 0.2, "82101": 0.25, "81201": 0.25}, 0.18, rank=0.5),
            acute("organ_injury", {"86502": 0.4, "86401": 0.35, "86602": 0.25}, 0.08, rank=0.5),
            acute("facial_fracture", {"8020": 0.5, "80220": 0.5}, 0.10, rank=1),
            acute("open_wound", {"8730": 0.5, "87342": 0.5}, 0.12, rank=2),
            acute("alcohol", {"30500": 0.8, "30390": 0.2}, 0.2, rank=3),
            acute("blood_loss_anemia", "2851", 0.25, rank=2),
            acute("respiratory_failure", {"51881": 0.6, "51851": 0.4}, 0.15, rank=1),
        ),
    ),
    Phenotype(
        "falls", "Falls of older adults: hip fractures, subdural haematoma, syncope.",
        (40, 124), logit=-2.6, age_slope=0.6, male=-0.2, episode=(0.9, 0.1, 0.08),
        tail=("820-829", "850-854", "920-924"), tail_rate=0.5,
        conditions=(
            acute("fall", {"E8859": 0.55, "E8889": 0.3, "E8809": 0.15}, 0.80, rank=5),
            acute("place", {"E8497": 0.3, "E8490": 0.7}, 0.50, rank=5.5),
            acute("hip_fracture", {"82021": 0.3, "82009": 0.3, "8208": 0.25, "82000": 0.15}, 0.32, rank=0),
            acute("subdural", {"85220": 0.65, "85221": 0.35}, 0.22, rank=0),
            acute("syncope", "7802", 0.10, rank=1),
            acute("blood_loss_anemia", "2851", 0.15, rank=2),
            chronic("fall_history", "V1588", 0.15, rank=4),
            chronic("osteoporosis", "73300", 0.15),
            chronic("dementia", {"2900": 0.3, "3310": 0.4, "29410": 0.3}, 0.12),
        ),
    ),
    Phenotype(
        "substance", "Alcohol and drug use disorders, withdrawal, overdoses.",
        ADULT, logit=-1.4, age_slope=-0.55, male=0.8, readmit=0.4,
        tail=("291-292", "303-305", "960-989", "E850-E869"), tail_rate=0.45,
        conditions=(
            chronic("alcohol", {"30500": 0.35, "30390": 0.3, "30391": 0.2, "30300": 0.15}, 0.55, keep=0.85, new=0.2),
            acute("withdrawal", {"29181": 0.75, "2910": 0.25}, 0.30, rank=0.5, requires="alcohol"),
            chronic("tobacco", "3051", 0.20),
            chronic("drugs", {"30490": 0.15, "30400": 0.15, "30560": 0.2, "30520": 0.2, "30550": 0.15, "30590": 0.15},
                    0.30, keep=0.8, new=0.1),
            acute("overdose", {"96500": 0.2, "96509": 0.2, "9694": 0.2, "9800": 0.2, "96501": 0.2}, 0.12, rank=0),
            chronic("hepatitis_c", "07054", 0.15),
            acute("electrolytes", {"2761": 0.35, "2752": 0.35, "2768": 0.3}, 0.15, rank=2),
            acute("seizure", "78039", 0.08, rank=1),
            chronic("homeless", "V600", 0.05, rank=4),
        ),
    ),
    Phenotype(
        "psychiatric", "Depression, anxiety, bipolar disorder and schizophrenia; self-poisoning.",
        ADULT, logit=-1.9, age_slope=-0.3, male=-0.35, boosts={"substance": 0.8}, readmit=0.2,
        tail=("290-319",), tail_rate=0.35,
        conditions=(
            chronic("depression", {"311": 0.6, "29620": 0.15, "29630": 0.1, "29690": 0.05, "3004": 0.1}, 0.55),
            chronic("anxiety", {"30000": 0.8, "30002": 0.1, "30981": 0.1}, 0.30),
            chronic("bipolar_psychosis", {"29680": 0.5, "29590": 0.3, "29570": 0.2}, 0.12),
            acute("self_poisoning", {"9694": 0.3, "96900": 0.2, "9654": 0.3, "9670": 0.2}, 0.08, rank=0),
            acute("suicide_ecode", {"E9503": 0.5, "E9500": 0.5}, 0.6, rank=5, requires="self_poisoning"),
            acute("insomnia", "78052", 0.04, rank=3),
        ),
    ),
    Phenotype(
        "neuro", "Stroke (ischaemic and haemorrhagic), seizures, encephalopathy, dementia.",
        ADULT, logit=-1.75, age_slope=0.35, boosts={"cardiometabolic": 0.3, "heart": 0.3},
        episode=(0.9, 0.5, 0.2), readmit=0.2, tail=("320-359", "430-438"), tail_rate=0.5,
        conditions=(
            acute("stroke", {"43491": 0.45, "43411": 0.1, "431": 0.2, "430": 0.1, "4321": 0.05, "43401": 0.1}, 0.45,
                  rank=0),
            acute("hemiplegia", {"34290": 0.7, "43820": 0.3}, 0.25, rank=2),
            acute("aphasia_dysphagia", {"7843": 0.4, "78720": 0.6}, 0.25, rank=2),
            acute("brain_swelling", {"3485": 0.6, "3484": 0.25, "3314": 0.15}, 0.10, rank=1),
            chronic("epilepsy", {"34590": 0.55, "78039": 0.45}, 0.25, keep=0.7, new=0.1, rank=1),
            acute("aspiration", "5070", 0.15, rank=1),
            chronic("dementia", {"2900": 0.2, "3310": 0.3, "2948": 0.3, "29410": 0.2}, 0.10),
            chronic("parkinson", "3320", 0.05),
            acute("encephalopathy", {"34830": 0.4, "34831": 0.4, "3481": 0.2}, 0.10, rank=1),
            acute("altered_mental_status", "78097", 0.08, rank=2),
            chronic("carotid_stenosis", "43310", 0.06),
        ),
    ),
    Phenotype(
        "obstetric", "Pregnancy and delivery complications (women of child-bearing age).",
        (15, 45), sex="F", logit=-2.4, age_slope=-0.8, episode=(1.0, 0.05, 0.05),
        tail=("640-679", "V27-V27"), tail_rate=0.8,
        conditions=(
            acute("delivered", {"64891": 0.5, "66401": 0.5}, 0.45, rank=0),
            acute("outcome", "V270", 0.55, rank=4),
            acute("preeclampsia", {"64241": 0.5, "64251": 0.3, "64243": 0.2}, 0.30, rank=0),
            acute("postpartum_hemorrhage", "66612", 0.10, rank=1),
            acute("previous_cesarean", "65421", 0.15, rank=2),
            acute("preterm_labour", "64421", 0.10, rank=1),
            acute("anemia_pregnancy", "64821", 0.10, rank=2),
            acute("gestational_diabetes", "64881", 0.06, rank=2),
        ),
    ),
    Phenotype(
        "neonatal", "Every newborn: the liveborn code, routine newborn care, common term problems.",
        NEONATE, logit=20.0, readmit=0.0, tail=("740-759", "760-779", "V29-V29", "V50-V50"), tail_rate=0.5,
        conditions=(
            Condition("liveborn", {"V3000": 0.53, "V3001": 0.37, "V3101": 0.05, "V3100": 0.03, "V3401": 0.02},
                      1.0, 0.0, 0.0, rank=0),
            acute("hepatitis_b_vaccine", "V053", 0.9, rank=4),
            acute("observation_infection", "V290", 0.75, rank=4),
            acute("jaundice", "7746", 0.18, rank=2),
            acute("transient_tachypnea", "7706", 0.12, rank=1),
            acute("feeding_problem", "77931", 0.10, rank=2),
            acute("hypoglycemia", "7756", 0.08, rank=2),
            acute("circumcision", "V502", 0.15, rank=4),
            acute("growth", {"7661": 0.5, "76408": 0.5}, 0.06, rank=2),
            acute("newborn_sepsis", "77181", 0.03, rank=1),
            acute("septal_defect", {"7455": 0.6, "7470": 0.4}, 0.05, rank=2),
            acute("observation_other", "V293", 0.05, rank=4),
        ),
    ),
    Phenotype(
        "preterm", "Preterm newborns: birth weight with gestational age, and the complications of prematurity.",
        NEONATE, logit=-0.45, readmit=0.5, tail=("760-779",), tail_rate=0.6,
        conditions=(
            Condition("weight_gestation", {"76502 76523": 0.04, "76503 76524": 0.06, "76514 76525": 0.08,
                                           "76515 76526": 0.12, "76516 76526": 0.12, "76517 76527": 0.16,
                                           "76518 76527": 0.14, "76518 76528": 0.18, "76519 76528": 0.10},
                      1.0, 0.0, 0.0, rank=0.5),
            acute("jaundice", "7742", 0.60, rank=2),
            acute("respiratory_distress", "769", 0.25, rank=1),
            acute("bpd", "7707", 0.10, rank=2),
            acute("apnea", {"77081": 0.3, "77082": 0.7}, 0.25, rank=2),
            acute("pda", "7470", 0.10, rank=2),
            acute("rop", "36220", 0.08, rank=2),
            acute("ivh", "77210", 0.05, rank=1),
            acute("feeding_problem", "77931", 0.15, rank=2),
            acute("anemia_prematurity", "7766", 0.10, rank=2),
            acute("nec", "77750", 0.03, rank=1),
        ),
    ),
)

# In one admission, the key code replaces the listed ones (ICD-9 combination codes).
EXCLUDES: dict[str, tuple[str, ...]] = {
    "40390": ("4019",),  # hypertensive CKD is coded instead of essential hypertension
    "40391": ("4019",),
    "99592": ("99591",),  # severe sepsis supersedes sepsis
    "5845": ("5849",),  # acute tubular necrosis is the specific AKI
    "28522": ("2859",),  # anemia in neoplastic disease is the specific anemia
    "28521": ("2859",),
}

# ======================================================================================
# Times: length of stay, gaps between admissions, in-hospital and later death
# ======================================================================================


@dataclass(frozen=True)
class TimeEffects:
    """How a phenotype moves its patients' times (all additive; 0 = no effect).

    death / stay: logit of in-hospital death / log length of stay of an admission where the
        phenotype is active (see the module docstring for admissions after the first).
    conditions: ``{condition name: (death, stay)}``, added when that condition of the phenotype
        happens at the admission.
    gap: log of every gap before a readmission of a member (negative: back sooner).
    after / after_days: logit of a death after the last discharge / log of its delay, for a member.
    """

    death: float = 0.0
    stay: float = 0.0
    conditions: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    gap: float = 0.0
    after: float = 0.0
    after_days: float = 0.0


@dataclass(frozen=True)
class TimeParams:
    """Global parameters of the times; (adult, neonate) pairs where the two differ. Calibrated by
    benchmarks/simulator_calibration.py (targets there)."""

    stay_median: tuple[float, float] = (5.9, 2.6)  # days, before the effects
    stay_sigma: tuple[float, float] = (0.72, 0.55)  # lognormal sd of log stay
    stay_min: float = 0.04  # one hour: MIMIC's shortest admissions
    death_logit: tuple[float, float] = (-2.97, -6.15)
    death_age: float = 0.25  # per decade from 65 (adults)
    gap_median: float = 400.0  # days, before the effects
    gap_sigma: float = 1.35
    gap_intensity: float = 0.5  # gaps scale as (readmission intensity / its base) ** -gap_intensity
    gap_max: float = 4018.0  # 11 years: MIMIC-III spans 2001-2012
    after_logit: tuple[float, float] = (-1.85, -6.0)
    after_age: float = 0.5  # per decade from 65 (adults)
    after_median: float = 300.0  # days from the last discharge, before the effects
    after_sigma: float = 1.4


TIME_PARAMS = TimeParams()

# Phenotypes absent here have no effect on the times.
TIMES: dict[str, TimeEffects] = {
    "general": TimeEffects(conditions={"dnr": (1.6, 0.0), "delirium": (0.2, 0.2), "pressure_ulcer": (0.4, 0.4)},
                           after=0.2),
    "cardiometabolic": TimeEffects(gap=-0.2, after=0.1),
    "coronary": TimeEffects(death=-0.2, gap=-0.1),
    "heart": TimeEffects(death=0.2, gap=-0.45, after=0.6,
                         conditions={"cardiogenic_shock": (1.8, 0.3), "ventricular_tachycardia": (0.5, 0.1)}),
    "cardiac_surgery": TimeEffects(death=-1.0, stay=0.25, after=-0.4),
    "renal": TimeEffects(death=0.1, stay=0.1, gap=-0.6, after=0.6, conditions={"aki": (0.4, 0.2)}),
    "respiratory": TimeEffects(gap=-0.4, after=0.4,
                               conditions={"respiratory_failure": (1.2, 0.45), "aspiration": (0.5, 0.2),
                                           "pneumonia": (0.3, 0.1), "pulmonary_embolism": (0.5, 0.1)}),
    "liver_gi": TimeEffects(death=0.3, gap=-0.6, after=0.9,
                            conditions={"hepatorenal": (1.5, 0.3), "encephalopathy": (0.5, 0.2), "sbp": (0.8, 0.2),
                                        "gi_bleed": (0.2, 0.0)}),
    "sepsis": TimeEffects(death=0.9, stay=0.3, gap=-0.2, after=0.5,
                          conditions={"severe_sepsis": (0.3, 0.1), "septic_shock": (1.0, 0.2),
                                      "respiratory_failure": (0.5, 0.3), "ards": (0.8, 0.3)}),
    "oncology": TimeEffects(death=0.6, stay=0.2, gap=-0.7, after=1.6, after_days=-0.8,
                            conditions={"metastasis": (0.5, 0.1)}),
    "trauma": TimeEffects(death=-0.3, stay=0.15, gap=0.3, after=-0.8,
                          conditions={"brain_injury": (0.8, 0.2), "spine_fracture": (0.3, 0.3),
                                      "respiratory_failure": (0.8, 0.3)}),
    "falls": TimeEffects(after=0.3, conditions={"subdural": (0.5, 0.1), "hip_fracture": (0.2, 0.2)}),
    "substance": TimeEffects(death=-0.5, stay=-0.3, gap=-0.4),
    "psychiatric": TimeEffects(death=-0.8, stay=-0.2, conditions={"self_poisoning": (0.0, -0.5)}),
    "neuro": TimeEffects(death=0.3, stay=0.1, after=0.4,
                         conditions={"brain_swelling": (1.2, 0.2), "aspiration": (0.4, 0.2)}),
    "obstetric": TimeEffects(death=-2.5, stay=-0.6, gap=0.6, after=-3.0),
    "neonatal": TimeEffects(gap=-1.2, conditions={"newborn_sepsis": (1.5, 0.5)}),
    "preterm": TimeEffects(death=1.6, stay=1.4,
                           conditions={"respiratory_distress": (0.6, 0.4), "bpd": (0.6, 0.7), "rop": (0.0, 0.5),
                                       "ivh": (1.2, 0.4), "nec": (1.5, 0.7)}),
}

# ======================================================================================
# Procedures and medications: orders written at an admission, from its phenotypes and conditions
# ======================================================================================


@dataclass(frozen=True)
class Order:
    """A procedure or a medication order: when an admission gets it and which codes it writes.

    variants: ``{"code [code ...]": weight}`` (medication codes, whose names hold spaces, separated
        by ``" ; "``), one drawn per admission that gets the order, among those the patient's sex
        allows (CMS procedure sex edits), and written as all its codes.
    base: P(order) at any (adult, neonate) admission.
    given: ``{"phenotype": p}`` (the phenotype is active at the admission) or
        ``{"phenotype.condition": p}`` (the condition is coded there); each present cause
        orders it with its p on its own (noisy-OR with ``base``).
    rank: position in the admission's order of the modality (procedures: principal operation
        first; medications: order of first prescription), before the noise.
    """

    name: str
    variants: Mapping[str, float]
    given: Mapping[str, float] = field(default_factory=dict)
    base: tuple[float, float] = (0.0, 0.0)
    rank: float = 2.0


def order(name, variants, given=None, base=(0.0, 0.0), rank=2.0) -> Order:
    """An Order; a single code or variant string stands for ``{variants: 1.0}``."""
    return Order(name, variants if isinstance(variants, Mapping) else {variants: 1.0}, given or {}, base, rank)


@dataclass(frozen=True)
class ModalityParams:
    """Global parameters of the procedures and medications (see the module docstring)."""

    intensity_shape: float = 1.6  # Gamma shape of an admission's care intensity (mean 1)
    # Every order's hazard -log(1 - p) is multiplied by the intensity and this (procedures,
    # medications): the tables give relative shares, this the codes per admission.
    hazard_scale: tuple[float, float] = (1.8, 2.2)
    # Background procedures: Poisson(rate * intensity) per (adult, neonate) admission, drawn
    # among every billable v32 procedure code outside PROCEDURES that the sex allows, the code of
    # rank R in a seeded order weighing (R + tail_q)^-tail_s.
    tail_rate: tuple[float, float] = (1.4, 0.25)
    tail_s: float = 2.0
    tail_q: float = 40.0
    tail_rank: float = 2.5
    order_noise: float = 1.0  # sd of the noise added to an order's rank


MODALITY_PARAMS = ModalityParams()
MODALITIES = ("diagnoses", "procedures", "medications")

# Causes shared by several orders.
_VENTILATED = {"respiratory.respiratory_failure": 0.62, "sepsis.respiratory_failure": 0.62,
               "trauma.respiratory_failure": 0.7, "sepsis.ards": 0.9, "heart.cardiogenic_shock": 0.5,
               "neuro.brain_swelling": 0.5, "substance.overdose": 0.25, "preterm.bpd": 0.6}
_ICU_LINES = {"sepsis": 0.45, "cardiac_surgery": 0.55, "heart.cardiogenic_shock": 0.6,
              "respiratory.respiratory_failure": 0.35, "liver_gi.gi_bleed": 0.2, "trauma": 0.25,
              "renal.aki": 0.15, "neuro.stroke": 0.12, "oncology": 0.15}
_SEPTIC_SHOCK = {"sepsis.septic_shock": 0.8, "heart.cardiogenic_shock": 0.5, "sepsis": 0.15}

# ICD-9-CM volume 3 (v32). Per-admission probabilities: the demo's procedure frequencies given
# the diagnoses present (aggregate counts; 129 admissions, 3.8 procedures each) and clinical
# practice (ventilation with respiratory failure, CABG with coronary surgery, phototherapy with
# neonatal jaundice...).
PROCEDURES: tuple[Order, ...] = (
    order("cabg", {"3615 3612": 0.35, "3615 3613": 0.3, "3612": 0.15, "3613": 0.1, "3615": 0.1},
          {"cardiac_surgery.cad": 0.55}, rank=0),
    order("aortic_valve", "3521", {"cardiac_surgery.aortic_valve": 0.6}, rank=0),
    order("bypass_pump", "3961", {"cardiac_surgery.cad": 0.5, "cardiac_surgery.aortic_valve": 0.6}, rank=1),
    order("coronary_angiography", {"3723 8856": 0.65, "8856": 0.2, "3723": 0.15},
          {"cardiac_surgery.acute_mi": 0.65, "cardiac_surgery.unstable_angina": 0.5, "coronary": 0.04}, rank=0.5),
    order("coronary_stent", {"0066 3607 0045 0040": 0.5, "0066 3607 0046 0041": 0.2, "0066 0045 0040": 0.15,
                             "0066": 0.15},
          {"cardiac_surgery.acute_mi": 0.45, "cardiac_surgery.unstable_angina": 0.3}, rank=0.2),
    order("pa_catheter", "8964", {"cardiac_surgery": 0.25, "heart.cardiogenic_shock": 0.3}, rank=2),
    order("echocardiogram", "8872", {"heart": 0.06, "cardiac_surgery": 0.08, "heart.heart_failure": 0.05}, rank=3),
    order("cardioversion", "9962", {"heart.atrial_fibrillation": 0.03, "heart.ventricular_tachycardia": 0.2,
                                    "cardiac_surgery.postop_af": 0.05}, rank=1.5),
    order("intubation", "9604", {**_VENTILATED, "cardiac_surgery": 0.05, "neuro.stroke": 0.12}, rank=1),
    order("ventilation", {"9671": 0.55, "9672": 0.45},
          {**_VENTILATED, "cardiac_surgery": 0.2, "neuro.stroke": 0.1, "preterm.respiratory_distress": 0.3}, rank=1.2),
    order("noninvasive_ventilation", "9390", {"respiratory.copd": 0.06, "heart.heart_failure": 0.03,
                                              "respiratory.respiratory_failure": 0.1, "respiratory.sleep_apnea": 0.05,
                                              "preterm.respiratory_distress": 0.5, "preterm": 0.15,
                                              "neonatal.transient_tachypnea": 0.25}, rank=1.5),
    order("tracheostomy", "311", {"respiratory.respiratory_failure": 0.04, "trauma.brain_injury": 0.06,
                                  "sepsis.ards": 0.1}, rank=0.8),
    order("central_line", {"3893": 0.8, "3897": 0.2}, {**_ICU_LINES, "preterm": 0.08}, base=(0.1, 0.0), rank=2.5),
    order("arterial_line", "3891", {"cardiac_surgery": 0.5, "heart.cardiogenic_shock": 0.4, "sepsis.septic_shock": 0.2,
                                    "respiratory.respiratory_failure": 0.1, "trauma": 0.08, "neuro.stroke": 0.05},
          rank=2.6),
    order("vasopressor_infusion", "0017", {"sepsis.septic_shock": 0.1, "heart.cardiogenic_shock": 0.05}, rank=3),
    order("enteral_nutrition", "966", {"respiratory.respiratory_failure": 0.4, "sepsis.respiratory_failure": 0.3,
                                       "trauma.brain_injury": 0.3, "neuro.stroke": 0.2, "preterm": 0.7,
                                       "neonatal.feeding_problem": 0.2}, base=(0.06, 0.04), rank=3),
    order("parenteral_nutrition", "9915", {"preterm": 0.45, "liver_gi.pancreatitis": 0.2, "general.ileus": 0.15,
                                           "oncology.malnutrition": 0.2}, base=(0.03, 0.0), rank=3),
    order("nasogastric_tube", "9607", {"neuro.aphasia_dysphagia": 0.1, "general.ileus": 0.3}, rank=3),
    order("red_cells", "9904", {"cardiac_surgery.blood_loss_anemia": 0.7, "liver_gi.gi_bleed": 0.55,
                                "trauma.blood_loss_anemia": 0.6, "falls.blood_loss_anemia": 0.5,
                                "oncology.anemia": 0.35,
                                "renal.ckd_anemia": 0.2, "general.anemia": 0.15, "sepsis": 0.15,
                                "obstetric.postpartum_hemorrhage": 0.4, "preterm.anemia_prematurity": 0.4},
          base=(0.03, 0.0), rank=2.8),
    order("plasma", "9907", {"liver_gi.coagulopathy": 0.3, "cardiac_surgery.procedure_hemorrhage": 0.5,
                             "trauma.brain_injury": 0.1, "heart.anticoagulation": 0.03}, rank=2.9),
    order("platelets", "9905", {"oncology.pancytopenia": 0.45, "oncology.neutropenia": 0.2,
                                "sepsis.thrombocytopenia": 0.3, "cardiac_surgery.procedure_hemorrhage": 0.4}, rank=2.9),
    order("hemodialysis", "3995", {"renal.ckd": 0.14, "renal.dialysis_complication": 0.8, "renal.aki": 0.06,
                                   "sepsis.aki": 0.04}, rank=1.5),
    order("dialysis_catheter", "3895", {"renal.ckd": 0.04, "renal.aki": 0.05, "sepsis.aki": 0.04}, rank=2),
    order("paracentesis", "5491", {"liver_gi.ascites": 0.55, "liver_gi.cirrhosis": 0.1}, rank=1.5),
    order("thoracentesis", "3491", {"respiratory.pleural_effusion": 0.35, "oncology.pleural_effusion": 0.4,
                                    "cardiac_surgery.pleural_effusion": 0.2}, rank=1.5),
    order("chest_tube", "3404", {"trauma.pneumothorax": 0.7, "trauma.rib_fractures": 0.25,
                                 "respiratory.pleural_effusion": 0.05}, rank=1),
    order("bronchoscopy", {"3322": 0.6, "3324 3322": 0.4}, {"respiratory.pneumonia": 0.03,
                                                            "respiratory.respiratory_failure": 0.05,
                                                            "oncology.primary": 0.03}, rank=1.5),
    order("upper_endoscopy", {"4513": 0.5, "4516": 0.3, "4513 4443": 0.2}, {"liver_gi.gi_bleed": 0.55,
                                                                            "liver_gi.varices": 0.1}, rank=1),
    order("variceal_banding", "4233", {"liver_gi.varices": 0.25}, rank=0.8),
    order("colonoscopy", "4523", {"liver_gi.gi_bleed": 0.12, "oncology": 0.02}, rank=1.2),
    order("ercp", "5110", {"liver_gi.pancreatitis": 0.2}, rank=0.8),
    order("cholecystectomy", "5123", {"liver_gi.pancreatitis": 0.1}, rank=0),
    order("liver_biopsy", "5011", {"liver_gi.cirrhosis": 0.03, "liver_gi.hepatitis_c": 0.03}, rank=1.5),
    order("peg", "4311", {"neuro.aphasia_dysphagia": 0.15, "neuro.stroke": 0.04,
                          "respiratory.respiratory_failure": 0.03}, rank=1),
    order("lumbar_puncture", "0331", {"neuro.encephalopathy": 0.2, "neuro.altered_mental_status": 0.1,
                                      "neonatal.newborn_sepsis": 0.5, "general.fever": 0.05}, rank=1.5),
    order("head_ct", "8703", {"neuro.stroke": 0.15, "trauma.brain_injury": 0.25, "falls.subdural": 0.2}, rank=3.5),
    order("brain_mri", "8891", {"neuro.stroke": 0.2, "neuro.epilepsy": 0.05}, rank=3.5),
    order("thrombolysis", "9910", {"neuro.stroke": 0.05, "respiratory.pulmonary_embolism": 0.05}, rank=1),
    order("icp_monitor", "0110", {"trauma.brain_injury": 0.12, "neuro.brain_swelling": 0.15}, rank=1.2),
    order("craniotomy", "0124", {"trauma.brain_injury": 0.12, "falls.subdural": 0.2, "neuro.stroke": 0.03}, rank=0),
    order("femur_fixation", "7935", {"falls.hip_fracture": 0.6, "trauma.limb_fracture": 0.3}, rank=0),
    order("chemotherapy", "9925", {"oncology": 0.08, "oncology.neutropenia": 0.1}, rank=1.5),
    order("colectomy", "4573", {"oncology.primary": 0.02}, rank=0),
    order("lobectomy", "3249", {"oncology.primary": 0.015}, rank=0),
    order("urinary_catheter", "5794", {"general.urinary_retention": 0.3}, rank=3),
    order("prostatectomy", "6029", {"general.bph": 0.04, "general.urinary_retention": 0.05}, rank=0.5),
    order("hysterectomy", "6849", {"oncology.primary": 0.01}, rank=0),
    order("delivery", {"741": 0.35, "7359": 0.45, "7359 7569": 0.2}, {"obstetric.delivered": 0.9,
                                                                    "obstetric.outcome": 0.6}, rank=0),
    order("hepatitis_b_vaccine", "9955", {"neonatal.hepatitis_b_vaccine": 0.85}, rank=4),
    order("phototherapy", "9983", {"neonatal.jaundice": 0.6, "preterm.jaundice": 0.7}, rank=3),
    order("umbilical_catheter", "3892", {"preterm": 0.3, "neonatal.newborn_sepsis": 0.2}, rank=2),
    order("circumcision", "640", {"neonatal.circumcision": 0.9}, rank=1),
)

# The ICD-10-PCS FY2024 code each ICD-9-CM procedure above is written as in an ICD-10-CM cohort:
# the code of the same operation (checked by title against the ICD-10-PCS tables); "" where
# ICD-10-PCS has no such code (the ICD-9 adjunct codes counting vessels and stents are qualifiers
# of the PCS code there), so the code is left out of that cohort.
PCS_CODES: dict[str, str] = {
    "3615": "02100Z9", "3612": "021109W", "3613": "021209W", "3521": "02RF08Z", "3961": "5A1221Z",
    "3723": "4A023N8", "8856": "B2111ZZ", "0066": "02703ZZ", "3607": "027034Z", "0045": "", "0046": "",
    "0040": "", "0041": "", "8964": "02HP32Z", "8872": "B246ZZZ", "9962": "5A2204Z", "9604": "0BH17EZ",
    "9671": "5A1945Z", "9672": "5A1955Z", "9390": "5A09357", "311": "0B110F4", "3893": "02HV33Z",
    "3897": "02HV33Z", "3891": "03HY32Z", "0017": "3E033XZ", "966": "3E0G76Z", "9915": "3E0436Z",
    "9607": "0DH67UZ", "9904": "30233N1", "9907": "30233K1", "9905": "30233R1", "3995": "5A1D70Z",
    "3895": "05HY33Z", "5491": "0W9G3ZZ", "3491": "0W993ZZ", "3404": "0W9930Z", "3322": "0BJ08ZZ",
    "3324": "0BBC8ZX", "4513": "0DJ08ZZ", "4516": "0DB68ZX", "4443": "0W3P8ZZ", "4233": "06L38CZ",
    "4523": "0DJD8ZZ", "5110": "0FJB8ZZ", "5123": "0FT44ZZ", "5011": "0FB03ZX", "4311": "0DH63UZ",
    "0331": "009U3ZX", "8703": "B020ZZZ", "8891": "B030ZZZ", "9910": "3E03317", "0110": "4A103BD",
    "0124": "00C40ZZ", "7935": "0QS604Z", "9925": "3E03305", "4573": "0DTF0ZZ", "3249": "0BTC0ZZ",
    "5794": "0T9B70Z", "6029": "0VT08ZZ", "6849": "0UT90ZZ", "741": "10D00Z1", "7359": "10E0XZZ",
    "7569": "0UQMXZZ", "9955": "3E0234Z", "9983": "6A601ZZ", "3892": "06HY33Z", "640": "0VTTXZZ",
}

# Medications, "<DRUG NAME>//<FORMULARY CODE>" (the medications module). The codes of drugs the
# MIMIC-III demo prescribes are its own (drug name and formulary code: the hospital's vocabulary,
# as the ICD codes are the diagnoses'); the neonatal ones, which the adult demo lacks, are written
# in its style. Probabilities: the demo's share of admissions prescribing each drug, overall and
# given the diagnoses present (aggregate counts; 34.5 kept codes per admission), and clinical
# practice (vasopressors in septic shock, furosemide in heart failure, lactulose with hepatic
# encephalopathy, vitamin K, erythromycin eye ointment and hepatitis B vaccine for newborns...).
MEDICATIONS: tuple[Order, ...] = (
    # Ward routine of adult admissions.
    order("flush", "SODIUM CHLORIDE 0.9% FLUSH//NACLFLUSH", base=(0.72, 0.0), rank=0),
    order("sc_heparin", "HEPARIN//HEPA5I", {"cardiac_surgery": 0.4}, base=(0.5, 0.0), rank=1),
    order("acetaminophen", {"ACETAMINOPHEN//ACET325": 0.75, "ACETAMINOPHEN//ACET325 ; ACETAMINOPHEN//ACET650R": 0.15,
                            "ACETAMINOPHEN//ACET650L": 0.1}, {"cardiac_surgery": 0.5, "trauma": 0.4, "falls": 0.4},
          base=(0.5, 0.0), rank=1),
    order("senna", "SENNA//SENN187", {"cardiac_surgery": 0.4}, base=(0.42, 0.0), rank=2),
    order("docusate", {"DOCUSATE SODIUM//DOCU100": 0.6, "DOCUSATE SODIUM (LIQUID)//DOCU100L": 0.25,
                       "DOCUSATE SODIUM//DOCU100 ; DOCUSATE SODIUM (LIQUID)//DOCU100L": 0.1,
                       "DOCUSATE SODIUM//DOCU100L": 0.05}, {"cardiac_surgery": 0.5}, base=(0.5, 0.0), rank=2),
    order("bisacodyl", {"BISACODYL//BISA10R": 0.5, "BISACODYL//BISA5": 0.3,
                        "BISACODYL//BISA10R ; BISACODYL//BISA5": 0.2},
          base=(0.38, 0.0), rank=2),
    order("pantoprazole", {"PANTOPRAZOLE//PANT40": 0.45, "PANTOPRAZOLE SODIUM//PANT40I": 0.4,
                           "PANTOPRAZOLE//PANT40 ; PANTOPRAZOLE SODIUM//PANT40I": 0.15},
          {"liver_gi.gi_bleed": 0.9, "respiratory.respiratory_failure": 0.5, "sepsis": 0.4}, base=(0.38, 0.0), rank=1),
    order("h2_blocker", {"FAMOTIDINE//FAMO20PM": 0.5, "FAMOTIDINE//PEPC20": 0.25, "RANITIDINE//RANI150": 0.25},
          {"cardiac_surgery": 0.2, "general.gerd": 0.2}, base=(0.1, 0.0), rank=2),
    order("potassium", {"POTASSIUM CHLORIDE//KCL20P": 0.3, "POTASSIUM CHLORIDE//KCL40I": 0.2,
                        "POTASSIUM CHLORIDE//KCL20PM": 0.15,
                        "POTASSIUM CHLORIDE//KCL20P ; POTASSIUM CHLORIDE//KCL20PM": 0.1,
                        "POTASSIUM CHLORIDE//KCL20P ; POTASSIUM CHLORIDE//KCL40I ; POTASSIUM CHLORIDE//POTA20": 0.1,
                        "POTASSIUM CHLORIDE//MICROK10": 0.1,
                        "POTASSIUM CHLORIDE//KCL10PM ; POTASSIUM CHLORIDE//KCL20I": 0.05},
          {"heart.heart_failure": 0.4, "cardiac_surgery": 0.6, "substance.electrolytes": 0.6,
           "general.electrolytes": 0.5}, base=(0.42, 0.0), rank=1),
    order("magnesium", {"MAGNESIUM SULFATE//MAG2PM": 0.5, "MAGNESIUM SULFATE//MAGS1I": 0.3,
                        "MAGNESIUM SULFATE//MAG2PM ; MAGNESIUM SULFATE//MAGS1I": 0.2},
          {"cardiac_surgery": 0.6, "heart.atrial_fibrillation": 0.2, "substance.alcohol": 0.4,
           "obstetric.preeclampsia": 0.8}, base=(0.35, 0.0), rank=1),
    order("phosphate", {"NEUTRA-PHOS//NEUT": 0.5, "POTASSIUM PHOSPHATE//KPHO45I": 0.3,
                        "NEUTRA-PHOS//NEUT ; POTASSIUM PHOSPHATE//KPHO45I": 0.2},
          {"substance.alcohol": 0.3, "sepsis": 0.2}, base=(0.25, 0.0), rank=2),
    order("calcium", {"CALCIUM GLUCONATE//CALG1I": 0.7, "CALCIUM GLUCONATE//CALCG2/100NS": 0.3},
          {"cardiac_surgery": 0.5, "renal.hyperkalemia": 0.4}, base=(0.22, 0.0), rank=2),
    order("morphine", {"MORPHINE SULFATE//MORP2I": 0.6, "MORPHINE SULFATE//MORP4I": 0.15,
                       "MORPHINE SULFATE//MORP2I ; MORPHINE SULFATE//MORP100PM": 0.15,
                       "MORPHINE SULFATE IR//MORP15": 0.1},
          {"cardiac_surgery": 0.5, "trauma": 0.5, "oncology": 0.3, "falls.hip_fracture": 0.5}, base=(0.35, 0.0),
          rank=1),
    order("oxycodone", {"OXYCODONE-ACETAMINOPHEN//PERC": 0.7, "OXYCODONE (IMMEDIATE RELEASE)//OXYC5": 0.3},
          {"cardiac_surgery": 0.4, "trauma": 0.4, "falls.hip_fracture": 0.5, "obstetric.delivered": 0.5,
           "oncology": 0.2}, base=(0.08, 0.0), rank=3),
    order("ondansetron", "ONDANSETRON//ONDAN4I", {"oncology": 0.4, "cardiac_surgery": 0.2,
                                                  "liver_gi.pancreatitis": 0.5},
          base=(0.12, 0.0), rank=2),
    order("lorazepam", {"LORAZEPAM//LORA2I": 0.7, "LORAZEPAM//LORA5": 0.3},
          {"substance.withdrawal": 0.85, "general.anxiety": 0.3, "psychiatric.anxiety": 0.4, "neuro.epilepsy": 0.3,
           "general.delirium": 0.2}, base=(0.18, 0.0), rank=2),
    order("insulin", "INSULIN//INSULIN", {"cardiometabolic.diabetes": 0.85, "cardiac_surgery": 0.6, "sepsis": 0.4},
          base=(0.35, 0.0), rank=1),
    order("insulin_glargine", "INSULIN//GLAR100I", {"cardiometabolic.insulin": 0.6, "cardiometabolic.diabetes": 0.15},
          rank=3),
    order("insulin_drip", "INSULIN HUMAN REGULAR//INHRIV", {"cardiac_surgery": 0.45, "sepsis.septic_shock": 0.1},
          rank=1),
    order("dextrose", "DEXTROSE 50%//DEX50SY", {"cardiometabolic.diabetes": 0.3, "liver_gi.cirrhosis": 0.15},
          base=(0.12, 0.0), rank=2),
    order("glucagon", "GLUCAGON//GLUC1I", {"cardiometabolic.diabetes": 0.25}, base=(0.04, 0.0), rank=3),
    order("vaccines", {"PNEUMOCOCCAL VAC POLYVALENT//PNEU25I": 0.45, "INFLUENZA VIRUS VACCINE//INFV": 0.25,
                       "PNEUMOCOCCAL VAC POLYVALENT//PNEU25I ; INFLUENZA VIRUS VACCINE//INFV": 0.3},
          {"respiratory.copd": 0.3}, base=(0.3, 0.0), rank=4),
    order("multivitamin", "MULTIVITAMINS//MVI", {"substance.alcohol": 0.6, "liver_gi.cirrhosis": 0.3},
          base=(0.12, 0.0), rank=3),
    order("heparin_flush", {"HEPARIN FLUSH CVL (100 UNITS/ML)//HEPA100SYR": 0.5,
                            "HEPARIN FLUSH (10 UNITS/ML)//HEPA10SYR": 0.5},
          {**_ICU_LINES, "oncology": 0.3, "renal.ckd": 0.2}, base=(0.06, 0.0), rank=3),
    order("skin_mouth_care", {"MICONAZOLE POWDER 2%//MICO2P": 0.5, "NYSTATIN ORAL SUSPENSION//NYST5L": 0.2,
                              "MICONAZOLE POWDER 2%//MICO2P ; CHLORHEXIDINE GLUCONATE 0.12% ORAL RINSE//CHLO15L": 0.3},
          {"general.pressure_ulcer": 0.5, "oncology": 0.2}, base=(0.12, 0.0), rank=3),
    order("oral_rinse", "CHLORHEXIDINE GLUCONATE 0.12% ORAL RINSE//CHLO15L", {**_VENTILATED, "cardiac_surgery": 0.5},
          rank=3),
    order("sleep", {"ZOLPIDEM TARTRATE//AMBI5": 0.6, "TRAZODONE//TRAZ50": 0.4}, {"psychiatric": 0.3},
          base=(0.1, 0.0), rank=4),
    order("milk_of_magnesia", "MILK OF MAGNESIA//MOM30L", {"cardiac_surgery": 0.3}, base=(0.07, 0.0), rank=4),
    order("metoclopramide", "METOCLOPRAMIDE//METO10I", {"general.ileus": 0.4}, base=(0.05, 0.0), rank=3),
    order("calcium_carbonate", "CALCIUM CARBONATE//CALC500", {"general.osteoporosis": 0.4, "falls.osteoporosis": 0.4,
                                                              "renal.ckd": 0.15}, base=(0.07, 0.0), rank=4),
    order("vitamin_d", "VITAMIN D//ERGO400T", {"general.osteoporosis": 0.4, "falls": 0.2}, base=(0.05, 0.0), rank=4),
    order("iron", "FERROUS SULFATE//FERR325", {"general.anemia": 0.35, "renal.ckd_anemia": 0.3, "falls": 0.1},
          base=(0.05, 0.0), rank=4),
    order("gabapentin", {"GABAPENTIN//GABA300": 0.7, "GABAPENTIN//GABA250L": 0.3},
          {"general.neuropathy": 0.6, "cardiometabolic.diabetes": 0.1}, base=(0.08, 0.0), rank=4),
    order("haloperidol", "HALOPERIDOL//HALD5I", {"general.delirium": 0.6, "neuro.altered_mental_status": 0.3,
                                                 "substance.withdrawal": 0.2}, base=(0.06, 0.0), rank=3),
    order("enoxaparin", "ENOXAPARIN SODIUM//ENOX40I", {"trauma": 0.3, "falls.hip_fracture": 0.6,
                                                       "oncology.thrombosis": 0.6},
          base=(0.05, 0.0), rank=2),
    # Cardiovascular.
    order("furosemide", {"FUROSEMIDE//FURO40I": 0.55, "FUROSEMIDE//FURO40I ; FUROSEMIDE//FURO100I": 0.15,
                         "FUROSEMIDE//FURO40I ; FUROSEMIDE//FURO20": 0.1, "FUROSEMIDE//FURO40": 0.1,
                         "FUROSEMIDE//FURO20": 0.1},
          {"heart.heart_failure": 0.8, "cardiac_surgery": 0.6, "renal.fluid_overload": 0.7, "liver_gi.ascites": 0.4,
           "respiratory.pulmonary_edema": 0.8}, base=(0.15, 0.0), rank=1),
    order("metoprolol", {"METOPROLOL TARTRATE//METO25": 0.45, "METOPROLOL TARTRATE//METO5I": 0.15,
                         "METOPROLOL TARTRATE//METO25 ; METOPROLOL TARTRATE//METO5I": 0.15, "METOPROLOL//METO25": 0.1,
                         "METOPROLOL//METO5I": 0.08, "METOPROLOL//METO50": 0.07},
          {"heart.atrial_fibrillation": 0.45, "heart.heart_failure": 0.3, "coronary": 0.45, "cardiac_surgery": 0.75,
           "cardiometabolic.hypertension": 0.15}, base=(0.06, 0.0), rank=2),
    order("ace_inhibitor", {"LISINOPRIL//LISI5": 0.8, "CAPTOPRIL//CAPT6.25": 0.2},
          {"heart.heart_failure": 0.3, "cardiometabolic.hypertension": 0.15, "cardiac_surgery.acute_mi": 0.4}, rank=3),
    order("amlodipine", "AMLODIPINE//AMLO5", {"cardiometabolic.hypertension": 0.1}, rank=3),
    order("hydralazine", "HYDRALAZINE//HYDZ20I", {"cardiometabolic.hypertension": 0.1, "neuro.stroke": 0.2,
                                                  "obstetric.preeclampsia": 0.3}, base=(0.04, 0.0), rank=3),
    order("labetalol", "LABETALOL//LABE100I", {"neuro.stroke": 0.3, "obstetric.preeclampsia": 0.5}, rank=3),
    order("carvedilol", "CARVEDILOL//CARV3.125", {"heart.heart_failure": 0.15, "heart.cardiomyopathy": 0.4}, rank=3),
    order("spironolactone", "SPIRONOLACTONE//SPIR25", {"heart.heart_failure": 0.08, "liver_gi.ascites": 0.35}, rank=3),
    order("warfarin", {"WARFARIN//WARF2": 0.35, "WARFARIN//WARF5": 0.25, "WARFARIN//WARF1": 0.15,
                       "WARFARIN//WARF2 ; WARFARIN//WARF5": 0.15,
                       "WARFARIN//WARF1 ; WARFARIN//WARF2 ; WARFARIN//WARF5": 0.1},
          {"heart.anticoagulation": 0.8, "heart.atrial_fibrillation": 0.15, "oncology.thrombosis": 0.4,
           "respiratory.pulmonary_embolism": 0.6}, rank=3),
    order("heparin_drip", "HEPARIN SODIUM//HEPPREMIX",
          {"heart.atrial_fibrillation": 0.2, "cardiac_surgery.acute_mi": 0.6, "cardiac_surgery.unstable_angina": 0.5,
           "oncology.thrombosis": 0.5, "respiratory.pulmonary_embolism": 0.7, "renal.ckd": 0.05}, rank=1),
    order("rate_control", {"DILTIAZEM//DILT30": 0.45, "AMIODARONE HCL//AMIO200": 0.3, "DIGOXIN//DIGO125": 0.25},
          {"heart.atrial_fibrillation": 0.25, "cardiac_surgery.postop_af": 0.6, "heart.flutter": 0.5,
           "heart.ventricular_tachycardia": 0.5}, rank=2),
    order("aspirin", {"ASPIRIN//ASA325": 0.45, "ASPIRIN//ASA81": 0.35, "ASPIRIN//ASA325 ; ASPIRIN//ASA81": 0.2},
          {"coronary": 0.65, "cardiac_surgery": 0.9, "neuro.stroke": 0.6, "cardiometabolic.diabetes": 0.1},
          base=(0.08, 0.0), rank=2),
    order("clopidogrel", "CLOPIDOGREL BISULFATE//CLOP75", {"coronary.revascularised": 0.4,
                                                          "cardiac_surgery.acute_mi": 0.7,
                                                          "cardiac_surgery.unstable_angina": 0.5, "coronary": 0.1},
          rank=2),
    order("statin", {"ATORVASTATIN//ATOR10": 0.45, "ATORVASTATIN//ATOR40": 0.2, "SIMVASTATIN//SIMV10": 0.25,
                     "SIMVASTATIN//SIMV40": 0.1},
          {"cardiometabolic.hyperlipidemia": 0.45, "coronary": 0.4, "cardiac_surgery": 0.6,
           "neuro.stroke": 0.5}, rank=3),
    order("nitroglycerin", "NITROGLYCERIN//NTG100PB", {"cardiac_surgery": 0.45, "coronary.angina": 0.5,
                                                       "heart.heart_failure": 0.1}, rank=2),
    order("cefazolin", "CEFAZOLIN//CEFA1I", {"cardiac_surgery": 0.8, "trauma": 0.35, "falls.hip_fracture": 0.7,
                                             "general.cellulitis": 0.4, "obstetric.delivered": 0.3}, rank=1),
    # Critical care: sedation, vasopressors, sepsis.
    order("propofol", {"PROPOFOL//PROP100IG": 0.7, "PROPOFOL//PROP200IG": 0.1,
                       "PROPOFOL//PROP100IG ; PROPOFOL//PROP200IG": 0.2},
          {**_VENTILATED, "cardiac_surgery": 0.55}, rank=1),
    order("fentanyl", {"FENTANYL CITRATE//FENT2I": 0.55, "FENTANYL CITRATE//FENT2.5I": 0.25,
                       "FENTANYL CITRATE//FENT2I ; FENTANYL CITRATE//FENT2.5I": 0.2},
          {**_VENTILATED, "trauma": 0.35, "cardiac_surgery.acute_mi": 0.3}, base=(0.06, 0.0), rank=1),
    order("midazolam", {"MIDAZOLAM//MIDA50I": 0.45, "MIDAZOLAM//MIDA2I": 0.35, "MIDAZOLAM HCL//MIDA2I": 0.2},
          {**_VENTILATED, "neuro.epilepsy": 0.1}, base=(0.04, 0.0), rank=1),
    order("fentanyl_patch", "FENTANYL PATCH//FENT50P", {"oncology": 0.15}, rank=4),
    order("norepinephrine", "NOREPINEPHRINE//LEVO4I", {**_SEPTIC_SHOCK, "cardiac_surgery": 0.05}, rank=0.5),
    order("vasopressin", "VASOPRESSIN//VASO20I", {"sepsis.septic_shock": 0.35, "liver_gi.hepatorenal": 0.3,
                                                  "heart.cardiogenic_shock": 0.2}, rank=0.8),
    order("phenylephrine", {"PHENYLEPHRINE//PHEN10I": 0.6, "PHENYLEPHRINE HCL//PHEN10I": 0.4},
          {"sepsis.septic_shock": 0.3, "cardiac_surgery": 0.45, "neuro.stroke": 0.05, "sepsis": 0.1}, rank=0.8),
    order("dopamine", "DOPAMINE//DOPA400D", {"sepsis.septic_shock": 0.2, "heart.cardiogenic_shock": 0.4,
                                             "cardiac_surgery": 0.1}, rank=0.8),
    order("stress_steroid", {"HYDROCORTISONE NA SUCC.//HC100I": 0.7,
                             "HYDROCORTISONE NA SUCC.//HC100I ; COSYNTROPIN//COSY25I": 0.3},
          {"sepsis.septic_shock": 0.35}, rank=1.5),
    order("cosyntropin", "COSYNTROPIN//COSY25I", {"sepsis.septic_shock": 0.15, "sepsis": 0.05}, rank=2),
    order("vancomycin", {"VANCOMYCIN//VANC1F": 0.55, "VANCOMYCIN HCL//VANC1F": 0.3,
                         "VANCOMYCIN//VANC1F ; VANCOMYCIN HCL//VANC1F": 0.15},
          {"sepsis": 0.75, "general.cellulitis": 0.5, "respiratory.bacterial_pneumonia": 0.6,
           "respiratory.pneumonia": 0.3,
           "cardiac_surgery": 0.3, "liver_gi.c_difficile": 0.4, "sepsis.c_difficile": 0.4, "oncology.neutropenia": 0.5,
           "trauma.brain_injury": 0.1}, base=(0.04, 0.0), rank=1),
    order("piperacillin_tazobactam", {"PIPERACILLIN-TAZOBACTAM NA//ZOSY4FPB": 0.55,
                                      "PIPERACILLIN-TAZOBACTAM NA//ZOSY2.25I": 0.45},
          {"sepsis": 0.35, "respiratory.bacterial_pneumonia": 0.4, "respiratory.aspiration": 0.35,
           "oncology.neutropenia": 0.3}, rank=1),
    order("cefepime", "CEFEPIME//CEFE2I", {"sepsis": 0.2, "oncology.neutropenia": 0.4}, rank=1),
    order("meropenem", {"MEROPENEM//MERO1I": 0.5, "MEROPENEM//MERO500I": 0.5}, {"sepsis.septic_shock": 0.15}, rank=1),
    order("ceftriaxone", "CEFTRIAXONE//CEFX1F", {"respiratory.pneumonia": 0.45, "sepsis.pneumonia": 0.3,
                                                 "general.uti": 0.3, "sepsis.uti": 0.3, "liver_gi.sbp": 0.7,
                                                 "liver_gi.gi_bleed": 0.15}, base=(0.04, 0.0), rank=1),
    order("levofloxacin", {"LEVOFLOXACIN//LEV250": 0.5, "LEVOFLOXACIN//LEVO500PM": 0.5},
          {"respiratory.pneumonia": 0.35, "respiratory.copd": 0.1, "sepsis.pneumonia": 0.2}, base=(0.03, 0.0), rank=1),
    order("azithromycin", "AZITHROMYCIN//ZITHR250", {"respiratory.pneumonia": 0.35, "respiratory.copd": 0.1}, rank=1),
    order("ciprofloxacin", {"CIPROFLOXACIN HCL//CIPR500": 0.6, "CIPROFLOXACIN IV//CIPR400PM": 0.4},
          {"general.uti": 0.35, "sepsis.uti": 0.35, "liver_gi.sbp": 0.2}, base=(0.03, 0.0), rank=1),
    order("metronidazole", {"METRONIDAZOLE//METR500PM": 0.6, "METRONIDAZOLE (FLAGYL)//METR500PM": 0.4},
          {"liver_gi.c_difficile": 0.8, "sepsis.c_difficile": 0.8, "sepsis": 0.15, "respiratory.aspiration": 0.2,
           "general.diarrhea": 0.2}, base=(0.02, 0.0), rank=1),
    order("bicarbonate", "SODIUM BICARBONATE//NABC50I", {"renal.acidosis": 0.45, "sepsis.acidosis": 0.35}, rank=2),
    # Respiratory.
    order("albuterol", {"ALBUTEROL 0.083% NEB SOLN//ALBU3H": 0.8, "ALBUTEROL INHALER//PROAIR8.5H": 0.2},
          {"respiratory": 0.45, "respiratory.copd": 0.5, "respiratory.asthma": 0.7, "sepsis.respiratory_failure": 0.3},
          base=(0.12, 0.0), rank=2),
    order("ipratropium", {"IPRATROPIUM BROMIDE NEB//IPRA2H": 0.8, "IPRATROPIUM BROMIDE MDI//IPRAPF": 0.2},
          {"respiratory": 0.4, "respiratory.copd": 0.5, "sepsis.respiratory_failure": 0.25}, base=(0.1, 0.0),
          rank=2),
    order("prednisone", {"PREDNISONE//PRED20": 0.6, "PREDNISONE//PRED10": 0.4},
          {"respiratory.copd": 0.3, "respiratory.asthma": 0.4, "general.rheumatoid_arthritis": 0.5}, base=(0.04, 0.0),
          rank=2),
    order("methylprednisolone", "METHYLPREDNISOLONE SODIUM SUCC//METH125I", {"respiratory.copd": 0.15,
                                                                             "respiratory.asthma": 0.2}, rank=1),
    order("acetylcysteine", "ACETYLCYSTEINE 20%//ACET20/4I", {"respiratory.respiratory_failure": 0.2,
                                                              "psychiatric.self_poisoning": 0.5,
                                                              "substance.overdose": 0.3}, base=(0.04, 0.0), rank=2),
    order("tiotropium", "TIOTROPIUM BROMIDE//TIOT18", {"respiratory.copd": 0.12}, rank=4),
    # Renal, liver and gastrointestinal.
    order("phosphate_binder", {"SEVELAMER//SEVE800": 0.6, "CALCIUM ACETATE//CALA667": 0.4},
          {"renal.ckd": 0.2, "renal.hyperparathyroidism": 0.4}, rank=3),
    order("epoetin", "EPOETIN ALFA//EPOE20I", {"renal.ckd_anemia": 0.4, "renal.ckd": 0.06}, rank=3),
    order("nephrocaps", "NEPHROCAPS//NEPH1", {"renal.ckd": 0.12}, rank=4),
    order("kayexalate", "SODIUM POLYSTYRENE SULFONATE//KAYE15L", {"renal.hyperkalemia": 0.6, "heart.hyperkalemia": 0.5,
                                                                  "sepsis.electrolytes": 0.1}, rank=2),
    order("lactulose", "LACTULOSE//LACT30L", {"liver_gi.cirrhosis": 0.5, "liver_gi.encephalopathy": 0.95},
          base=(0.06, 0.0), rank=2),
    order("rifaximin", "RIFAXIMIN//RIFA550", {"liver_gi.encephalopathy": 0.6, "liver_gi.cirrhosis": 0.1}, rank=3),
    order("octreotide", "OCTREOTIDE ACETATE//OCTR50I", {"liver_gi.varices": 0.4, "liver_gi.gi_bleed": 0.2,
                                                        "liver_gi.hepatorenal": 0.6}, rank=1),
    order("albumin", "ALBUMIN 25% (12.5G/50ML)//ALBU25I", {"liver_gi.sbp": 0.6, "liver_gi.hepatorenal": 0.7,
                                                          "liver_gi.ascites": 0.25}, rank=1),
    order("nadolol", "NADOLOL//NADO20", {"liver_gi.varices": 0.3}, rank=3),
    order("vitamin_k", "PHYTONADIONE//PHYT10I", {"liver_gi.coagulopathy": 0.45, "heart.anticoagulation": 0.05,
                                                 "cardiac_surgery.procedure_hemorrhage": 0.2}, base=(0.03,
                                                                                                     0.0), rank=2),
    order("omeprazole", "OMEPRAZOLE//OMEP20", {"general.gerd": 0.35, "liver_gi.gerd": 0.35}, rank=3),
    # Endocrine, neurology, psychiatry, oncology, substance use.
    order("levothyroxine", "LEVOTHYROXINE SODIUM//LEVO25", {"general.hypothyroidism": 0.85}, base=(0.01, 0.0), rank=3),
    order("antiepileptic", {"LEVETIRACETAM//LEVE500": 0.6, "PHENYTOIN SODIUM//PHEN100I": 0.4},
          {"neuro.epilepsy": 0.75, "trauma.brain_injury": 0.5, "falls.subdural": 0.5, "substance.seizure": 0.5,
           "neuro.stroke": 0.08}, rank=2),
    order("antidepressant", {"CITALOPRAM HYDROBROMIDE//CITA20": 0.35, "SERTRALINE//SERT50": 0.3,
                             "DULOXETINE//DULO30": 0.15, "MIRTAZAPINE//MIRT15": 0.2},
          {"general.depression": 0.65, "psychiatric.depression": 0.7, "psychiatric.anxiety": 0.3}, rank=4),
    order("antipsychotic", {"QUETIAPINE FUMARATE//QUET25": 0.5, "OLANZAPINE (DISINTEGRATING TABLET)//OLAN5DTB": 0.5},
          {"psychiatric.bipolar_psychosis": 0.8, "general.delirium": 0.25, "neuro.dementia": 0.2}, rank=3),
    order("baclofen", "BACLOFEN//BACL10", {"neuro.hemiplegia": 0.2, "trauma.spine_fracture": 0.3}, base=(0.02, 0.0),
          rank=4),
    order("thiamine_folate", {"THIAMINE//THIA100I ; FOLIC ACID//FOLI1": 0.7, "THIAMINE//THIA100I": 0.3},
          {"substance.alcohol": 0.7, "liver_gi.cirrhosis": 0.25, "trauma.alcohol": 0.5}, rank=2),
    order("nicotine", "NICOTINE PATCH//NICO14P", {"substance.tobacco": 0.5, "respiratory.tobacco": 0.4,
                                                  "general.tobacco_history": 0.05}, rank=4),
    order("naloxone", "NALOXONE//NALO4I", {"substance.overdose": 0.5, "psychiatric.self_poisoning": 0.3}, rank=1),
    order("dexamethasone", "DEXAMETHASONE//DEXA4I", {"oncology.metastasis": 0.3, "neuro.brain_swelling": 0.5}, rank=2),
    order("filgrastim", "FILGRASTIM//NEUP300I", {"oncology.neutropenia": 0.4}, rank=2),
    order("allopurinol", "ALLOPURINOL//ALLO100", {"general.gout": 0.6, "oncology": 0.08}, rank=4),
    order("tamsulosin", "TAMSULOSIN//FLOM4", {"general.bph": 0.55, "general.urinary_retention": 0.4}, rank=4),
    order("tetanus", "TETANUS-DIPHTHERIA TOX ADSORBED//TD0.5I", {"trauma.open_wound": 0.6, "trauma": 0.1}, rank=3),
    # Obstetrics.
    order("oxytocin", "OXYTOCIN//OXYT30I", {"obstetric.delivered": 0.8, "obstetric.outcome": 0.5}, rank=1),
    order("ibuprofen", "IBUPROFEN//IBUP600", {"obstetric": 0.7}, rank=2),
    order("methylergonovine", "METHYLERGONOVINE MALEATE//METH0.2I", {"obstetric.postpartum_hemorrhage": 0.5}, rank=1),
    # Newborns (none in the adult demo: public NICU practice).
    order("neonatal_vitamin_k", "PHYTONADIONE (NEONATAL)//PHYT1NI", base=(0.0, 0.92), rank=0),
    order("eye_prophylaxis", "ERYTHROMYCIN 0.5% OPHTH OINT//ERYT35O", base=(0.0, 0.9), rank=0),
    order("hepatitis_b_vaccine_med", "HEPATITIS B VACCINE (PEDIATRIC)//HEPB10I", {"neonatal.hepatitis_b_vaccine": 0.9},
          rank=1),
    order("neonatal_antibiotics", "AMPICILLIN SODIUM//AMPI500I ; GENTAMICIN (NEONATAL)//GENT10NI",
          {"neonatal.observation_infection": 0.3, "neonatal.newborn_sepsis": 0.95, "preterm": 0.5}, rank=1),
    order("caffeine", "CAFFEINE CITRATE//CAFF20I", {"preterm.apnea": 0.85, "preterm": 0.2}, rank=2),
    order("neonatal_iron", "FERROUS SULFATE (NEONATAL)//FERR15NL", {"preterm": 0.35, "preterm.anemia_prematurity": 0.6},
          rank=3),
    order("neonatal_vitamins", "POLY-VI-SOL//POLY1NL", {"preterm": 0.3}, rank=3),
    order("surfactant", "BERACTANT//BERA4NI", {"preterm.respiratory_distress": 0.6}, rank=0.5),
    order("circumcision_analgesia", "SUCROSE 24%//SUCR24NL ; LIDOCAINE 1%//LIDO1NI", {"neonatal.circumcision": 0.8},
          rank=3),
)

# ======================================================================================
# The tables compiled to arrays (independent of the sampling seed; built once per process)
# ======================================================================================


def _range_mask(letters: np.ndarray, numbers: np.ndarray, ranges: tuple[str, ...]) -> np.ndarray:
    """bool [n]: which categories (split as letter "", "V" or "E" and number) fall in the ranges."""
    mask = np.zeros(len(numbers), dtype=bool)
    for r in ranges:
        lo, hi = r.split("-")
        letter = lo[0] if lo[0] in "VE" else ""
        mask |= (letters == letter) & (numbers >= int(lo[len(letter):])) & (numbers <= int(hi[len(letter):]))
    return mask


@dataclass(frozen=True)
class _Compiled:
    """PHENOTYPES as arrays. P phenotypes, K conditions, W variants, E tail entries, V codes, C
    demographic classes (distinct sets of CMS-allowed codes over whole-year ages 0-124 and both
    sexes)."""

    vocab: np.ndarray  # object [V]: codes, in the compiled code system
    n_source: int  # codes of the process's ICD-9-CM vocabulary
    dropped: tuple  # those with no billable code in the compiled system, sorted
    grid_class: np.ndarray  # int [125, 2]: class of (whole-year age, male)
    # phenotypes
    ph_lo: np.ndarray  # int [P]: eligible whole-year ages
    ph_hi: np.ndarray
    ph_sex: np.ndarray  # int [P]: -1 both, 0 F only, 1 M only
    ph_lin: np.ndarray  # float [P, 3]: logit, age slope, male
    ph_boost: np.ndarray  # float [P, P]: [source, target] logit increment
    ph_episode: np.ndarray  # float [P, 3]: first, keep, new
    ph_readmit: np.ndarray  # float [P]
    ph_tail_rank: np.ndarray  # float [P]
    fallback: np.ndarray  # int [2]: phenotype that fills an empty admission (adult, neonate)
    # conditions and their variants
    c_pheno: np.ndarray  # int [K]
    c_prob: np.ndarray  # float [3, K]: p_first, p_keep, p_new
    c_rank: np.ndarray  # float [K]
    c_progress: np.ndarray  # float [K]
    req_levels: tuple  # of (conditions [k], their required conditions [k]), in dependency order
    c_possible: np.ndarray  # bool [C, K]: some variant is allowed
    v_start: np.ndarray  # int [K]: first variant of each condition (variants are contiguous)
    v_codes: np.ndarray  # int [W, L]: code ids of each variant, -1 padded
    v_next: np.ndarray  # int [W]: progression target (itself if none)
    v_allowed: np.ndarray  # bool [C, W]
    v_flat: np.ndarray  # float [C * W]: (c * K + k) + cumulative weight within (c, k); see _sample_variants
    # long tail
    tail_rate: np.ndarray  # float [C, P]: mean tail entries per active admission (0: no allowed entry)
    tail_flat: np.ndarray  # float [C * E]: (c * P + p) + cumulative entry weight, over each (c, p) pool
    tail_codes: np.ndarray  # int [E, 2]: code ids of each tail entry, -1 for a single code's second
    # exclusions: in an admission holding excl_key[j], drop excl_drop[j]
    excl_key: np.ndarray
    excl_drop: np.ndarray


def _tail_pools(cat: np.ndarray, uses: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The tail entries of every phenotype (see the module docstring), from the tail codes'
    categories ``cat`` (int [T], non-decreasing: codes grouped by category) and ``uses`` (bool
    [P, G]: category g lies in phenotype p's tail ranges). Returns per phenotype (entries [e, 2]
    of tail code indices, -1 for the missing second code of a single-code entry; weights [e])."""
    G = len(uses[0])
    size = np.bincount(cat, minlength=G)
    block = np.clip(size // np.maximum(uses.sum(axis=0), 1), 1, PARAMS.tail_codes + 1)  # [G]: codes per user
    start = np.r_[0, np.cumsum(size)[:-1]].astype(np.int64)
    # Tail code indices by category, in a fixed shuffled order inside each category.
    order = np.lexsort((np.random.default_rng(PARAMS.structure_seed).random(len(cat)), cat))
    rngs = [np.random.default_rng([PARAMS.structure_seed, zlib.crc32(ph.name.encode())]) for ph in PHENOTYPES]
    keys = np.where(uses, np.stack([r.random(G) for r in rngs]), np.inf)
    slot = np.argsort(np.argsort(keys, axis=0, kind="stable"), axis=0, kind="stable")  # [P, G]: block of p in g
    free = uses.sum(axis=0) * block  # [G]: first position after all the category's blocks
    pools = []
    for p, rng in enumerate(rngs):
        g = np.flatnonzero(uses[p])
        n_cat, n = len(g), size[g]
        cat_w = (1.0 + rng.permutation(n_cat) + PARAMS.zipf_q) ** -PARAMS.zipf_s
        b = block[g]
        k = np.minimum(b, PARAMS.tail_codes)
        share = PARAMS.pair_share if n_cat > 1 else 0.0
        r = np.arange(PARAMS.tail_codes)
        single = r[None, :] < k[:, None]  # [n_cat, tail_codes]
        within = np.where(single, (r + 1.0) ** -PARAMS.zipf_within, 0.0)
        within /= within.sum(axis=1, keepdims=True)
        at = start[g, None] + (slot[p, g, None] * b[:, None] + r[None, :]) % n[:, None]
        entries = [np.stack([order[at[single]], np.full(int(single.sum()), -1)], axis=1)]
        weights = [(cat_w[:, None] * (1.0 - share) * within)[single]]
        if share > 0:
            gumbel = np.log(cat_w)[None, :] + rng.gumbel(size=(n_cat, n_cat))
            np.fill_diagonal(gumbel, -np.inf)
            y = g[gumbel.argmax(axis=1)]  # partner category of each category
            first = start[g] + (slot[p, g] * b + b - 1) % n  # the block's last code
            spare = size[y] - free[y]
            u = rng.random(n_cat)
            second = start[y] + np.where(spare > 0, free[y] + (u * np.maximum(spare, 1)).astype(np.int64),
                                         (u * size[y]).astype(np.int64))
            entries.append(np.stack([order[first], order[second]], axis=1))
            weights.append(cat_w * share)
        pools.append((np.concatenate(entries), np.concatenate(weights)))
    return pools


def _segment_cumsum(weights: np.ndarray, seg_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-segment normalised cumulative weights of a [C, N] weight matrix whose columns form
    segments of lengths seg_len; returns (cum [C, N] in (0, 1], segment sums [C, S])."""
    starts = np.r_[0, np.cumsum(seg_len)[:-1]]
    sums = np.add.reduceat(weights, starts, axis=1) if weights.shape[1] else np.zeros((weights.shape[0], 0))
    cum = np.cumsum(weights, axis=1)
    cum -= np.repeat(np.cumsum(sums, axis=1) - sums, seg_len, axis=1)
    denom = np.repeat(sums, seg_len, axis=1)
    return np.minimum(np.divide(cum, denom, out=np.ones_like(cum), where=denom > 0), 1.0), sums


def _billable_targets(codes: list[str], code_system: str) -> list[str]:
    """The code each ICD-9-CM code is written as in ``code_system``: itself in ICD-9-CM; in
    ICD-10-CM the first of its GEM targets that is billable, else the billable form
    (``icd10.billable_form``) of the first target that has one, ``""`` when none has."""
    if code_system == icd9.SYSTEM:
        return list(codes)
    out = []
    for c in codes:
        targets = icd10.from_icd9(c)
        billable = next((t for t in targets if icd10.is_billable(t)), None)
        out.append(billable or next(filter(None, map(icd10.billable_form, targets)), ""))
    return out


@functools.cache
def _compiled(code_system: str = DEFAULT_CODE_SYSTEM) -> _Compiled:

    names = [ph.name for ph in PHENOTYPES]
    conds = [(p, c) for p, ph in enumerate(PHENOTYPES) for c in ph.conditions]
    variants = [(k, v) for k, (_, c) in enumerate(conds) for v in c.variants]
    core = sorted({code for _, v in variants for code in v.split()})
    bad = [c for c in core if not icd9.is_billable(c)]
    if bad:
        raise ValueError(f"simulator tables: {bad} are not billable ICD-9-CM v32 codes")
    core_set = set(core)
    tail_codes = sorted((c for c in icd9.billable_codes() if c not in core_set), key=lambda c: (icd9.category(c), c))
    cats = [icd9.category(c) for c in tail_codes]
    distinct, cat = np.unique(np.array(cats), return_inverse=True)
    letters = np.array([c[0] if c[0] in "VE" else "" for c in distinct])
    numbers = np.array([int(c[1:]) if c[0] in "VE" else int(c) for c in distinct])
    uses = np.stack([_range_mask(letters, numbers, ph.tail) for ph in PHENOTYPES])
    pools, weights = zip(*_tail_pools(cat, uses))
    used = np.unique(np.concatenate([e[e >= 0] for e in pools]))
    source = core + sorted(tail_codes[i] for i in used)  # the process's ICD-9-CM vocabulary
    # Each ICD-9-CM code is mapped once here; the draws below only see code ids, -1 = dropped.
    target = _billable_targets(source, code_system)
    vocab = list(dict.fromkeys(t for t in target if t))  # in ICD-9-CM: the source, in its order
    index = {c: i for i, c in enumerate(vocab)}
    code_id = {c: index[t] if t else -1 for c, t in zip(source, target)}
    dropped = tuple(sorted(c for c, t in zip(source, target) if not t))

    # Demographic classes: the CMS-allowed code set for each whole-year age and sex, by the
    # edits of the system the codes are written in.
    icd = code_systems.code_system(code_system)
    edit_class = [icd.edit_of(c) or "" for c in vocab]
    classes = sorted(set(edit_class) - {""})
    reps = [edit_class.index(e) for e in classes]
    ages = np.repeat(np.arange(125.0), 2)
    sexes = np.tile(np.array(SEXES, dtype=object), 125)
    ok = np.ones((250, len(classes) + 1), dtype=bool)
    for j, r in enumerate(reps):
        ok[:, j + 1] = icd.violations([vocab[r]] * 250, ages, sexes) == ""
    rows, grid = np.unique(ok, axis=0, return_inverse=True)
    cls_of_code = np.array([0 if e == "" else classes.index(e) + 1 for e in edit_class])
    allowed = rows[:, cls_of_code]  # [C, V]
    n_cls = len(rows)

    P, K = len(PHENOTYPES), len(conds)
    L = max(len(v.split()) for _, v in variants)
    v_codes = np.full((len(variants), L), -1, dtype=np.int64)
    for w, (_, v) in enumerate(variants):
        ids = list(dict.fromkeys(i for i in (code_id[c] for c in v.split()) if i >= 0))
        v_codes[w, : len(ids)] = ids
    n_var = np.array([len(c.variants) for _, c in conds], dtype=np.int64)
    v_start = np.r_[0, np.cumsum(n_var)[:-1]].astype(np.int64)
    v_index = {(k, v): w for w, (k, v) in enumerate(variants)}
    v_next = np.arange(len(variants))
    for k, (_, c) in enumerate(conds):
        for a, b in c.progress.items():
            v_next[v_index[k, a]] = v_index[k, b]
    v_allowed = np.where(v_codes[None] >= 0, allowed[:, np.maximum(v_codes, 0)], True).all(axis=2)
    v_allowed &= (v_codes >= 0).any(axis=1)  # a variant whose every code was dropped writes nothing
    v_weight = np.array([conds[k][1].variants[v] for k, v in variants]) * v_allowed
    cum, sums = _segment_cumsum(v_weight, n_var)
    seg = (np.arange(n_cls)[:, None] * K + np.repeat(np.arange(K), n_var)[None, :]).astype(np.float64)

    cond_index = {(p, c.name): k for k, (p, c) in enumerate(conds)}
    req = np.array([cond_index[p, c.requires] if c.requires else -1 for p, c in conds])
    depth = np.zeros(K, dtype=np.int64)
    for k in range(K):  # requirements point to earlier conditions of the same phenotype
        if req[k] >= 0:
            if req[k] >= k:
                raise ValueError(f"condition {conds[k][1].name}: requires a later condition")
            depth[k] = depth[req[k]] + 1
    levels = tuple((np.flatnonzero(depth == d), req[depth == d]) for d in range(1, depth.max() + 1))

    tail_id = np.zeros(len(tail_codes), dtype=np.int64)  # tail code index -> code id
    tail_id[used] = [code_id[tail_codes[i]] for i in used]
    entries = np.concatenate(pools)
    t_codes = np.where(entries >= 0, tail_id[np.maximum(entries, 0)], -1)  # [E, 2]
    t_codes[t_codes[:, 1] == t_codes[:, 0], 1] = -1  # a pair mapped onto one code is that code
    pool_w = np.concatenate(weights)
    pool_len = np.array([len(w) for w in weights])
    t_weight = pool_w[None, :] * np.where(t_codes[None] >= 0, allowed[:, np.maximum(t_codes, 0)], True).all(axis=2)
    t_weight *= (t_codes >= 0).any(axis=1)  # an entry whose codes were all dropped is never drawn
    tcum, tsums = _segment_cumsum(t_weight, pool_len)  # [C, E], [C, P]
    t_code_sums = _segment_cumsum(t_weight * (t_codes >= 0).sum(axis=1), pool_len)[1]
    codes_per_entry = np.divide(t_code_sums, tsums, out=np.ones_like(tsums), where=tsums > 0)  # [C, P]
    tseg = np.arange(n_cls)[:, None] * P + np.repeat(np.arange(P), pool_len)[None, :]

    boost = np.zeros((P, P))
    for t, ph in enumerate(PHENOTYPES):
        for src, b in ph.boosts.items():
            if names.index(src) >= t:
                raise ValueError(f"phenotype {ph.name}: boost from {src}, which is not an earlier phenotype")
            boost[names.index(src), t] = b
    # An exclusion whose codes were dropped, or mapped onto one code, has nothing to exclude.
    excl = [(code_id[a], code_id[b]) for a, drops in EXCLUDES.items() for b in drops
            if min(code_id[a], code_id[b]) >= 0 and code_id[a] != code_id[b]]
    return _Compiled(
        vocab=np.array(vocab, dtype=object),
        n_source=len(source),
        dropped=dropped,
        grid_class=grid.reshape(125, 2),
        ph_lo=np.array([ph.ages[0] for ph in PHENOTYPES]),
        ph_hi=np.array([ph.ages[1] for ph in PHENOTYPES]),
        ph_sex=np.array([SEXES.index(ph.sex) if ph.sex else -1 for ph in PHENOTYPES]),
        ph_lin=np.array([[ph.logit, ph.age_slope, ph.male] for ph in PHENOTYPES]),
        ph_boost=boost,
        ph_episode=np.array([ph.episode for ph in PHENOTYPES]),
        ph_readmit=np.array([ph.readmit for ph in PHENOTYPES]),
        ph_tail_rank=np.array([ph.tail_rank for ph in PHENOTYPES]),
        fallback=np.array([names.index("background"), names.index("neonatal")]),
        c_pheno=np.array([p for p, _ in conds], dtype=np.int64),
        c_prob=np.array([[c.p_first for _, c in conds], [c.p_keep for _, c in conds], [c.p_new for _, c in conds]]),
        c_rank=np.array([c.rank for _, c in conds]),
        c_progress=np.array([c.p_progress for _, c in conds]),
        req_levels=levels,
        c_possible=sums > 0,
        v_start=v_start,
        v_codes=v_codes,
        v_next=v_next,
        v_allowed=v_allowed,
        v_flat=(seg + cum).ravel(),
        tail_rate=np.array([ph.tail_rate for ph in PHENOTYPES])[None, :] * (tsums > 0) / codes_per_entry,
        tail_flat=(tseg + tcum).ravel(),
        tail_codes=t_codes,
        excl_key=np.array([a for a, _ in excl], dtype=np.int64),
        excl_drop=np.array([b for _, b in excl], dtype=np.int64),
    )


@dataclass(frozen=True)
class _TimeTables:
    """TIMES as arrays over PHENOTYPES [P] and their conditions [K] (the order of _compiled's
    conditions); independent of the code system, so both code systems draw the same times."""

    ph_effects: np.ndarray  # float [P, 2]: (death, stay) of an active phenotype
    c_effects: np.ndarray  # float [K, 2]: (death, stay) of a condition that happened
    later_effects: np.ndarray  # float [P, 2]: a member's expected (death, stay) at an admission after the first
    ph_gap: np.ndarray  # float [P]
    ph_after: np.ndarray
    ph_after_days: np.ndarray


def _stationary(first: np.ndarray, keep: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Long-run P(on) of the two-state chain P(on | on) = keep, P(on | off) = new (first if it
    never switches)."""
    denom = 1.0 - keep + new
    return np.where(denom > 0, new / np.where(denom > 0, denom, 1.0), first)


@functools.cache
def _time_tables() -> _TimeTables:
    names = [ph.name for ph in PHENOTYPES]
    conds = [(p, c) for p, ph in enumerate(PHENOTYPES) for c in ph.conditions]
    cond_index = {(p, c.name): k for k, (p, c) in enumerate(conds)}
    P, K = len(PHENOTYPES), len(conds)
    ph = {key: np.zeros(P) for key in ("death", "stay", "gap", "after", "after_days")}
    c_death, c_stay = np.zeros(K), np.zeros(K)
    for name, eff in TIMES.items():
        if name not in names:
            raise ValueError(f"TIMES: unknown phenotype {name}")
        p = names.index(name)
        for key in ph:
            ph[key][p] = getattr(eff, key)
        for cname, (d, st) in eff.conditions.items():
            if (p, cname) not in cond_index:
                raise ValueError(f"TIMES[{name}]: {name} has no condition {cname}")
            c_death[cond_index[p, cname]], c_stay[cond_index[p, cname]] = d, st
    # A later admission: its phenotypes and conditions are not known code-system-free (see the
    # module docstring), so it takes their expected effect: P(active) and P(coded | active) at
    # their long-run level, a required condition's probability multiplied in.
    episode = np.array([ph_.episode for ph_ in PHENOTYPES])
    on = _stationary(*episode.T)
    c_on = _stationary(*np.array([[c.p_first, c.p_keep, c.p_new] for _, c in conds]).T)
    req = [cond_index[p, c.requires] if c.requires else -1 for p, c in conds]
    for k in range(K):  # requirements name earlier conditions
        if req[k] >= 0:
            c_on[k] *= c_on[req[k]]
    c_pheno = np.array([p for p, _ in conds], dtype=np.int64)
    later = {}
    for key, c_eff in (("death", c_death), ("stay", c_stay)):
        later[key] = on * (ph[key] + np.bincount(c_pheno, weights=c_on * c_eff, minlength=P))
    return _TimeTables(ph_effects=np.stack([ph["death"], ph["stay"]], axis=1),
                       c_effects=np.stack([c_death, c_stay], axis=1),
                       later_effects=np.stack([later["death"], later["stay"]], axis=1),
                       ph_gap=ph["gap"], ph_after=ph["after"], ph_after_days=ph["after_days"])


@dataclass(frozen=True)
class _Orders:
    """One modality's orders (PROCEDURES or MEDICATIONS) as arrays. O orders, W variants, F causes
    (adult, neonate, the P phenotypes active, the K conditions coded, in _compiled's order)."""

    hazard: np.ndarray  # float [F, O]: -log(1 - p) of each cause of each order
    possible: np.ndarray  # bool [2, O]: some variant is allowed for sex F (0) / M (1)
    rank: np.ndarray  # float [O]
    v_start: np.ndarray  # int [O]: first variant of each order (variants are contiguous)
    v_end: np.ndarray  # int [O]: one past its last
    v_codes: np.ndarray  # int [W, L]: code ids of each variant, -1 padded
    v_flat: np.ndarray  # float [2 * W]: (sex * O + o) + cumulative weight within (sex, o)
    vocab: np.ndarray  # object [V]: codes, in the modality's code system
    dropped: tuple  # ICD-9-CM procedure codes without a PCS_CODES code, when writing ICD-10-PCS
    tail_cum: np.ndarray  # float [2, T]: sex (F 0, M 1) + cumulative background-code weight (T = 0: none)
    tail_ids: np.ndarray  # int [T]: their code ids in vocab


def _order_targets(modality: str, codes: list[str], code_system: str) -> list[str]:
    """The code each table code is written as: a medication code itself; an ICD-9-CM procedure
    code itself with ICD-9-CM diagnoses, its PCS_CODES code ("" for none) with ICD-10-CM ones.
    ValueError for a code that is not valid in its table."""
    if modality == "medications":
        bad = [c for c in codes if not medications.is_valid(c)]
        if bad:
            raise ValueError(f"simulator MEDICATIONS: {bad} are not medication codes '<NAME>//<FORMULARY>'")
        return list(codes)
    bad = [c for c in codes if not ICD9PROC.is_billable(c)]
    if bad:
        raise ValueError(f"simulator PROCEDURES: {bad} are not billable ICD-9-CM v32 procedure codes")
    system = procedure_system(FOR_DIAGNOSES[code_system])
    if system is ICD9PROC:
        return list(codes)
    missing = [c for c in codes if c not in PCS_CODES]
    if missing:
        raise ValueError(f"simulator PCS_CODES: no entry for {missing}")
    bad = [PCS_CODES[c] for c in codes if PCS_CODES[c] and not system.is_billable(PCS_CODES[c])]
    if bad:
        raise ValueError(f"simulator PCS_CODES: {bad} are not billable {system.label} codes")
    return [PCS_CODES[c] for c in codes]


@functools.cache
def _orders(modality: str, code_system: str = DEFAULT_CODE_SYSTEM) -> _Orders:
    table = {"procedures": PROCEDURES, "medications": MEDICATIONS}[modality]
    names = [ph.name for ph in PHENOTYPES]
    conds = [(p, c) for p, ph in enumerate(PHENOTYPES) for c in ph.conditions]
    cause = {name: 2 + p for p, name in enumerate(names)}
    cause |= {f"{PHENOTYPES[p].name}.{c.name}": 2 + len(names) + k for k, (p, c) in enumerate(conds)}
    n_orders = len(table)
    hazard = np.zeros((2 + len(names) + len(conds), n_orders))
    for o, od in enumerate(table):
        probs = [*od.base, *od.given.values()]
        if not all(0.0 <= p < 1.0 for p in probs):
            raise ValueError(f"simulator {modality} order {od.name}: probabilities must be in [0, 1)")
        unknown = [key for key in od.given if key not in cause]
        if unknown:
            raise ValueError(f"simulator {modality} order {od.name}: unknown phenotype or condition {unknown}")
        hazard[[0, 1], o] = -np.log1p(-np.array(od.base))
        for key, p in od.given.items():
            hazard[cause[key], o] += -np.log1p(-p)
    variants = [(o, v.split(" ; ") if modality == "medications" else v.split())
                for o, od in enumerate(table) for v in od.variants]
    source = list(dict.fromkeys(c for _, v in variants for c in v))
    n_table = len(source)
    if modality == "procedures":  # the background codes, in their seeded order
        table_codes = set(source)
        tail = [c for c in ICD9PROC.billable_codes() if c not in table_codes]
        perm = np.random.default_rng([PARAMS.structure_seed, zlib.crc32(b"procedures")]).permutation(len(tail))
        source += [tail[i] for i in perm]
    target = _order_targets(modality, source[:n_table], code_system)
    # The background codes have no ICD-10-PCS code (PCS_CODES covers the tables only).
    target += source[n_table:] if FOR_DIAGNOSES[code_system] == ICD9PROC.SYSTEM else [""] * (len(source) - n_table)
    vocab = list(dict.fromkeys(t for t in target if t))
    index = {c: i for i, c in enumerate(vocab)}
    code_id = {c: index[t] if t else -1 for c, t in zip(source, target)}
    L = max(len(v) for _, v in variants)
    v_codes = np.full((len(variants), L), -1, dtype=np.int64)
    for w, (_, v) in enumerate(variants):
        ids = list(dict.fromkeys(i for i in (code_id[c] for c in v) if i >= 0))
        v_codes[w, : len(ids)] = ids
    # Sex edits (procedures only have those): codes allowed for F (row 0) and M (row 1).
    allowed = np.ones((2, len(vocab)), dtype=bool)
    if modality == "procedures":
        system = procedure_system(FOR_DIAGNOSES[code_system])
        for s, sex in enumerate(SEXES):
            allowed[s] = system.violations(vocab, 40.0, sex) == ""
    v_allowed = np.where(v_codes[None] >= 0, allowed[:, np.maximum(v_codes, 0)], True).all(axis=2)
    v_allowed &= (v_codes >= 0).any(axis=1)  # a variant whose every code was dropped writes nothing
    n_var = np.array([len(od.variants) for od in table], dtype=np.int64)
    v_start = np.r_[0, np.cumsum(n_var)[:-1]].astype(np.int64)
    weight = np.array([w for od in table for w in od.variants.values()]) * v_allowed
    cum, sums = _segment_cumsum(weight, n_var)
    seg = (np.arange(2)[:, None] * n_orders + np.repeat(np.arange(n_orders), n_var)[None, :]).astype(np.float64)
    tail_ids = np.array([code_id[c] for c in source[n_table:]], dtype=np.int64)
    MP = MODALITY_PARAMS
    tail_w = (np.arange(1.0, len(tail_ids) + 1) + MP.tail_q) ** -MP.tail_s * (tail_ids >= 0)
    tail_w = tail_w * allowed[:, np.maximum(tail_ids, 0)]  # [2, T]
    tail_cum = np.arange(2)[:, None] + np.cumsum(tail_w, axis=1) / np.maximum(tail_w.sum(axis=1, keepdims=True), 1e-300)
    return _Orders(tail_cum=tail_cum, tail_ids=tail_ids, hazard=hazard, possible=sums > 0,
                   rank=np.array([od.rank for od in table]), v_start=v_start,
                   v_end=v_start + n_var, v_codes=v_codes, v_flat=(seg + cum).ravel(),
                   vocab=np.array(vocab, dtype=object),
                   dropped=tuple(sorted(c for c, t in zip(source[:n_table], target) if not t)))


# ======================================================================================
# Sampling
# ======================================================================================


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _sample_variants(S: _Compiled, rng: np.random.Generator, cls: np.ndarray) -> np.ndarray:
    """int [n, K]: each patient's variant (global index) of every condition, drawn by weight
    among the variants its class allows (inverse CDF by one searchsorted over all segments)."""
    K = len(S.v_start)
    n_var = np.diff(np.r_[S.v_start, len(S.v_next)])
    var = np.broadcast_to(S.v_start, (len(cls), K)).copy()
    multi = np.flatnonzero(n_var > 1)
    seg = cls[:, None] * K + multi[None, :]
    pos = np.searchsorted(S.v_flat, seg + rng.random(seg.shape), side="right")
    var[:, multi] = np.minimum(pos - cls[:, None] * len(S.v_next), S.v_start[multi] + n_var[multi] - 1)
    return var


def _sample_block(rng: np.random.Generator, n: int, first_subject_id: int, code_system: str,
                  times_rng: np.random.Generator | None = None,
                  modality_rngs: dict[str, np.random.Generator] | None = None) -> list[dict]:
    """n patients (see the module docstring) in ``code_system``; subject_ids first_subject_id,
    first_subject_id + 1, ... With ``times_rng``, their times too (drawn from that stream only:
    ``rng`` draws exactly what it draws without times). With ``modality_rngs`` (see
    _sample_modalities), their procedures and / or medications, from those streams only."""
    S = _compiled(code_system)
    P, K = S.ph_lin.shape[0], len(S.c_pheno)

    # 1. Demographics.
    neonate = rng.random(n) < PARAMS.p_neonate
    male = rng.random(n) < PARAMS.p_male
    adult_age = PARAMS.age_min + (PARAMS.age_max - PARAMS.age_min) * rng.beta(PARAMS.age_a, PARAMS.age_b, n)
    age = np.where(neonate, 0.0, np.minimum(np.round(adult_age, 2), AGE_CAP))
    years = age.astype(np.int64)
    cls = S.grid_class[years, male.astype(np.int64)]

    # 2. Phenotype memberships, in table order (boosts come from earlier phenotypes).
    eligible = (years[:, None] >= S.ph_lo) & (years[:, None] <= S.ph_hi)
    eligible &= (S.ph_sex < 0) | (S.ph_sex == male[:, None])
    covariates = np.stack([np.ones(n), (age - 65.0) / 10.0, male], axis=1)
    base = covariates @ S.ph_lin.T  # [n, P]
    u = rng.random((n, P))
    member = np.zeros((n, P), dtype=bool)
    for p in range(P):
        logit = base[:, p] + member[:, :p] @ S.ph_boost[:p, p]
        member[:, p] = eligible[:, p] & (u[:, p] < _sigmoid(logit))

    # 3. Number of admissions.
    base_rate = np.where(neonate, PARAMS.readmit_rate[1], PARAMS.readmit_rate[0])
    lam = base_rate * np.exp(member @ S.ph_readmit)
    lam *= rng.gamma(PARAMS.readmit_shape, 1.0 / PARAMS.readmit_shape, n)
    n_visits = 1 + np.minimum(rng.poisson(lam), PARAMS.max_visits - 1)
    visit_start = np.r_[0, np.cumsum(n_visits)[:-1]]

    # 4. Admissions in order; the state carries what earlier admissions coded.
    var = _sample_variants(S, rng, cls)
    causes = None  # per admission: adult, neonate, the phenotypes active, the conditions coded
    if modality_rngs:
        causes = np.zeros((int(n_visits.sum()), 2 + P + K), dtype=bool)
        causes[:, 1] = np.repeat(neonate, n_visits)
        causes[:, 0] = ~causes[:, 1]
    active_prev = np.zeros((n, P), dtype=bool)
    ever_active = np.zeros((n, P), dtype=bool)
    coded_prev = np.zeros((n, K), dtype=bool)
    tail_pat = np.zeros(0, dtype=np.int64)  # previous admission's tail entries: patient, entry, rank
    tail_entry = np.zeros(0, dtype=np.int64)
    tail_rank = np.zeros(0)
    E = len(S.tail_codes)
    out_visit, out_code, out_rank = [], [], []
    for t in range(int(n_visits.max())):
        idx = np.flatnonzero(n_visits > t)
        m, c = len(idx), cls[idx]
        ever, prev = ever_active[idx], active_prev[idx]
        p_active = np.where(~ever, S.ph_episode[:, 0], np.where(prev, S.ph_episode[:, 1], S.ph_episode[:, 2]))
        active = member[idx] & (rng.random((m, P)) < p_active)
        first = (active & ~ever)[:, S.c_pheno]
        cond_active = active[:, S.c_pheno]
        was_coded = coded_prev[idx]
        prob = np.where(first, S.c_prob[0], np.where(was_coded, S.c_prob[1], S.c_prob[2]))
        draw = rng.random((m, K)) < prob
        coded = cond_active & S.c_possible[c] & draw
        for ks, required in S.req_levels:
            coded[:, ks] &= coded[:, required]
        if t == 0 and times_rng is not None:
            # The first admission's events, whether or not the code system can write them (idx is
            # every patient, and these draws are the same in both code systems).
            active0, happened0 = active, cond_active & draw
            for ks, required in S.req_levels:
                happened0[:, ks] &= happened0[:, required]
        v = var[idx]
        if t:
            step = coded & was_coded & ~first & (rng.random((m, K)) < S.c_progress)
            nxt = S.v_next[v]
            v = np.where(step & S.v_allowed[c[:, None], nxt], nxt, v)
            var[idx] = v
        if causes is not None:
            causes[visit_start[idx] + t, 2:2 + P] = active
            causes[visit_start[idx] + t, 2 + P:] = coded
        coded_prev[idx] = np.where(cond_active, coded, was_coded)
        active_prev[idx] = active
        ever_active[idx] = ever | active

        rows, ks = np.nonzero(coded)
        codes = S.v_codes[v[rows, ks]]  # [nnz, L]
        present = codes >= 0
        core_row = np.broadcast_to(rows[:, None], codes.shape)[present]
        core_code = codes[present]
        core_rank = np.broadcast_to(S.c_rank[ks][:, None], codes.shape)[present]

        # Tail: the previous admission's tail entries may return; each active phenotype adds new ones.
        keep = rng.random(len(tail_pat)) < PARAMS.tail_keep
        keep &= n_visits[tail_pat] > t
        carry_row = np.searchsorted(idx, tail_pat[keep])
        count = rng.poisson(S.tail_rate[c] * active)
        empty = (np.bincount(core_row, minlength=m) + np.bincount(carry_row, minlength=m) + count.sum(1)) == 0
        count[np.flatnonzero(empty), S.fallback[neonate[idx[empty]].astype(np.int64)]] = 1
        draw_row, draw_p = np.nonzero(count)
        reps = count[draw_row, draw_p]
        draw_row, draw_p = np.repeat(draw_row, reps), np.repeat(draw_p, reps)
        pos = np.searchsorted(S.tail_flat, c[draw_row] * P + draw_p + rng.random(len(draw_row)), side="right")
        new_row = np.r_[carry_row, draw_row]
        new_entry = np.r_[tail_entry[keep], pos - c[draw_row] * E]
        new_rank = np.r_[tail_rank[keep], S.ph_tail_rank[draw_p]]
        tail_pat, tail_entry, tail_rank = idx[new_row], new_entry, new_rank
        codes = S.tail_codes[new_entry]  # [entries, 2]
        present = codes >= 0
        tail_row = np.broadcast_to(new_row[:, None], codes.shape)[present]

        out_visit.append(visit_start[idx[np.r_[core_row, tail_row]]] + t)
        out_code.append(np.r_[core_code, codes[present]])
        out_rank.append(np.r_[core_rank, np.broadcast_to(new_rank[:, None], codes.shape)[present]])

    capped = rng.random(n) < PARAMS.capped_share
    cap = np.repeat(np.where(capped, PARAMS.capped_codes, PARAMS.max_codes), n_visits)
    visits = _assemble(S, rng, np.concatenate(out_visit), np.concatenate(out_code), np.concatenate(out_rank), cap)
    sex = np.array(SEXES, dtype=object)[male.astype(np.int64)]
    modal = {} if causes is None else _sample_modalities(code_system, modality_rngs, causes, np.repeat(male, n_visits))
    if times_rng is None:
        return [
            {"subject_id": first_subject_id + i, "age": a, "sex": s, "visits": visits[b: b + k],
             **{m: codes[b: b + k] for m, codes in modal.items()}}
            for i, (a, s, b, k) in enumerate(zip(age.tolist(), sex.tolist(), visit_start.tolist(), n_visits.tolist()))
        ]
    stay, gap, died_at, after = _sample_times(times_rng, age, neonate, male, member, lam / base_rate, n_visits,
                                              active0, happened0)
    n_kept = np.where(died_at >= 0, died_at + 1, n_visits)  # an in-hospital death ends the record
    stay, gap = stay.tolist(), gap.tolist()
    after = [d if d == d else None for d in after.tolist()]  # NaN (no later death) -> None
    return [
        {"subject_id": first_subject_id + i, "age": a, "sex": s, "visits": visits[b: b + k],
         "stay_days": stay[b: b + k], "gap_days": gap[b: b + k], "hospital_death": d >= 0, "death_days": dd,
         **{m: codes[b: b + k] for m, codes in modal.items()}}
        for i, (a, s, b, k, d, dd) in enumerate(zip(age.tolist(), sex.tolist(), visit_start.tolist(),
                                                    n_kept.tolist(), died_at.tolist(), after))
    ]


# Whole years of age where a CMS age edit of ICD-9-CM or ICD-10-CM starts or ends (newborn 0,
# pediatric 0-17, adult 15-124; maternity, female codes only: 12-55 in ICD-9-CM, 9-64 in ICD-10-CM).
AGE_EDIT_BOUNDARIES = {False: np.array([1, 15, 18]), True: np.array([1, 9, 12, 15, 18, 56, 65])}  # by female


def _keep_age_class(age: np.ndarray, male: np.ndarray, n_visits: np.ndarray, n_kept: np.ndarray, stay: np.ndarray,
                    gap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep every kept admission's age (age + days before it / 365.25, the schema's) under the
    next ``AGE_EDIT_BOUNDARIES`` year above the patient's whole-year age, so that the codes, drawn
    for that age, meet the CMS edits at every admission: a patient whose admissions would cross it
    has their gaps shrunk by one factor (and their stays before the last admission too, if those
    alone cross it), floored to 0.01 day."""
    n = len(age)
    pat = np.repeat(np.arange(n), n_visits)
    pos = np.arange(len(pat)) - np.repeat(np.r_[0, np.cumsum(n_visits)[:-1]], n_visits)
    kept, last = pos < n_kept[pat], pos == n_kept[pat] - 1
    gaps = np.bincount(pat, weights=np.where(kept, gap, 0.0), minlength=n)
    stays = np.bincount(pat, weights=np.where(kept & ~last, stay, 0.0), minlength=n)
    room = np.full(n, np.inf)
    for female in (False, True):
        sel = np.flatnonzero(male != female)
        bounds = AGE_EDIT_BOUNDARIES[female]
        at = np.searchsorted(bounds, np.floor(age[sel]), side="right")
        room[sel] = np.where(at < len(bounds), (bounds[np.minimum(at, len(bounds) - 1)] - age[sel]) * 365.25 - 1.0,
                             np.inf)
    over = np.flatnonzero(gaps + stays > room)
    if len(over):
        g_scale, s_scale = np.ones(n), np.ones(n)
        g_scale[over] = np.clip((room[over] - stays[over]) / np.maximum(gaps[over], 1e-9), 0.0, 1.0)
        s_scale[over] = np.clip(room[over] / np.maximum(stays[over], 1e-9), 0.0, 1.0)
        gap = np.floor(gap * g_scale[pat] * 100.0) / 100.0
        stay = np.where(last, stay, np.floor(stay * s_scale[pat] * 100.0) / 100.0)
    return stay, gap


def _sample_times(rng: np.random.Generator, age: np.ndarray, neonate: np.ndarray, male: np.ndarray,
                  member: np.ndarray,
                  intensity: np.ndarray, n_visits: np.ndarray, active0: np.ndarray,
                  happened0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The times of n patients (module docstring, "Times") over all their drawn admissions:
    stay and gap (float [V], days, rounded to 0.01; gap 0 at each first admission), the
    admission (0-based) of the in-hospital death (int [n], -1 if none; the first admission where
    the draw says so) and the days from the last discharge to a later death (float [n], NaN if
    none or in hospital)."""
    T, TP = _time_tables(), TIME_PARAMS
    n, V = len(age), int(n_visits.sum())
    grp = neonate.astype(np.int64)
    pat = np.repeat(np.arange(n), n_visits)
    start = np.r_[0, np.cumsum(n_visits)[:-1]]
    first = np.zeros(V, dtype=bool)
    first[start] = True
    decades = np.where(neonate, 0.0, (age - 65.0) / 10.0)
    z_stay, u_death, z_gap = rng.standard_normal(V), rng.random(V), rng.standard_normal(V)
    u_after, z_after = rng.random(n), rng.standard_normal(n)

    # Predictors (death, stay) of every admission: the first's from its events, later ones expected.
    at_first = active0.astype(np.float64) @ T.ph_effects + happened0.astype(np.float64) @ T.c_effects  # [n, 2]
    later = member.astype(np.float64) @ T.later_effects
    death_pred, stay_pred = np.where(first[:, None], at_first[pat], later[pat]).T
    member = member.astype(np.float64)

    log_stay = stay_pred + np.log(np.array(TP.stay_median))[grp][pat]
    stay = np.exp(log_stay + np.array(TP.stay_sigma)[grp][pat] * z_stay)
    stay = np.round(np.maximum(stay, TP.stay_min), 2)

    death_logit = death_pred + (np.array(TP.death_logit)[grp] + TP.death_age * decades)[pat]
    dies = np.flatnonzero(u_death < _sigmoid(death_logit))
    died_at = np.full(n, -1, dtype=np.int64)
    who, at = np.unique(pat[dies], return_index=True)  # each patient's first death (visits are in order)
    died_at[who] = dies[at] - start[who]

    log_gap = np.log(TP.gap_median) + member @ T.ph_gap - TP.gap_intensity * np.log(intensity)
    gap = np.exp(log_gap[pat] + TP.gap_sigma * z_gap)
    gap = np.where(first, 0.0, np.round(np.minimum(gap, TP.gap_max), 2))
    stay, gap = _keep_age_class(age, male, n_visits, np.where(died_at >= 0, died_at + 1, n_visits), stay, gap)

    after_logit = np.array(TP.after_logit)[grp] + TP.after_age * decades + member @ T.ph_after
    dies_later = (died_at < 0) & (u_after < _sigmoid(after_logit))
    days = np.exp(np.log(TP.after_median) + member @ T.ph_after_days + TP.after_sigma * z_after)
    after = np.where(dies_later, np.maximum(np.round(days, 2), 0.01), np.nan)
    return stay, gap, died_at, after


def _assemble(S: _Compiled, rng: np.random.Generator, visit: np.ndarray, code: np.ndarray, rank: np.ndarray,
              cap: np.ndarray) -> list[list[str]]:
    """Rows (visit, code id, rank) -> per-visit code lists: de-duplicated, EXCLUDES applied,
    ordered by rank + noise (MIMIC's seq_num order), cut at PARAMS.max_codes."""
    key = rank + rng.normal(0.0, PARAMS.order_noise, len(rank))
    order = np.lexsort((key, code, visit))
    visit, code, key = visit[order], code[order], key[order]
    first = np.r_[True, (visit[1:] != visit[:-1]) | (code[1:] != code[:-1])]  # lowest key of a duplicate
    visit, code, key = visit[first], code[first], key[first]
    V = len(S.vocab)
    present = visit * V + code  # sorted
    drop = np.zeros(len(code), dtype=bool)
    for a, b in zip(S.excl_key, S.excl_drop):
        hit = np.flatnonzero(code == b)
        query = visit[hit] * V + a
        at = np.minimum(np.searchsorted(present, query), len(present) - 1)
        drop[hit[present[at] == query]] = True
    visit, code, key = visit[~drop], code[~drop], key[~drop]
    order = np.lexsort((key, visit))
    visit, code = visit[order], code[order]
    counts = np.bincount(visit, minlength=len(cap))
    start = np.r_[0, np.cumsum(counts)[:-1]]
    keep = np.arange(len(visit)) - np.repeat(start, counts) < cap[visit]
    codes = S.vocab[code[keep]]
    bounds = np.cumsum(np.minimum(counts, cap)).tolist()
    return [codes[a:b].tolist() for a, b in zip([0] + bounds[:-1], bounds)]


def _sample_orders(T: _Orders, rng: np.random.Generator, causes: np.ndarray, male: np.ndarray,
                   intensity: np.ndarray, scale: float) -> list[list[str]]:
    """One modality's codes of V admissions (module docstring, "Procedures and medications") from
    their causes (bool [V, F]), the patient's sex (bool [V]) and care intensity (float [V]), the
    hazards multiplied by ``scale``; background codes when the modality has them."""
    V, n_orders, W = len(causes), len(T.rank), len(T.v_codes)
    sex = male.astype(np.int64)
    p = -np.expm1(-(scale * intensity)[:, None] * (causes.astype(np.float64) @ T.hazard))  # [V, orders]
    rows, os = np.nonzero((rng.random((V, n_orders)) < p) & T.possible[sex])
    pos = np.searchsorted(T.v_flat, sex[rows] * n_orders + os + rng.random(len(rows)), side="right")
    w = np.minimum(pos - sex[rows] * W, T.v_end[os] - 1)
    key = T.rank[os] + MODALITY_PARAMS.order_noise * rng.standard_normal(len(rows))
    codes = T.v_codes[w]  # [hits, L]
    present = codes >= 0
    visit = np.broadcast_to(rows[:, None], codes.shape)[present]
    # A variant's codes keep their written order; a code ordered twice keeps its first place.
    key = (key[:, None] + 1e-6 * np.arange(codes.shape[1]))[present]
    code = codes[present]
    if len(T.tail_ids):
        rate = np.where(causes[:, 1], MODALITY_PARAMS.tail_rate[1], MODALITY_PARAMS.tail_rate[0]) * intensity
        t_visit = np.repeat(np.arange(V), rng.poisson(rate))
        t_sex = sex[t_visit]
        at = np.searchsorted(T.tail_cum.ravel(), t_sex + rng.random(len(t_visit)), side="right")
        t_code = T.tail_ids[np.minimum(at - t_sex * len(T.tail_ids), len(T.tail_ids) - 1)]
        t_key = MODALITY_PARAMS.tail_rank + MODALITY_PARAMS.order_noise * rng.standard_normal(len(t_visit))
        keep = t_code >= 0  # a background code without an ICD-10-PCS code is left out
        visit, code, key = np.r_[visit, t_visit[keep]], np.r_[code, t_code[keep]], np.r_[key, t_key[keep]]
    order = np.lexsort((key, code, visit))
    visit, code, key = visit[order], code[order], key[order]
    first = np.r_[True, (visit[1:] != visit[:-1]) | (code[1:] != code[:-1])]
    visit, code, key = visit[first], code[first], key[first]
    order = np.lexsort((key, visit))
    out = T.vocab[code[order]]
    bounds = np.cumsum(np.bincount(visit, minlength=V)).tolist()
    return [out[a:b].tolist() for a, b in zip([0] + bounds[:-1], bounds)]


def _sample_modalities(code_system: str, rngs: dict[str, np.random.Generator], causes: np.ndarray,
                       male: np.ndarray) -> dict[str, list[list[str]]]:
    """{modality: per-admission codes} for the modalities in ``rngs`` ("intensity" and one or both
    of "procedures", "medications"), each drawn from its own stream."""
    intensity = rngs["intensity"].gamma(MODALITY_PARAMS.intensity_shape, 1.0 / MODALITY_PARAMS.intensity_shape,
                                        len(causes))
    return {m: _sample_orders(_orders(m, code_system), rngs[m], causes, male, intensity,
                              MODALITY_PARAMS.hazard_scale[MODALITIES.index(m) - 1])
            for m in MODALITIES[1:] if m in rngs}


def _child_stream(child: np.random.SeedSequence, k: int) -> np.random.Generator:
    """Child k of a block's SeedSequence: a stream of its own, which leaves the block's untouched."""
    return np.random.default_rng(np.random.SeedSequence(child.entropy, spawn_key=(*child.spawn_key, k)))


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def simulate(n_patients: int, seed: int = 0, progress: bool = False,
             code_system: str = DEFAULT_CODE_SYSTEM, times: bool = True,
             modalities: tuple[str, ...] = MODALITIES) -> list[dict]:
    """Draw n_patients simulated patients (schema: subject_id, age, sex, visits, and with
    ``times`` stay_days, gap_days, hospital_death, death_days).

    Deterministic for a seed; block b of PARAMS.block_size patients uses the b-th child of
    ``numpy.random.SeedSequence(seed)``, so ``simulate(n, seed)`` is the first n patients of
    ``simulate(N, seed)`` for any N >= n.
    subject_ids are 1..n_patients. ``progress`` shows a tqdm bar over the blocks.
    ``code_system``: ``"icd9cm"`` (default) or ``"icd10cm"``, the codes written (module
    docstring); ValueError for another name.
    ``times`` (default): each patient also gets ``stay_days`` and ``gap_days`` (float per visit;
    gap 0.0 at the first), ``hospital_death`` (died during the last visit) and ``death_days``
    (days from the last discharge to a death outside hospital, else None), drawn from a stream
    of their own (child 0 of block b's SeedSequence): the codes are those of ``times=False``, the
    visits after an in-hospital death dropped. ``times=False``: the four keys are absent.
    ``modalities``: ``"diagnoses"`` and any of ``"procedures"``, ``"medications"`` (default all
    three); each of the last two adds its key, per visit a list of codes (module docstring,
    "Procedures and medications"), drawn from streams of their own (children 1-3 of block b's
    SeedSequence), so that every other field is exactly that of ``modalities=("diagnoses",)``,
    which gives the patients as they were before procedures and medications existed. ValueError
    for another name or without ``"diagnoses"``.
    """
    if n_patients < 0:
        raise ValueError(f"n_patients must be >= 0, got {n_patients}")
    if isinstance(modalities, str) or "diagnoses" not in modalities or not set(modalities) <= set(MODALITIES):
        raise ValueError(f"modalities must hold 'diagnoses' and any of 'procedures', 'medications'; got {modalities!r}")
    code_systems.code_system(code_system)  # an unknown name fails before the tables compile
    size = PARAMS.block_size
    n_blocks = -(-n_patients // size)
    children = np.random.SeedSequence(seed).spawn(n_blocks)
    patients: list[dict] = []
    blocks = range(n_blocks)
    if progress:
        blocks = tqdm(blocks, desc="simulating", unit="block", total=n_blocks)
    # Building ~10 Python objects per patient triggers the cyclic garbage collector over all the
    # patients built so far again and again (none of them is garbage): paused while sampling.
    with _gc_paused():
        for b in blocks:
            # Always a whole block (the last one cut), so a block's patients never depend on n_patients.
            child, times_rng, modality_rngs = children[b], None, None
            if times:
                times_rng = _child_stream(child, 0)
            if len(modalities) > 1:  # the care intensity (1), then procedures (2) and medications (3)
                modality_rngs = {"intensity": _child_stream(child, 1)} | {
                    m: _child_stream(child, k) for k, m in enumerate(MODALITIES[1:], start=2) if m in modalities}
            patients.extend(_sample_block(np.random.default_rng(child), size, 1 + b * size, code_system, times_rng,
                                          modality_rngs))
    return patients[:n_patients]


def vocabulary_summary(code_system: str = DEFAULT_CODE_SYSTEM) -> dict:
    """The simulator's vocabulary in ``code_system``: ``{"code_system", "icd9_codes": codes of
    the process (ICD-9-CM), "codes": distinct codes it writes in code_system, "dropped_icd9_codes":
    ICD-9-CM codes with no billable code there (0 in ICD-9-CM), "dropped": those codes, sorted}``."""
    S = _compiled(code_systems.code_system(code_system).SYSTEM)
    return {"code_system": code_system, "icd9_codes": S.n_source, "codes": len(S.vocab),
            "dropped_icd9_codes": len(S.dropped), "dropped": list(S.dropped)}


# ======================================================================================
# CLI: promptehr simulate
# ======================================================================================

MIMIC3_PATIENTS = 46_520  # full MIMIC-III scale, the default cohort size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patients", type=int, default=MIMIC3_PATIENTS,
                        help=f"number of patients (default {MIMIC3_PATIENTS:,}, MIMIC-III's)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--code-system", choices=tuple(CODE_SYSTEMS), default=DEFAULT_CODE_SYSTEM,
                        help=f"codes written (default {DEFAULT_CODE_SYSTEM}: a MIMIC-III folder; icd10cm: the ICD-9-CM "
                             "codes mapped once through the CMS GEMs, written as a MIMIC-IV folder, hosp/*.csv.gz)")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES),
                        help="code tables written (default all: diagnoses, procedures, medications); "
                             "'--modalities diagnoses' writes the cohort as before procedures and medications existed")
    parser.add_argument("--out", required=True,
                        help="output folder for PATIENTS.csv, ADMISSIONS.csv, DIAGNOSES_ICD.csv, PROCEDURES_ICD.csv, "
                             "PRESCRIPTIONS.csv (MIMIC-IV: hosp/patients, admissions, diagnoses_icd, procedures_icd, "
                             "prescriptions .csv.gz), replaced as a whole; refused unless empty or an earlier "
                             "`promptehr simulate` output")


def validate(args: argparse.Namespace) -> None:
    """The checks `promptehr simulate` runs before simulating (errors: ValueError, OutputFolderError)."""
    if args.patients < 1:
        raise ValueError(f"--patients must be >= 1, got {args.patients}")
    if "diagnoses" not in args.modalities:
        raise ValueError(f"--modalities must include diagnoses, got {' '.join(args.modalities)}")
    check_output(args.out, "simulate")


def run(args: argparse.Namespace) -> int:
    modalities = tuple(m for m in MODALITIES if m in args.modalities)
    patients = simulate(args.patients, args.seed, progress=True, code_system=args.code_system, modalities=modalities)
    arguments = {"patients": args.patients, "seed": args.seed}
    if args.code_system != DEFAULT_CODE_SYSTEM:  # earlier ICD-9-CM outputs keep their manifest
        arguments["code_system"] = args.code_system
    if modalities != MODALITIES:
        arguments["modalities"] = list(modalities)
    with replace_folder(args.out, "simulate", arguments) as tmp:
        if args.code_system == icd9.SYSTEM:
            written = write_mimic3_csvs(patients, tmp, seed=args.seed)
        else:
            written = write_mimic4_csvs(patients, tmp, seed=args.seed, code_system=args.code_system)
    paths = {name: Path(args.out) / path.relative_to(tmp) for name, path in written.items()}
    n_adm = sum(len(p["visits"]) for p in patients)
    n_dx = sum(len(v) for p in patients for v in p["visits"])
    extra = "".join(f", {sum(len(v) for p in patients for v in p[m]):,} {m}" for m in modalities[1:])
    print(f"simulated {len(patients):,} patients, {n_adm:,} admissions, {n_dx:,} diagnoses{extra} (seed {args.seed}, "
          f"{args.code_system})")
    if args.code_system != icd9.SYSTEM:
        summary = vocabulary_summary(args.code_system)
        print(f"vocabulary: {summary['codes']:,} {args.code_system} codes from {summary['icd9_codes']:,} ICD-9-CM "
              f"codes ({summary['dropped_icd9_codes']:,} without a billable {args.code_system} target dropped)")
    for path in paths.values():
        print(f"wrote {path}")
    return 0
