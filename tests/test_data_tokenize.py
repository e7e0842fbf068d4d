"""`python -m data_prep.tokenize` / `data_prep.merge`: read-back equality, defects, resume after a kill, CLI errors."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from data_prep import merge, tokenize
from data_prep.cli import run_main
from tests.helpers import GPT2, ROOT, SOTU_BPE, expected_ids, read_back, write_jsonl

TEXTS = ["Fellow citizens of the Senate and House of Representatives:", "naïve café — 日本語 🚀\n\nline two",
         "It has <|endoftext|> inside.", "  leading spaces and trailing  ", "The Union is strong. " * 300]


def run(argv, capsys=None):
    code = run_main(tokenize.main, [str(a) for a in argv])
    out = capsys.readouterr() if capsys else None
    return code, out


def test_every_format_reads_back_as_encode_plus_eod(tmp_path, gpt2, capsys):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_jsonl(inputs / "a.jsonl", TEXTS[:2])
    write_jsonl(inputs / "b.jsonl.zst", TEXTS[2:], zst=True)
    pq.write_table(pa.table({"text": TEXTS[:3]}), inputs / "c.parquet")
    (inputs / "d.txt").write_text(TEXTS[4], encoding="utf-8")
    datasets.Dataset.from_dict({"text": TEXTS[1:]}).save_to_disk(str(inputs / "e_hf"))
    code, out = run(["--input", inputs, "--tokenizer", GPT2, "--output-prefix", tmp_path / "out/c",
                     "--workers", "2"], capsys)
    assert code == 0, out.err
    order = TEXTS[:2] + TEXTS[2:] + TEXTS[:3] + [TEXTS[4]] + TEXTS[1:]  # sorted walk: a, b, c, d, e_hf
    docs, dtype = read_back(tmp_path / "out/c")
    assert dtype == numpy.uint16
    assert docs == expected_ids(gpt2, order)
    stats = json.loads((tmp_path / "out/c.stats.json").read_text())
    assert stats["documents"] == len(order) and stats["tokens"] == sum(map(len, docs))
    assert sum(stats["skipped"].values()) == 0
    assert not (tmp_path / "out/c.shards").exists()  # merged, shards removed
    assert f"tokenized {len(order)} documents" in out.out


def test_int32_ids_when_vocabulary_exceeds_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(70000)} | {"<unk>": 70000, "<eod>": 70001}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eod>", unk_token="<unk>").save_pretrained(
        str(tmp_path / "tok"))
    write_jsonl(tmp_path / "a.jsonl", ["w69999 w5 what", "w65536"])
    assert run(["--input", tmp_path / "a.jsonl", "--tokenizer", tmp_path / "tok", "--output-prefix",
                tmp_path / "o", "--workers", "0"])[0] == 0
    docs, dtype = read_back(tmp_path / "o")
    assert dtype == numpy.int32 and docs == [[69999, 5, 70000, 70001], [65536, 70001]]


def write_defect_file(path):
    """Two good records around one or two of each defect (line numbers matter for the examples)."""
    lines = [json.dumps({"text": "good one"}).encode(), b'{"text": "unterminated',  # 2 malformed_json
             json.dumps({"body": "x"}).encode(), json.dumps({"text": None}).encode(),  # 3, 4 missing_text
             json.dumps({"text": 42}).encode(), json.dumps({"text": [1]}).encode(),  # 5, 6 non_string_text
             json.dumps({"text": ""}).encode(), json.dumps({"text": " \n "}).encode(),  # 7, 8 empty
             b'{"text": "bad \xff bytes"}', b'{"text": "lone \\ud800"}',  # 9, 10 invalid_utf8
             b"[1, 2, 3]", b"", json.dumps({"text": "good two"}).encode()]  # 11 malformed_json, 12 blank
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_defects_counted_exactly_and_strict_stops(tmp_path, gpt2, capsys):
    path = write_defect_file(tmp_path / "defects.jsonl")
    rng = random.Random(0)  # hard-to-compress text, so the first half of the .zst decodes to many lines
    cut = write_jsonl(tmp_path / "cut.jsonl.zst", [" ".join(str(rng.random()) for _ in range(30))
                                                   for _ in range(1000)], zst=True)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    code, out = run(["--input", path, cut, "--tokenizer", GPT2, "--output-prefix", tmp_path / "o",
                     "--workers", "1"], capsys)
    assert code == 0, out.err
    stats = json.loads((tmp_path / "o.stats.json").read_text())
    assert stats["skipped"] == {"malformed_json": 2, "missing_text": 2, "non_string_text": 2, "empty": 2,
                                "invalid_utf8": 2, "truncated": 1, "missing_split_field": 0}
    assert stats["skipped_examples"]["malformed_json"] == [f"{path}:2", f"{path}:11"]
    assert stats["skipped_examples"]["truncated"][0].startswith(f"{cut}:")
    docs, _ = read_back(tmp_path / "o")
    assert docs[:2] == expected_ids(gpt2, ["good one", "good two"])
    assert stats["documents"] == len(docs) > 2
    assert "malformed_json=2" in out.out

    code, out = run(["--input", path, "--tokenizer", GPT2, "--output-prefix", tmp_path / "s", "--strict"], capsys)
    assert code == 1
    assert out.err.strip() == f"error: {path}:2: malformed_json (--strict stops at the first bad record; " \
                              f"without --strict such records are counted and skipped)"
    assert not (tmp_path / "s.idx").exists() and "Traceback" not in out.err


def test_split_by_writes_one_dataset_per_subset_and_merge_cli(tmp_path, gpt2, capsys):
    write_jsonl(tmp_path / "1.jsonl", TEXTS[:2], subset="Pile-CC")
    write_jsonl(tmp_path / "2.jsonl", TEXTS[2:], subset="Ubuntu IRC")
    write_jsonl(tmp_path / "3.jsonl", TEXTS[:1], subset="Pile-CC")
    inputs = [tmp_path / f"{i}.jsonl" for i in (1, 2, 3)]
    code, out = run(["--input", *inputs, "--tokenizer", GPT2, "--output-prefix", tmp_path / "p",
                     "--split-by", "pile_set_name", "--workers", "0"], capsys)
    assert code == 0, out.err
    assert read_back(tmp_path / "p_Pile-CC")[0] == expected_ids(gpt2, TEXTS[:2] + TEXTS[:1])
    assert read_back(tmp_path / "p_Ubuntu_IRC")[0] == expected_ids(gpt2, TEXTS[2:])
    stats = json.loads((tmp_path / "p.stats.json").read_text())
    assert stats["subsets"]["Pile-CC"]["documents"] == 3 and stats["subsets"]["Ubuntu IRC"]["documents"] == 3

    # --no-merge keeps one shard per input; data_prep.merge then gives the same bytes as the merged run.
    assert run(["--input", *inputs, "--tokenizer", GPT2, "--output-prefix", tmp_path / "q", "--no-merge",
                "--workers", "0"], capsys)[0] == 0
    shard_idx = sorted(p.name for p in (tmp_path / "q.shards").glob("*.idx"))
    assert shard_idx == ["00000.idx", "00001.idx", "00002.idx"]
    assert run(["--input", *inputs, "--tokenizer", GPT2, "--output-prefix", tmp_path / "r", "--workers", "0"])[0] == 0
    assert run_main(merge.main, ["--inputs", str(tmp_path / "q.shards"), "--output-prefix", str(tmp_path / "m")]) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"m{ext}").read_bytes() == (tmp_path / f"r{ext}").read_bytes()


def test_worker_count_does_not_change_bytes_and_rerun_is_a_noop(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", TEXTS * 50)
    for w in (0, 2):
        assert run(["--input", src, "--tokenizer", SOTU_BPE, "--output-prefix", tmp_path / f"w{w}",
                    "--workers", w])[0] == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w0{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    capsys.readouterr()
    code, out = run(["--input", src, "--tokenizer", SOTU_BPE, "--output-prefix", tmp_path / "w0"], capsys)
    assert code == 0 and out.out.startswith("already complete")
    # Killed after all shards finished but before the merge completed: the rerun only merges.
    argv = ["--input", src, "--tokenizer", SOTU_BPE, "--output-prefix", tmp_path / "k", "--keep-shards"]
    assert run(argv)[0] == 0
    first = (tmp_path / "k.bin").read_bytes()
    for name in ("k.bin", "k.idx", "k.stats.json"):
        (tmp_path / name).unlink()
    assert run(argv)[0] == 0
    assert (tmp_path / "k.bin").read_bytes() == first
    assert json.loads((tmp_path / "k.stats.json").read_text())["shards_resumed"] == 1


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tmp_path):
    many = [f"Document {i}: " + TEXTS[i % 4] for i in range(1500)]  # 2 batches (of <= 1024 docs) per file
    inputs = [write_jsonl(tmp_path / f"part{i}.jsonl", many) for i in range(3)]
    argv = ["--input", *map(str, inputs), "--tokenizer", SOTU_BPE, "--workers", "1"]
    env = dict(os.environ, DATA_PREP_TEST_DELAY_S="0.4", PYTHONPATH=str(ROOT))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.tokenize", *argv, "--output-prefix", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    shards = Path(str(killed) + ".shards")
    deadline = time.time() + 120
    try:  # kill once one shard is finished and the next is half written
        while not (list(shards.glob("*.done.json")) and list(shards.glob("*.bin.tmp"))):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "run never reached the middle"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not Path(str(killed) + ".idx").exists() and not Path(str(killed) + ".stats.json").exists()
    half = [p for p in shards.glob("*.bin.tmp")]
    assert half and not any(Path(str(p)[: -len(".bin.tmp")] + ".idx").exists() for p in half)

    assert run([*argv, "--output-prefix", killed])[0] == 0  # the same command resumes
    assert run([*argv, "--output-prefix", tmp_path / "clean"])[0] == 0
    for ext in (".bin", ".idx"):
        assert Path(str(killed) + ext).read_bytes() == (tmp_path / f"clean{ext}").read_bytes()
    assert json.loads(Path(str(killed) + ".stats.json").read_text())["shards_resumed"] >= 1


def test_merge_refuses_missing_and_mixed_dtype_inputs(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["w1 w2"])
    assert run(["--input", tmp_path / "a.jsonl", "--tokenizer", SOTU_BPE, "--output-prefix", tmp_path / "u16",
                "--workers", "0"])[0] == 0
    (tmp_path / "i32.bin").write_bytes(b"")  # an empty int32 dataset, written by megatron-core's builder
    from data_prep.shards import indexed_dataset_builder
    indexed_dataset_builder(str(tmp_path / "i32.bin"), numpy.int32).finalize(str(tmp_path / "i32.idx"))
    capsys.readouterr()
    assert run_main(merge.main, ["--inputs", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "m")]) == 2
    assert "dataset " in capsys.readouterr().err
    assert run_main(merge.main, ["--inputs", str(tmp_path / "u16"), str(tmp_path / "i32"),
                                 "--output-prefix", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different vocabularies" in err and not (tmp_path / "m.idx").exists()


@pytest.mark.slow
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "empty_tok").mkdir()
    write_jsonl(tmp_path / "a.jsonl", ["x"])
    cases = {
        "input not found": ["--input", tmp_path / "missing.jsonl", "--tokenizer", GPT2, "--output-prefix", tmp_path / "o"],
        "no tokenizer in": ["--input", tmp_path / "a.jsonl", "--tokenizer", tmp_path / "empty_tok",
                            "--output-prefix", tmp_path / "o"],
        "required": ["--tokenizer", GPT2],
    }
    for needle, argv in cases.items():
        proc = subprocess.run([sys.executable, "-m", "data_prep.tokenize", *map(str, argv)], cwd=ROOT,
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        lines = [l for l in proc.stderr.splitlines() if "warn" not in l.lower()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
