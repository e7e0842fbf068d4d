"""Corpus readers: every input format, and exact per-reason counts for bad records."""
import gzip
import json
import random

import pytest
import zstandard

from data_prep.cli import UsageError
from data_prep.readers import Defect, Doc, UnitReader, discover_inputs

TEXTS = ["Fellow citizens of the Senate.", "naïve café — 日本語 🚀\nsecond line", "x" * 5000, "tab\tand <|endoftext|>"]


def records(texts=TEXTS, subset="StateOfTheUnion"):
    return [{"text": t, "meta": {"pile_set_name": subset, "n": i}} for i, t in enumerate(texts)]


def jsonl_bytes(recs):
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in recs)


def read_all(path, **kw):
    units = discover_inputs([str(path)])
    return [item for unit in units for item in UnitReader(unit, **kw)]


def texts_of(items):
    assert all(isinstance(i, Doc) for i in items), [i for i in items if not isinstance(i, Doc)]
    return [i.text for i in items]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".jsonl.gz"])
def test_jsonl_family(tmp_path, suffix):
    data = jsonl_bytes(records())
    path = tmp_path / f"corpus{suffix}"
    if suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif suffix.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    items = read_all(path, split_by="pile_set_name")
    assert texts_of(items) == TEXTS
    assert {i.subset for i in items} == {"StateOfTheUnion"}


def test_multi_frame_zst_is_not_truncated(tmp_path):
    c = zstandard.ZstdCompressor()
    recs = records()
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(c.compress(jsonl_bytes(recs[:2])) + c.compress(jsonl_bytes(recs[2:])))
    assert texts_of(read_all(path)) == TEXTS


def test_parquet_and_flat_split_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "corpus.parquet"
    table = pa.table({"text": TEXTS + [None], "pile_set_name": ["A", "B", "A", "B", "A"]})
    pq.write_table(table, path, row_group_size=2)
    items = read_all(path, split_by="pile_set_name")
    assert texts_of(items[:4]) == TEXTS and [i.subset for i in items[:4]] == ["A", "B", "A", "B"]
    assert items[4] == Defect("missing_text", f"{path}:5")


def test_txt_modes(tmp_path):
    path = tmp_path / "speech.txt"
    path.write_text("Para one\nstill one\n\n\nPara two\n", encoding="utf-8")
    assert texts_of(read_all(path)) == ["Para one\nstill one\n\n\nPara two\n"]
    assert texts_of(read_all(path, txt_mode="paragraph")) == ["Para one\nstill one", "Para two"]
    assert texts_of(read_all(path, txt_mode="line")) == ["Para one", "still one", "Para two"]


def test_hf_dataset_and_dataset_dict(tmp_path):
    import datasets
    ds = datasets.Dataset.from_list(records())
    ds.save_to_disk(str(tmp_path / "ds"))
    items = read_all(tmp_path / "ds", split_by="pile_set_name")
    assert texts_of(items) == TEXTS and items[0].subset == "StateOfTheUnion"
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    units = discover_inputs([str(tmp_path / "dd")])
    assert [u.hf_split for u in units] == ["train", "validation"]
    assert texts_of(read_all(tmp_path / "dd")) == TEXTS + TEXTS[:1]


def test_folder_walk_is_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "1.txt").write_text("one")
    (tmp_path / "notes.md").write_text("ignored")
    assert texts_of(read_all(tmp_path)) == ["one", "two"]


def defect_file(tmp_path):
    """One record per defect, around good ones; returns (path, expected reasons by line)."""
    lines = [
        json.dumps({"text": "good one"}).encode(),             # 1 ok
        b'{"text": "unterminated',                              # 2 malformed_json
        json.dumps({"body": "no text key"}).encode(),          # 3 missing_text
        json.dumps({"text": None}).encode(),                   # 4 missing_text (null)
        json.dumps({"text": 42}).encode(),                     # 5 non_string_text
        json.dumps({"text": ["a", "b"]}).encode(),             # 6 non_string_text
        json.dumps({"text": ""}).encode(),                     # 7 empty
        json.dumps({"text": " \n\t "}).encode(),               # 8 empty
        b'{"text": "bad \xff\xfe bytes"}',                      # 9 invalid_utf8 (raw bytes)
        b'{"text": "lone \\ud800 surrogate"}',                 # 10 invalid_utf8 (JSON escape)
        b"[1, 2, 3]",                                           # 11 malformed_json (not an object)
        b"",                                                    # 12 blank line: ignored, not counted
        json.dumps({"text": "good two"}).encode(),             # 13 ok
    ]
    path = tmp_path / "defects.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = {2: "malformed_json", 3: "missing_text", 4: "missing_text", 5: "non_string_text",
                6: "non_string_text", 7: "empty", 8: "empty", 9: "invalid_utf8", 10: "invalid_utf8",
                11: "malformed_json"}
    return path, expected


def test_each_defect_is_classified_with_its_line(tmp_path):
    path, expected = defect_file(tmp_path)
    items = read_all(path)
    assert [i.text for i in items if isinstance(i, Doc)] == ["good one", "good two"]
    defects = [i for i in items if isinstance(i, Defect)]
    assert [(d.location, d.reason) for d in defects] == [(f"{path}:{n}", r) for n, r in expected.items()]


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_compressed_file(tmp_path, suffix):
    rng = random.Random(0)  # incompressible-ish text, so half the compressed file decodes to many lines
    recs = records([" ".join(str(rng.random()) for _ in range(40)) for _ in range(400)])
    raw = jsonl_bytes(recs)
    data = zstandard.ZstdCompressor().compress(raw) if suffix.endswith("zst") else gzip.compress(raw)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    items = read_all(path)
    docs = [i for i in items if isinstance(i, Doc)]
    assert 0 < len(docs) < 400
    assert [d.text for d in docs] == [r["text"] for r in recs[: len(docs)]]  # every complete line kept
    assert items[-1] == Defect("truncated", f"{path}:{len(docs) + 1}")     # the cut line is reported
    assert sum(isinstance(i, Defect) for i in items) == 1


def test_missing_split_field_and_missing_inputs(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes([{"text": "no meta"}]))
    assert read_all(path, split_by="pile_set_name") == [Defect("missing_split_field", f"{path}:1")]
    with pytest.raises(UsageError, match="input not found"):
        discover_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(UsageError, match="unsupported input file"):
        discover_inputs([str(tmp_path / "x.csv")]) if (tmp_path / "x.csv").write_text("a") else None
