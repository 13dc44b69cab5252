"""PromptEHRTokenizer: vocabulary, fallbacks, round trips, and remote-code loading in a clean process."""

from __future__ import annotations

import json
import os
import random
import textwrap

import pytest
from transformers import AutoTokenizer

from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer, code_category

CODES = ["4019", "40191", "25000", "25001", "486", "5849", "5990", "42731", "4280", "E8800", "E8490",
         "V3000", "V3001", "V053", "0389", "99591", "2724", "53081", "2859", "41401"]


def _cohort(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"subject_id": i, "age": 60.0, "sex": "F",
         "visits": [rng.sample(CODES, rng.randint(1, 8)) for _ in range(rng.randint(1, 4))]}
        for i in range(n)
    ]


def _expected_visits(tok: PromptEHRTokenizer, visits: list[list[str]]) -> tuple[list[list[str]], int, int]:
    """Reference decode of encode: in-vocab codes kept, others -> category (or dropped), deduplicated."""
    vocab = tok.get_vocab()
    out, n_cat, n_unk = [], 0, 0
    for visit in visits:
        kept: list[str] = []
        for code in visit:
            if code in vocab and not code.startswith("C:") and code not in {"<v>", "</v>"}:
                tok_str = code
            elif "C:" + code_category(code) in vocab:
                tok_str, n_cat = code_category(code), n_cat + 1
            else:
                n_unk += 1
                continue
            if tok_str not in kept:
                kept.append(tok_str)
        out.append(kept)
    return out, n_cat, n_unk


