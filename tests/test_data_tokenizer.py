"""`python -m data_prep.train_tokenizer` and tokenizer loading."""
from pathlib import Path

import pytest

from data_prep import train_tokenizer
from data_prep.cli import run_main
from data_prep.hf_tokenizer import TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_committed_demo_tokenizer_is_reproducible(tmp_path, capsys):
    argv = ["--input", str(ROOT / "assets/corpus/sotu.jsonl.zst"), "--vocab-size", "8192",
            "--output", str(tmp_path / "tok")]
    assert run_main(train_tokenizer.main, argv) == 0
    assert "vocab 8192" in capsys.readouterr().out
    committed = ROOT / "assets/tokenizers/sotu-bpe-8k"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).read_bytes() == (committed / name).read_bytes(), name


def test_trained_tokenizer_loads_with_autotokenizer_and_round_trips(tmp_path):
    from transformers import AutoTokenizer
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    (tmp_path / "b.txt").write_text("Fellow citizens, the state of the union is strong. " * 50)
    assert run_main(train_tokenizer.main, ["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                                           "--vocab-size", "300", "--output", str(tmp_path / "tok")]) == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    text = "Unseen bytes too: é 日本 🚀 <|endoftext|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids[-1] == tok.eos_token_id  # byte-level: nothing is unknown


def test_load_tokenizer_errors_name_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer folder not found.*train_tokenizer"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer in .*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path)
    assert run_main(train_tokenizer.main, ["--input", str(tmp_path / "x.jsonl"), "--vocab-size", "300",
                                           "--output", str(tmp_path / "o")]) == 2
