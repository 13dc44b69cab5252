"""Hierarchical ICD tokenizer for PromptEHR (remote code: imports only stdlib and transformers).

A patient reads ``<s> <v> C:401 4019 C:250 25000 </v> <v> ... </v> </s>``: every diagnosis code is
preceded by its category token. Category tokens (``"C:<cat>"``) and code tokens (the dotless code)
have distinct strings because a category such as ``486`` is also a leaf code.

The codes are in one code system, ``code_system`` (saved in ``tokenizer_config.json``; a
checkpoint without it is ICD-9-CM), which sets the category of a code and where a dotted code's
dot may sit:

- ``"icd9cm"`` (ICD-9-CM): the first 3 characters, 4 for E codes (external causes):
  ``"25000"`` -> ``"250"``, ``"E8800"`` -> ``"E880"``; ``"E880.0"`` -> ``"E8800"``.
- ``"icd10cm"`` (ICD-10-CM): always the first 3 characters (ICD-10 E codes are endocrine
  diseases): ``"E119"`` -> ``"E11"``, ``"S72001A"`` -> ``"S72"``; ``"E11.9"`` -> ``"E119"``.

Every category seen in training also owns a catch-all code token equal to the category string
(``"401"``, ``"E11"``: a valid non-billable node of either system). It receives (a) codes rarer than
``min_code_count`` in training ("folded"), (b) the bare category code when MIMIC uses it, and
(c) at encode time any code absent from the vocabulary whose category is known. A code whose
category is unknown too becomes ``<unk>``. Neither case raises; both are counted in
``fallback_counts``.

Modalities (``modalities``, saved in ``tokenizer_config.json``; a checkpoint without it holds
diagnoses only): a tokenizer built with ``("diagnoses", "procedures", "medications")`` or a prefix
of it also holds procedure and medication tokens, namespaced so that they never collide with a
diagnosis code (ICD-9-CM procedure ``"401"`` is not diagnosis ``"401"``):

- procedures: code token ``"PX:<code>"``, category ``"PX:<first 2 characters>"`` for ICD-9-CM
  volume 3 (with ICD-9-CM diagnoses), ``"PX:<first 3 characters>"`` for ICD-10-PCS (with ICD-10-CM);
- medications (``"<NAME>//<FORMULARY>"``): code token ``"RX:<NAME>//<FORMULARY>"``, category
  ``"RX:<NAME>"``.

A visit's codes are then written in a fixed order: its diagnoses, then its procedures, then its
medications (:meth:`merge_visits` builds such visits from a patient, :meth:`split_visit` takes
one apart). The vocabulary lists the categories modality by modality, then the codes modality by
modality, so each modality's tokens are contiguous id ranges (:meth:`code_type_ranges`), the
model's code types. A diagnosis-only tokenizer is the same, token for token, as before modalities
existed.

Files written by ``save_pretrained`` (all JSON): ``vocab.json`` (token -> id) and
``hierarchy.json`` (category -> children, training code counts, folded codes, build settings),
beside ``tokenizer_config.json`` whose ``auto_map`` points ``AutoTokenizer`` at this file.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json", "hierarchy_file": "hierarchy.json"}
CATEGORY_PREFIX = "C:"
VISIT_START, VISIT_END = "<v>", "</v>"
# pad first so that zero-filled buffers read as padding; then BART's <s> </s> <unk> and <mask>.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")
HIERARCHY_FORMAT = 1
# The code systems whose category rule this file knows (the names of
# promptehr_hf.datasets_scripts.code_systems, which remote code cannot import).
CODE_SYSTEMS = ("icd9cm", "icd10cm")
DEFAULT_CODE_SYSTEM = "icd9cm"
# Modalities in the order a visit writes them; each one's patient field and token prefix.
MODALITIES = ("diagnoses", "procedures", "medications")
MODALITY_FIELDS = {"diagnoses": "visits", "procedures": "procedures", "medications": "medications"}
MODALITY_PREFIXES = {"diagnoses": "", "procedures": "PX:", "medications": "RX:"}
MEDICATION_SEPARATOR = "//"  # "<NAME>//<FORMULARY>" (promptehr_hf.datasets_scripts.medications)
MEDICATION_UNKNOWN = "UNK"  # the formulary part when none is known
# Characters of a procedure category per diagnosis code system: ICD-9-CM volume 3, ICD-10-PCS.
PROCEDURE_CATEGORY_LENGTH = {"icd9cm": 2, "icd10cm": 3}


def _check_code_system(code_system: str) -> str:
    if code_system not in CODE_SYSTEMS:
        raise ValueError(f"unknown code system {code_system!r}; expected one of {', '.join(map(repr, CODE_SYSTEMS))}")
    return code_system


def _category_length(code: str, code_system: str) -> int:
    # ICD-9-CM E codes (external causes) have 4-character categories; ICD-10-CM E codes
    # (endocrine) have 3, like every other ICD-10-CM code.
    return 4 if code_system == "icd9cm" and code.startswith("E") else 3


def _check_modalities(modalities) -> tuple[str, ...]:
    modalities = tuple(modalities)
    if not modalities or modalities != MODALITIES[: len(modalities)]:
        raise ValueError(f"modalities must be one of {[MODALITIES[:k] for k in range(1, len(MODALITIES) + 1)]}, "
                         f"got {list(modalities)}")
    return modalities


def modality_of(code: str) -> str:
    """The modality of a (code or category) token string by its prefix: ``"PX:4011"`` ->
    ``"procedures"``, ``"RX:ASPIRIN//ASA81"`` -> ``"medications"``, anything else ``"diagnoses"``."""
    for name in MODALITIES[1:]:
        if code.startswith(MODALITY_PREFIXES[name]):
            return name
    return "diagnoses"


def code_category(code: str, code_system: str = DEFAULT_CODE_SYSTEM) -> str:
    """Category of a dotless code: ICD-9-CM its first 3 characters, 4 for E codes; ICD-10-CM its
    first 3 characters (``"E119"`` -> ``"E11"``); a procedure token ``"PX:<code>"`` its first 2
    (ICD-9-CM volume 3) or 3 (ICD-10-PCS) characters; a medication token ``"RX:<NAME>//<FORM>"``
    its drug name. ValueError for an unknown code system."""
    _check_code_system(code_system)
    modality = modality_of(code)
    if modality == "diagnoses":
        return code[:_category_length(code, code_system)]
    prefix = MODALITY_PREFIXES[modality]
    body = code[len(prefix):]
    if modality == "procedures":
        return prefix + body[:PROCEDURE_CATEGORY_LENGTH[code_system]]
    return prefix + body.partition(MEDICATION_SEPARATOR)[0]


def _normalize(code: str, code_system: str = DEFAULT_CODE_SYSTEM) -> str:
    """Dotless upper-case form, as ``normalize`` of ``promptehr_hf.datasets_scripts.icd9`` / ``icd10``
    (which remote code cannot import): the dot is dropped only right after the category
    (ICD-9-CM ``"401.9"``, ``"E880.0"``; ICD-10-CM ``"E11.9"``, ``"S72.001A"``)."""
    c = str(code).strip().upper()
    if modality_of(c) != "diagnoses":  # procedure and medication tokens are stored normalised
        return c
    head, dot, tail = c.partition(".")
    if dot and len(head) == _category_length(head, _check_code_system(code_system)) and "." not in tail:
        return head + tail
    return c


def _write_json_atomic(path: str, obj) -> None:
    # A crash mid-write must not leave a truncated vocabulary next to a valid config.
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


class PromptEHRTokenizer(PreTrainedTokenizer):
    """Word-level tokenizer over ICD category and code tokens, built from a training split.

    Build with :meth:`from_patients`; reload with ``from_pretrained`` or
    ``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)``.

    Args:
        code_system: ``"icd9cm"`` (default) or ``"icd10cm"``, the system of the codes: sets each
            code's category (:meth:`category_of`) and dotted-code normalisation
            (:meth:`normalize_code`); saved in ``tokenizer_config.json``.

    Attributes (ids are ints):
        category_ids: ids of the category tokens, ascending.
        code_ids: ids of the code tokens (catch-alls included), ascending.
        code_category: code id -> its category id.
        category_children: category id -> its code ids, ascending.
        code_probs: code id -> training P(code | category) (0.0 for a never-seen catch-all).
        code_counts: code token -> training count (folded occurrences land on the catch-all).
        fallback_counts: ``{"category": n, "unk": n}`` codes that fell back since construction
            (or the last :meth:`reset_fallback_counts`); ``fallback_codes`` counts them per code.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        hierarchy_file: str | None = None,
        pad_token: str = "<pad>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        mask_token: str = "<mask>",
        code_system: str = DEFAULT_CODE_SYSTEM,
        modalities: Sequence[str] = ("diagnoses",),
        **kwargs,
    ):
        self.code_system: str = _check_code_system(code_system)
        self.modalities: tuple[str, ...] = _check_modalities(modalities)
        self._modality_rank = {MODALITY_PREFIXES[m]: k for k, m in enumerate(self.modalities)}
        # from_patients hands the state over in memory; it must not reach init_kwargs (which
        # save_pretrained writes to tokenizer_config.json).
        state = kwargs.pop("_state", None)
        if state is None:
            if vocab_file is None or hierarchy_file is None:
                raise ValueError(
                    "PromptEHRTokenizer needs vocab_file and hierarchy_file; build a new one with "
                    "PromptEHRTokenizer.from_patients(train_patients)"
                )
            state = {"vocab": _read_json(vocab_file), "hierarchy": _read_json(hierarchy_file)}
        self._set_state(state["vocab"], state["hierarchy"], source=vocab_file or "from_patients")
        super().__init__(
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            mask_token=mask_token,
            code_system=code_system,  # into init_kwargs, so tokenizer_config.json records it
            modalities=list(self.modalities),
            **kwargs,
        )
        self.reset_fallback_counts()

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_patients(cls, patients: Iterable, min_code_count: int = 1, code_system: str = DEFAULT_CODE_SYSTEM,
                      modalities: Sequence[str] = ("diagnoses",), **kwargs) -> "PromptEHRTokenizer":
        """Build the vocabulary from training patients.

        Args:
            patients: iterable of patient dicts (``{"visits": list[list[str]], ...}``, with
                ``procedures`` / ``medications`` for those modalities) or of bare visit lists
                (already merged, see :meth:`merge_visits`); dotless codes (dotted ones are
                normalised).
            min_code_count: a code seen fewer times than this in training is folded into its
                category's catch-all token (counted in ``folded_codes``).
            code_system: ``"icd9cm"`` or ``"icd10cm"``, the system of the patients' codes (the
                cohort summary's ``code_system``): sets the categories.
            modalities: ``("diagnoses",)`` (default), ``("diagnoses", "procedures")`` or all three.
        """
        if int(min_code_count) < 1:
            raise ValueError(f"min_code_count must be >= 1, got {min_code_count}")
        min_code_count = int(min_code_count)
        _check_code_system(code_system)
        modalities = _check_modalities(modalities)
        counts: Counter = Counter()
        n_patients = n_visits = 0
        for patient in patients:
            visits = merge_visits(patient, modalities) if isinstance(patient, dict) else patient
            n_patients += 1
            n_visits += len(visits)
            for visit in visits:
                counts.update(visit)
        if any(_normalize(c, code_system) != c for c in counts):
            merged: Counter = Counter()
            for code, n in counts.items():
                merged[_normalize(code, code_system)] += n
            counts = merged
        counts.pop("", None)
        if not counts:
            raise ValueError("from_patients: no diagnosis codes in the training patients")

        code_counts: dict[str, int] = {}
        folded: dict[str, int] = {}
        for code, n in counts.items():
            cat = code_category(code, code_system)
            code_counts.setdefault(cat, 0)  # every category owns its catch-all token
            if n >= min_code_count or code == cat:
                code_counts[code] = code_counts.get(code, 0) + n
            else:
                folded[code] = n
                code_counts[cat] += n
        # Modality by modality (each one's tokens a contiguous id range), strings in order inside.
        rank = {MODALITY_PREFIXES[m]: k for k, m in enumerate(MODALITIES)}

        def order(token: str) -> tuple[int, str]:
            return rank[MODALITY_PREFIXES[modality_of(token)]], token

        unknown = sorted({modality_of(c) for c in code_counts} - set(modalities))
        if unknown:
            raise ValueError(f"from_patients: the visits hold {unknown} codes but modalities={list(modalities)}")
        categories = sorted({code_category(c, code_system) for c in code_counts}, key=order)
        codes = sorted(code_counts, key=order)
        vocab = {tok: i for i, tok in enumerate(
            [*SPECIAL_TOKENS, VISIT_START, VISIT_END, *(CATEGORY_PREFIX + c for c in categories), *codes]
        )}
        children: dict[str, list[str]] = {CATEGORY_PREFIX + c: [] for c in categories}
        for code in codes:
            children[CATEGORY_PREFIX + code_category(code, code_system)].append(code)
        hierarchy = {
            "format": HIERARCHY_FORMAT,
            "min_code_count": min_code_count,
            "n_patients": n_patients,
            "n_visits": n_visits,
            "category_children": children,
            "code_counts": {c: code_counts[c] for c in codes},
            "folded_codes": dict(sorted(folded.items())),
        }
        return cls(_state={"vocab": vocab, "hierarchy": hierarchy}, code_system=code_system,
                   modalities=modalities, **kwargs)

    def _set_state(self, vocab: dict, hierarchy: dict, source: str) -> None:
        missing = [t for t in (*SPECIAL_TOKENS, VISIT_START, VISIT_END) if t not in vocab]
        if missing:
            raise ValueError(f"{source}: vocabulary lacks the tokens {missing}")
        if hierarchy.get("format") != HIERARCHY_FORMAT:
            raise ValueError(f"{source}: hierarchy format {hierarchy.get('format')!r}, expected {HIERARCHY_FORMAT}")
        self.vocab: dict[str, int] = {str(t): int(i) for t, i in vocab.items()}
        self.ids_to_tokens: dict[int, str] = {i: t for t, i in self.vocab.items()}
        if len(self.ids_to_tokens) != len(self.vocab):
            raise ValueError(f"{source}: two tokens share an id")
        self.min_code_count: int = int(hierarchy["min_code_count"])
        self.code_counts: dict[str, int] = {c: int(n) for c, n in hierarchy["code_counts"].items()}
        self.folded_codes: dict[str, int] = dict(hierarchy.get("folded_codes", {}))
        self.training_size: dict[str, int] = {
            "patients": int(hierarchy.get("n_patients", 0)), "visits": int(hierarchy.get("n_visits", 0))
        }
        children_tokens: dict[str, list[str]] = hierarchy["category_children"]

        self.category_children: dict[int, list[int]] = {}
        self.code_category: dict[int, int] = {}
        self.code_probs: dict[int, float] = {}
        # code string -> (category id, code id): the one lookup encode_visit does per code
        self._pair: dict[str, tuple[int, int]] = {}
        for cat_tok, kids in children_tokens.items():
            if cat_tok not in self.vocab or any(k not in self.vocab for k in kids):
                raise ValueError(f"{source}: category {cat_tok} or one of its codes is not in the vocabulary")
            cat_id = self.vocab[cat_tok]
            kid_ids = sorted(self.vocab[k] for k in kids)
            self.category_children[cat_id] = kid_ids
            total = sum(self.code_counts.get(k, 0) for k in kids)
            for kid in kids:
                kid_id = self.vocab[kid]
                self.code_category[kid_id] = cat_id
                self.code_probs[kid_id] = self.code_counts.get(kid, 0) / total if total else 0.0
                self._pair[kid] = (cat_id, kid_id)
        self.category_ids: list[int] = sorted(self.category_children)
        self.code_ids: list[int] = sorted(self.code_category)
        # category string -> (category id, catch-all code id), for codes outside the vocabulary
        self._catch_all: dict[str, tuple[int, int]] = {
            tok[len(CATEGORY_PREFIX):]: self._pair[tok[len(CATEGORY_PREFIX):]]
            for tok in children_tokens
            if tok[len(CATEGORY_PREFIX):] in self._pair
        }

    # ------------------------------------------------------------------------ base-class API
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return text.split()

    def _convert_token_to_id(self, token: str) -> int:
        token_id = self.vocab.get(token)
        if token_id is not None:
            return token_id
        # A raw code string outside the vocabulary: same fallback as encode_visit.
        if token.startswith(CATEGORY_PREFIX):
            return self._count_fallback(token, "unk")
        pair = self._catch_all.get(self.category_of(self.normalize_code(token)))
        if pair is None:
            return self._count_fallback(token, "unk")
        self._count_fallback(token, "category")
        return pair[1]

    def _convert_id_to_token(self, index: int) -> str:
        return self.ids_to_tokens.get(index, self.unk_token)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_vocabulary: {save_directory} is not a directory")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_path = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        hierarchy_path = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["hierarchy_file"])
        _write_json_atomic(vocab_path, dict(sorted(self.vocab.items(), key=lambda kv: kv[1])))
        id_to_tok = self.ids_to_tokens
        _write_json_atomic(hierarchy_path, {
            "format": HIERARCHY_FORMAT,
            "min_code_count": self.min_code_count,
            "n_patients": self.training_size["patients"],
            "n_visits": self.training_size["visits"],
            "category_children": {
                id_to_tok[c]: [id_to_tok[k] for k in kids] for c, kids in sorted(self.category_children.items())
            },
            "code_counts": {id_to_tok[k]: self.code_counts.get(id_to_tok[k], 0) for k in self.code_ids},
            "folded_codes": self.folded_codes,
        })
        return vocab_path, hierarchy_path

    # ------------------------------------------------------------------------- EHR encoding
    def category_of(self, code: str) -> str:
        """The category of a dotless code under the tokenizer's code system (ICD-9-CM
        ``"E8800"`` -> ``"E880"``; ICD-10-CM ``"E119"`` -> ``"E11"``), whether or not the code
        is in the vocabulary."""
        return code_category(code, self.code_system)

    def normalize_code(self, code: str) -> str:
        """A code's dotless upper-case form under the tokenizer's code system (``"E11.9"`` ->
        ``"E119"`` in ICD-10-CM)."""
        return _normalize(code, self.code_system)

    def modality_rank(self, code: str) -> int:
        """Position of a code token's modality in ``modalities`` (0 for diagnoses); ValueError for a
        modality the tokenizer does not hold."""
        rank = self._modality_rank.get(MODALITY_PREFIXES[modality_of(code)])
        if rank is None:
            raise ValueError(f"{code!r} is a {modality_of(code)} code; this tokenizer holds {list(self.modalities)}")
        return rank

    def merge_visits(self, patient: dict) -> list[list[str]]:
        """A patient's visits as the tokenizer reads them (see :func:`merge_visits`)."""
        return merge_visits(patient, self.modalities)

    def split_visit(self, codes: Sequence[str]) -> dict[str, list[str]]:
        """A decoded visit -> ``{"visits": diagnoses, "procedures": [...], "medications": [...]}``
        (the fields of the tokenizer's modalities), prefixes stripped. A medication catch-all
        (``"RX:<NAME>"``, a folded or unseen formulary code) becomes ``"<NAME>//UNK"``."""
        return split_visit(codes, self.modalities)

    def code_type_ranges(self) -> list[list[int]]:
        """``[[first id, last id + 1, code type], ...]``: the contiguous id ranges of each
        modality's category and code tokens, code type = 1 + the modality's position in
        ``modalities`` (0 is left to the other tokens); the model's code types."""
        ranges: list[list[int]] = []
        for ids, skip in ((self.category_ids, len(CATEGORY_PREFIX)), (self.code_ids, 0)):
            types = [1 + self.modality_rank(self.ids_to_tokens[i][skip:]) for i in ids]
            for i, t in zip(ids, types):
                if ranges and ranges[-1][2] == t and ranges[-1][1] == i:
                    ranges[-1][1] = i + 1
                else:
                    ranges.append([i, i + 1, t])
        return ranges

    @property
    def visit_start_id(self) -> int:
        return self.vocab[VISIT_START]

    @property
    def visit_end_id(self) -> int:
        return self.vocab[VISIT_END]

    def reset_fallback_counts(self) -> None:
        """Zero ``fallback_counts`` and ``fallback_codes``."""
        self.fallback_counts: dict[str, int] = {"category": 0, "unk": 0}
        self.fallback_codes: Counter = Counter()

    def _count_fallback(self, code: str, kind: str) -> int:
        self.fallback_counts[kind] += 1
        self.fallback_codes[code] += 1
        return self.unk_token_id

    def _lookup(self, code: str) -> tuple[int, int] | None:
        """(category id, code id) of a code, falling back (counted) to its catch-all; None = unk."""
        pair = self._pair.get(code)
        if pair is not None:
            return pair
        norm = self.normalize_code(code)
        pair = self._pair.get(norm)
        if pair is not None:
            return pair
        pair = self._catch_all.get(self.category_of(norm))
        self._count_fallback(code, "unk" if pair is None else "category")
        return pair

    def encode_visit(self, codes: Sequence[str]) -> list[int]:
        """One visit -> ``<v> C:cat code C:cat code ... </v>`` ids (no ``<s>``/``</s>``).

        Codes keep their order inside their modality (a multimodal visit is written diagnoses
        first, then procedures, then medications). Two codes landing on the same token (e.g. two unseen codes of a
        category) are written once, so no code token repeats inside a visit; a code whose
        category is unknown becomes one ``<unk>`` (written once per visit too).
        """
        ids = [self.visit_start_id]
        seen: set[int] = set()
        if len(self.modalities) > 1:  # diagnoses, then procedures, then medications
            codes = sorted(codes, key=self.modality_rank)
        for code in codes:
            pair = self._lookup(code)
            if pair is None:
                if self.unk_token_id not in seen:
                    seen.add(self.unk_token_id)
                    ids.append(self.unk_token_id)
            elif pair[1] not in seen:
                seen.add(pair[1])
                ids.extend(pair)
        ids.append(self.visit_end_id)
        return ids

    def encode_patient(self, visits: Sequence[Sequence[str]]) -> list[int]:
        """All visits -> ``<s> <v> ... </v> ... </s>`` ids."""
        ids = [self.bos_token_id]
        for visit in visits:
            ids.extend(self.encode_visit(visit))
        ids.append(self.eos_token_id)
        return ids

    def encode_history(self, visits: Sequence[Sequence[str]], max_length: int | None = None) -> list[int]:
        """Encoder input ``<s> <v>..</v> ... </s>`` keeping the NEWEST whole visits within max_length.

        An empty history is ``<s> </s>``. If even the newest visit does not fit, its leading
        (category, code) pairs that fit are kept, closed by ``</v>``, so the history is never
        emptied by one long visit.
        """
        if max_length is not None and max_length < 2:
            raise ValueError(f"encode_history: max_length must be >= 2 (for <s> </s>), got {max_length}")
        budget = None if max_length is None else max_length - 2
        kept: list[list[int]] = []
        for visit in reversed(visits):
            ids = self.encode_visit(visit)
            if budget is not None and len(ids) > budget:
                if not kept:
                    head = _truncate_visit(ids, budget, self.unk_token_id)
                    if head is not None:
                        kept.append(head)
                break
            kept.append(ids)
            if budget is not None:
                budget -= len(ids)
        out = [self.bos_token_id]
        for ids in reversed(kept):
            out.extend(ids)
        out.append(self.eos_token_id)
        return out

    def decode_visits(self, ids: Iterable[int]) -> list[list[str]]:
        """Ids -> visits of code strings; specials, padding and -100 are ignored.

        ``<v>`` opens a visit and ``</v>`` closes it (``<v> </v>`` is an empty visit); codes outside
        any ``<v>`` open one implicitly, and an unclosed visit is kept. A catch-all (folded or
        unseen code) decodes to its category string; a code repeated in a visit is kept once.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        visits: list[list[str]] = []
        current: list[str] | None = None
        start, end = self.visit_start_id, self.visit_end_id
        id_to_tok, code_category_map = self.ids_to_tokens, self.code_category
        for i in ids:
            i = int(i)
            if i == start:
                if current is not None:
                    visits.append(current)
                current = []
            elif i == end:
                if current is not None:
                    visits.append(current)
                current = None
            elif i in code_category_map:
                if current is None:
                    current = []
                tok = id_to_tok[i]
                if tok not in current:
                    current.append(tok)
        if current is not None:
            visits.append(current)
        return visits

    def batch_decode_visits(self, batch: Iterable[Iterable[int]]) -> list[list[list[str]]]:
        """[B, L] ids (lists or a tensor) -> B lists of visits (see :meth:`decode_visits`)."""
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return [self.decode_visits(row) for row in batch]


def merge_visits(patient: dict, modalities: Sequence[str] = ("diagnoses",)) -> list[list[str]]:
    """A patient's visits with its other modalities folded in, as a multimodal tokenizer reads
    them: visit k is its diagnoses, then ``"PX:" + code`` for each procedure, then ``"RX:" +
    code`` for each medication. A modality the patient lacks (key absent or None) adds nothing.
    With ``("diagnoses",)`` the visits themselves."""
    visits = patient["visits"]
    extra = []
    for m in _check_modalities(modalities)[1:]:
        lists = patient.get(MODALITY_FIELDS[m])
        if lists is None:
            continue
        if len(lists) != len(visits):
            raise ValueError(f"patient {patient.get('subject_id')}: {len(visits)} visits but {len(lists)} {m} lists")
        extra.append((MODALITY_PREFIXES[m], lists))
    if not extra:
        return [list(v) for v in visits]
    return [[*v, *(prefix + c for prefix, lists in extra for c in lists[k])] for k, v in enumerate(visits)]


def split_visit(codes: Sequence[str], modalities: Sequence[str] = MODALITIES) -> dict[str, list[str]]:
    """The inverse of :func:`merge_visits` for one visit: ``{field: codes}`` for each of
    ``modalities`` (``"visits"`` for the diagnoses), prefixes stripped, order kept. A medication
    token without its formulary part (a catch-all) gets ``//UNK``."""
    out: dict[str, list[str]] = {MODALITY_FIELDS[m]: [] for m in modalities}
    for code in codes:
        modality = modality_of(code)
        body = code[len(MODALITY_PREFIXES[modality]):]
        if modality == "medications" and MEDICATION_SEPARATOR not in body:
            body += MEDICATION_SEPARATOR + MEDICATION_UNKNOWN
        out[MODALITY_FIELDS[modality]].append(body)
    return out


def _truncate_visit(ids: list[int], budget: int, unk_id: int) -> list[int] | None:
    """Leading tokens of an encoded visit that fit in budget, cut at a (category, code) boundary.

    None when not even one code fits (an empty ``<v> </v>`` would misstate the history).
    """
    body = ids[1:-1]
    keep = budget - 2  # <v> and </v>
    # pairs are 2 tokens, a lone <unk> is 1: walk to the last boundary within keep
    pos = 0
    while pos < len(body):
        step = 1 if body[pos] == unk_id else 2
        if pos + step > keep:
            break
        pos += step
    return [ids[0], *body[:pos], ids[-1]] if pos else None


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"PromptEHRTokenizer: cannot read {path}: {err}") from err


PromptEHRTokenizer.register_for_auto_class("AutoTokenizer")
