"""data_prep.tokenize on hostile corpora: a bad record is a counted defect with its file:line, an unreadable file
is one error line naming it (or, with --skip-bad-files, skipped and listed), never a traceback and never a
half-written output; --split-by values never share an output file."""
import json

import pytest

from data_prep.cli import run_main
from data_prep import tokenize
from tests.helpers import GPT2, expected_ids, read_back, write_jsonl


def run(argv, capsys):
    code = run_main(tokenize.main, [str(a) for a in argv])
    return code, capsys.readouterr()


def outputs(tmp_path, prefix="o"):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(prefix + ".") or
                  p.name.startswith(prefix + "_"))


def test_deeply_nested_record_is_a_defect_not_a_crash(tmp_path, gpt2, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n" + "[" * 200_000 + "]" * 200_000 + "\n"
                    + '{"text": "x", "meta": ' + "[" * 200_000 + "]" * 200_000 + "}\n"
                    + json.dumps({"text": "last"}) + "\n")
    code, out = run(["--input", path, "--tokenizer", GPT2, "--output-prefix", tmp_path / "o", "--workers", "0"],
                    capsys)
    assert code == 0, out.err
    stats = json.loads((tmp_path / "o.stats.json").read_text())
    assert stats["skipped"]["malformed_json"] == 2
    assert stats["skipped_examples"]["malformed_json"] == [f"{path}:2", f"{path}:3"]
    assert read_back(tmp_path / "o")[0] == expected_ids(gpt2, ["first", "last"])


def _corrupt_inputs(tmp_path):
    """A good file, a parquet file that is not parquet, a saved dataset whose arrow data is garbage, a good file."""
    import datasets
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ["alpha"])
    (folder / "b.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    datasets.Dataset.from_dict({"text": ["gamma"]}).save_to_disk(str(folder / "c_hf"))
    for arrow in (folder / "c_hf").glob("*.arrow"):
        arrow.write_bytes(b"\x00garbage" * 10)
    write_jsonl(folder / "d.jsonl", ["delta"])
    return folder


def test_unreadable_file_is_one_line_naming_it_and_nothing_half_written(tmp_path, capsys):
    folder = _corrupt_inputs(tmp_path)
    capsys.readouterr()   # datasets' own progress bar while building the inputs
    argv = ["--input", folder, "--tokenizer", GPT2, "--output-prefix", tmp_path / "o", "--workers", "0"]
    code, out = run(argv, capsys)
    assert code == 1 and "Traceback" not in out.err
    assert len(out.err.strip().splitlines()) == 1, out.err
    assert out.err.startswith(f"error: {folder / 'b.parquet'}: cannot read this parquet input") and \
        "--skip-bad-files" in out.err
    assert outputs(tmp_path) == ["o.shards"]                     # no PREFIX.bin/.idx/.stats.json
    assert not list((tmp_path / "o.shards").glob("*.tmp"))       # no half-written shard either
    assert sorted(p.name for p in (tmp_path / "o.shards").glob("*.done.json")) == ["00000.done.json"]


def test_skip_bad_files_skips_and_reports_them(tmp_path, gpt2, capsys):
    folder = _corrupt_inputs(tmp_path)
    capsys.readouterr()   # datasets' own progress bar while building the inputs
    argv = ["--input", folder, "--tokenizer", GPT2, "--output-prefix", tmp_path / "o", "--workers", "0"]
    code, out = run([*argv, "--skip-bad-files"], capsys)
    assert code == 0, out.err
    assert read_back(tmp_path / "o")[0] == expected_ids(gpt2, ["alpha", "delta"])
    stats = json.loads((tmp_path / "o.stats.json").read_text())
    assert sorted(stats["skipped_files"]) == [str(folder / "b.parquet"), str(folder / "c_hf")]
    assert "cannot read this hf input" in stats["skipped_files"][str(folder / "c_hf")]
    assert "skipped 2 unreadable input(s)" in out.out and "Traceback" not in out.err
    # the same command without the flag does not call that run complete: it fails on the bad file again
    code, out = run(argv, capsys)
    assert code == 1 and "b.parquet: cannot read" in out.err


@pytest.mark.parametrize("files", [
    [["a b", "a_b"]],                          # both in one file
    [["a b"], ["a_b"]],                        # in different files
    [["x(1)", "x 1", "x_1", "x-1", "x  1"]],   # every lossy spelling of one stem
])
def test_split_by_values_never_share_an_output(tmp_path, gpt2, capsys, files):
    paths = []
    for i, subsets in enumerate(files):
        path = tmp_path / f"{i}.jsonl"
        path.write_text("".join(json.dumps({"text": f"doc of {s}", "meta": {"set": s}}) + "\n" for s in subsets))
        paths.append(path)
    code, out = run(["--input", *paths, "--tokenizer", GPT2, "--output-prefix", tmp_path / "o", "--workers", "0",
                     "--split-by", "set"], capsys)
    assert code == 0, out.err
    stats = json.loads((tmp_path / "o.stats.json").read_text())
    names = [s for subsets in files for s in subsets]
    assert sorted(stats["outputs"]) == sorted(names)
    assert len(set(stats["outputs"].values())) == len(names)
    for name, prefix in stats["outputs"].items():   # each output holds exactly its own subset's document
        assert read_back(prefix)[0] == expected_ids(gpt2, [f"doc of {name}"])