def test_vocabulary_layout_and_hierarchy():
    tok = PromptEHRTokenizer.from_patients(_cohort(50, 0))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<s>", "</s>", "<unk>", "<mask>", "<v>", "</v>")] == list(range(7))
    ids = (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert (tok.visit_start_id, tok.visit_end_id) == (5, 6)
    assert len(tok) == tok.vocab_size == len(vocab)
    cats = {code_category(c) for c in CODES}
    assert {tok.convert_ids_to_tokens(i) for i in tok.category_ids} == {"C:" + c for c in cats}
    # every seen code plus one catch-all per category; category and code strings never collide
    assert {tok.convert_ids_to_tokens(i) for i in tok.code_ids} == set(CODES) | cats
    assert not set(tok.category_ids) & set(tok.code_ids)
    assert code_category("E8800") == "E880" and code_category("V3000") == "V30" and code_category("486") == "486"
    for cat_id, kids in tok.category_children.items():
        cat = tok.convert_ids_to_tokens(cat_id)[2:]
        assert all(tok.convert_ids_to_tokens(k).startswith(cat) for k in kids)
        assert all(tok.code_category[k] == cat_id for k in kids)
        assert sum(tok.code_probs[k] for k in kids) == pytest.approx(1.0)
    # P(code | category) from training counts: 4019 vs 40191 within C:401
    counts = {c: sum(v.count(c) for p in _cohort(50, 0) for v in p["visits"]) for c in ("4019", "40191")}
    p4019 = tok.code_probs[tok.convert_tokens_to_ids("4019")]
    assert p4019 == pytest.approx(counts["4019"] / (counts["4019"] + counts["40191"]))
    assert tok.code_probs[tok.convert_tokens_to_ids("401")] == 0.0  # catch-all never seen in training


def test_category_rule_matches_the_icd9_tables():
    icd9 = pytest.importorskip("promptehr_hf.datasets_scripts.icd9")
    codes = icd9.billable_codes()
    assert len(codes) > 14000
    assert [code_category(c) for c in codes] == [icd9.category(c) for c in codes]
    assert all(icd9.is_valid(code_category(c)) for c in codes)  # every catch-all token is a v32 node


def test_encode_patient_grammar_and_round_trip():
    patients = _cohort(40, 1)
    tok = PromptEHRTokenizer.from_patients(patients)
    visit = ["4019", "25000", "E8800"]
    assert tok.convert_ids_to_tokens(tok.encode_visit(visit)) == [
        "<v>", "C:401", "4019", "C:250", "25000", "C:E880", "E8800", "</v>"]
    for p in patients:
        ids = tok.encode_patient(p["visits"])
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode_visits(ids) == p["visits"]
        # the whitespace string form goes through __call__ to the same ids
        assert tok(tok.decode(ids))["input_ids"] == ids
    assert tok.fallback_counts == {"category": 0, "unk": 0}
    assert tok.encode_patient([]) == [tok.bos_token_id, tok.eos_token_id]
    assert tok.decode_visits(tok.encode_patient([[]])) == [[]]
    # padding, -100 labels and a missing <v> are tolerated; tensors are accepted
    torch = pytest.importorskip("torch")
    body = tok.encode_visit(visit)
    assert tok.decode_visits(torch.tensor(body[1:] + [tok.pad_token_id, -100])) == [visit]
    assert tok.batch_decode_visits(torch.tensor([body, body])) == [[visit], [visit]]


def test_unseen_codes_fall_back_and_are_counted():
    tok = PromptEHRTokenizer.from_patients(_cohort(50, 0))
    unk, v, ve = tok.unk_token_id, tok.visit_start_id, tok.visit_end_id
    c401, catch401 = tok.convert_tokens_to_ids("C:401"), tok.convert_tokens_to_ids("401")
    # unseen code of a known category -> its catch-all; unseen category -> one <unk>
    ids = tok.encode_visit(["4011", "4019", "71234", "40199", "71590"])
    assert ids == [v, c401, catch401, c401, tok.convert_tokens_to_ids("4019"), unk, ve]
    assert tok.fallback_counts == {"category": 2, "unk": 2}
    assert tok.fallback_codes == {"4011": 1, "40199": 1, "71234": 1, "71590": 1}
    assert tok.decode_visits(ids) == [["401", "4019"]]
    # dotted input is normalised, not a fallback
    assert tok.encode_visit(["401.9", " e880.0"]) == tok.encode_visit(["4019", "E8800"])
    assert tok.fallback_counts == {"category": 2, "unk": 2}
    # the string path falls back the same way
    assert tok("C:401 4011 C:712 71234")["input_ids"] == [c401, catch401, unk, unk]
    assert tok.fallback_counts == {"category": 3, "unk": 4}
    tok.reset_fallback_counts()
    assert tok.fallback_counts == {"category": 0, "unk": 0} and not tok.fallback_codes


def test_min_code_count_folds_rare_codes():
    patients = [{"visits": [["4019", "25000"], ["4019", "40191", "486"]]},
                {"visits": [["4019", "25001", "E8800"]]}]
    tok = PromptEHRTokenizer.from_patients(patients, min_code_count=2)
    vocab = tok.get_vocab()
    assert "4019" in vocab and not {"40191", "25000", "25001", "E8800"} & set(vocab)
    assert "486" in vocab  # a bare category code is its own catch-all, never folded
    assert tok.folded_codes == {"25000": 1, "25001": 1, "40191": 1, "E8800": 1}
    assert tok.code_counts["401"] == 1 and tok.code_counts["250"] == 2 and tok.code_counts["4019"] == 3
    assert tok.code_probs[vocab["250"]] == 1.0
    assert tok.code_probs[vocab["4019"]] == pytest.approx(0.75)
    assert tok.decode_visits(tok.encode_patient(patients[0]["visits"])) == [["4019", "250"], ["4019", "401", "486"]]
    assert tok.fallback_counts == {"category": 2, "unk": 0}
    # two folded codes of one category in a visit: one catch-all token, no duplicate code token
    assert tok.decode_visits(tok.encode_visit(["25000", "25001"])) == [["250"]]
    with pytest.raises(ValueError, match="min_code_count"):
        PromptEHRTokenizer.from_patients(patients, min_code_count=0)


def test_encode_history_keeps_newest_visits():
    tok = PromptEHRTokenizer.from_patients(_cohort(50, 0))
    visits = [["4019"], ["25000", "486"], ["5849"]]
    enc = [tok.encode_visit(v) for v in visits]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert tok.encode_history([], 10) == [bos, eos]
    assert tok.encode_history(visits) == tok.encode_patient(visits)
    full = 2 + sum(map(len, enc))
    assert tok.encode_history(visits, full) == tok.encode_patient(visits)
    assert tok.encode_history(visits, full - 1) == [bos, *enc[1], *enc[2], eos]
    assert tok.encode_history(visits, 2 + len(enc[2])) == [bos, *enc[2], eos]
    # the newest visit alone too long: its leading (category, code) pairs that fit
    assert tok.encode_history([visits[1]], 2 + 4) == [bos, *enc[1][:3], tok.visit_end_id, eos]
    assert tok.encode_history([visits[1]], 2 + 3) == [bos, eos]
    for max_length in range(2, full + 2):
        assert len(tok.encode_history(visits, max_length)) <= max_length
    with pytest.raises(ValueError):
        tok.encode_history(visits, 1)


def test_batch_padding_through_the_base_class():
    tok = PromptEHRTokenizer.from_patients(_cohort(50, 0))
    a, b = tok.encode_patient([["4019", "25000"]]), tok.encode_patient([])
    out = tok.pad({"input_ids": [a, b]}, return_tensors="pt")
    assert out["input_ids"].shape == (2, len(a))
    assert out["input_ids"][1].tolist() == b + [tok.pad_token_id] * (len(a) - len(b))
    assert out["attention_mask"][1].tolist() == [1] * len(b) + [0] * (len(a) - len(b))
    enc = tok([tok.decode(a), tok.decode(b)], padding=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == out["input_ids"].tolist()


def test_save_and_load_round_trip(tmp_path):
    patients = _cohort(60, 2)
    tok = PromptEHRTokenizer.from_patients(patients, min_code_count=3)
    tok.save_pretrained(tmp_path)
    assert {"vocab.json", "hierarchy.json", "tokenizer_config.json", "tokenization_promptehr.py"} <= set(
        os.listdir(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_promptehr.PromptEHRTokenizer"
    hierarchy = json.loads((tmp_path / "hierarchy.json").read_text())
    assert hierarchy["min_code_count"] == 3 and hierarchy["folded_codes"] == tok.folded_codes
    assert hierarchy["category_children"]["C:401"] == [
        tok.convert_ids_to_tokens(i) for i in tok.category_children[tok.convert_tokens_to_ids("C:401")]]
    loaded = PromptEHRTokenizer.from_pretrained(tmp_path)
    for attr in ("category_ids", "code_ids", "code_category", "category_children", "code_probs", "code_counts"):
        assert getattr(loaded, attr) == getattr(tok, attr), attr
    assert all(loaded.encode_patient(p["visits"]) == tok.encode_patient(p["visits"]) for p in patients)


# Runs with `python -I -S`: no PYTHONPATH, no cwd, no .pth files (so the editable install of this
# package is invisible); only the interpreter's site-packages is put back for transformers.
_CHILD = textwrap.dedent("""
    import json, sys
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    patients = json.loads(open(sys.argv[2]).read())
    print(json.dumps({
        "class": type(tok).__module__ + "." + type(tok).__name__,
        "ids": [tok.encode_patient(p["visits"]) for p in patients],
        "visits": [tok.decode_visits(tok.encode_patient(p["visits"])) for p in patients],
        "fallback_counts": tok.fallback_counts,
        "code_probs": {str(k): v for k, v in tok.code_probs.items()},
        "category_children": {str(k): v for k, v in tok.category_children.items()},
        "pad": tok.pad({"input_ids": [[1, 2], [1]]})["input_ids"],
        "package_modules": sorted(m for m in sys.modules if m.split(".")[0] == "promptehr_hf"),
    }))
""")


def test_autotokenizer_in_a_clean_process(tmp_path, run_clean_python):
    train, other = _cohort(60, 3), _cohort(20, 4)
    other[0]["visits"].append(["4011", "71234"])  # unseen code and unseen category
    tok = PromptEHRTokenizer.from_patients(train, min_code_count=2)
    save_dir = tmp_path / "tokenizer"
    tok.save_pretrained(save_dir)
    patients = train + other
    (tmp_path / "patients.json").write_text(json.dumps(patients))
    proc = run_clean_python(_CHILD, save_dir, tmp_path / "patients.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["class"].startswith("transformers_modules.") and child["class"].endswith(".PromptEHRTokenizer")
    assert child["package_modules"] == []
    tok.reset_fallback_counts()
    assert child["ids"] == [tok.encode_patient(p["visits"]) for p in patients]
    assert child["visits"] == [tok.decode_visits(tok.encode_patient(p["visits"])) for p in patients]
    assert child["fallback_counts"] == tok.fallback_counts and tok.fallback_counts["unk"] >= 1
    assert child["code_probs"] == {str(k): v for k, v in tok.code_probs.items()}
    assert child["category_children"] == {str(k): v for k, v in tok.category_children.items()}
    assert child["pad"] == [[1, 2], [1, tok.pad_token_id]]


def test_autotokenizer_in_process(tmp_path):
    tok = PromptEHRTokenizer.from_patients(_cohort(30, 5))
    tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(auto).__name__ == "PromptEHRTokenizer"
    p = _cohort(5, 6)
    assert [auto.encode_patient(x["visits"]) for x in p] == [tok.encode_patient(x["visits"]) for x in p]


def test_mimic_demo_round_trip(demo_dir):
    mimic3 = pytest.importorskip("promptehr_hf.datasets_scripts.mimic3")
    patients, _ = mimic3.read_mimic3(demo_dir)
    assert len(patients) == 100
    cohort = pytest.importorskip("promptehr_hf.datasets_scripts.cohort")
    train = cohort.split_patients(patients, seed=0)["train"]
    tok = PromptEHRTokenizer.from_patients(train)
    exact = fallback = total_cat = 0
    for p in patients:
        tok.reset_fallback_counts()
        decoded = tok.decode_visits(tok.encode_patient(p["visits"]))
        expected, n_cat, n_unk = _expected_visits(tok, p["visits"])
        assert decoded == expected, p["subject_id"]
        assert tok.fallback_counts == {"category": n_cat, "unk": n_unk}, p["subject_id"]
        if n_cat + n_unk == 0:
            assert decoded == p["visits"], p["subject_id"]
            exact += 1
        else:
            fallback += 1
        total_cat += n_cat
    # every training patient is in vocabulary; some held-out patients need the fallback
    assert exact >= len(train) and fallback >= 1 and total_cat >= 1
