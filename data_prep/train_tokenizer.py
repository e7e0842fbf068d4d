"""Train a byte-level BPE tokenizer (GPT-2 style) on local files and save it as an HF tokenizer folder.

    python -m data_prep.train_tokenizer --input assets/corpus/sotu.jsonl.zst --vocab-size 8192 \
        --output assets/tokenizers/sotu-bpe-8k

Reads every format `data_prep.tokenize` reads. Byte-level means any text encodes (no unknown token).
The result is deterministic for the same inputs and settings, so the committed demo tokenizer can be rebuilt.
"""
import os
import sys
import time
from collections import Counter

from data_prep.cli import OneLineArgumentParser, UsageError, run_main
from data_prep.readers import Doc, UnitReader, discover_inputs

EOD = "<|endoftext|>"


def iter_texts(units, text_key, skipped: Counter):
    for unit in units:
        for item in UnitReader(unit, text_key=text_key):
            if isinstance(item, Doc):
                yield item.text
            else:
                skipped[item.reason] += 1


def train_bpe(units, vocab_size: int, text_key="text", min_frequency=2, show_progress=True):
    """Return (PreTrainedTokenizerFast, skipped-per-reason Counter)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No bos/eos added by encode(): data_prep.tokenize appends exactly one EOD per document itself.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    skipped = Counter()
    tok.train_from_iterator(iter_texts(units, text_key, skipped), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD, bos_token=EOD, unk_token=EOD)
    return hf, skipped


def main(argv=None):
    p = OneLineArgumentParser(prog="python -m data_prep.train_tokenizer", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="files or folders (same formats as tokenize)")
    p.add_argument("--vocab-size", type=int, required=True, help="total size including the 256 bytes and EOD")
    p.add_argument("--output", required=True, help="folder to write the HF tokenizer to")
    p.add_argument("--text-key", default="text")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    args = p.parse_args(argv)
    if args.vocab_size < 258:
        raise UsageError(f"--vocab-size {args.vocab_size} is too small (a byte-level BPE needs at least 258: "
                         f"256 bytes, the EOD token and one merge)")
    units = discover_inputs(args.input)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} is a file (give a folder path)")
    t0 = time.time()
    hf, skipped = train_bpe(units, args.vocab_size, args.text_key, args.min_frequency, sys.stderr.isatty())
    os.makedirs(args.output, exist_ok=True)
    hf.save_pretrained(args.output)
    skipped_txt = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
    print(f"trained byte-level BPE: vocab {len(hf)} (eos {EOD!r} = {hf.eos_token_id}) from {len(units)} input(s) "
          f"in {time.time() - t0:.1f}s; skipped: {skipped_txt}; saved to {args.output}")


if __name__ == "__main__":
    sys.exit(run_main(main))
