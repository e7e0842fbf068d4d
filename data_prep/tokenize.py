"""Tokenize corpora into Megatron indexed datasets (PREFIX.bin + PREFIX.idx), one EOD token after each document.

    python -m data_prep.tokenize --input FILE_OR_DIR... --tokenizer DIR --output-prefix PREFIX \
        [--workers N] [--text-key text] [--split-by META_FIELD] [--strict] [--skip-bad-files]

Each input file (or HF dataset split) is tokenized into its own shard under PREFIX.shards/, then the shards are
merged into PREFIX (with --split-by, into PREFIX_<value> per value). Rerunning the same command after an
interruption skips finished shards and produces byte-identical output. PREFIX.stats.json is written last.
"""
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures.process import BrokenProcessPool

from data_prep.cli import DataError, OneLineArgumentParser, UsageError, run_main
from data_prep.hf_tokenizer import load_tokenizer, token_dtype
from data_prep.merge import merge_datasets
from data_prep.progress import Progress, duration, human
from data_prep.readers import REASONS, Defect, UnitReader, UnreadableInput, discover_inputs
from data_prep.shards import (OrderedEncoder, ShardWriter, UnitStats, indexed_dataset_module, subset_collisions,
                              write_json_atomically)

BATCH_CHARS = 1 << 20   # a batch is ~1 MB of text: large enough to amortise IPC, small enough to stay flat
BATCH_DOCS = 1024
FORMAT_VERSION = 2      # bump when the shard layout changes (2: one-to-one --split-by file names), so old shard folders are not resumed
_END = "end"
_SKIP = "skip"
# Test hook: seconds to sleep per written batch, so a test can kill a run midway at a predictable point.
_TEST_DELAY_S = float(os.environ.get("DATA_PREP_TEST_DELAY_S", "0") or 0)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv):
    p = OneLineArgumentParser(prog="python -m data_prep.tokenize", description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl, .jsonl.zst, .jsonl.gz, .parquet, .txt files, HF datasets saved to disk, "
                        "or folders of them (walked in sorted order)")
    p.add_argument("--tokenizer", required=True, help="local HF tokenizer folder (e.g. assets/tokenizers/gpt2)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="tokenizer processes (default: one per core; 0 = tokenize in this process)")
    p.add_argument("--text-key", default="text", help="field holding the document text (default: text)")
    p.add_argument("--split-by", default=None, metavar="META_FIELD",
                   help="write one dataset per value of meta[META_FIELD], e.g. pile_set_name")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="an input that cannot be read at all (corrupt parquet, broken saved dataset, no permission) "
                        "is skipped and listed in the stats instead of stopping the run")
    p.add_argument("--txt-mode", choices=("file", "paragraph", "line"), default="file",
                   help=".txt files: one document per file (default), per blank-line-separated paragraph, "
                        "or per line")
    p.add_argument("--no-merge", action="store_true",
                   help="keep the per-input shards in PREFIX.shards/ and skip the merge (merge later with "
                        "python -m data_prep.merge)")
    p.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    p.add_argument("--log-interval", type=float, default=10.0,
                   help="seconds between progress lines when stderr is not a terminal")
    args = p.parse_args(argv)
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers} must be >= 0 (0 tokenizes in the main process)")
    for suffix in (".bin", ".idx"):
        if args.output_prefix.endswith(suffix):
            args.output_prefix = args.output_prefix[: -len(suffix)]
    if os.path.isdir(args.output_prefix):
        raise UsageError(f"--output-prefix {args.output_prefix} is a folder (give a path prefix like "
                         f"{os.path.join(args.output_prefix, 'corpus')})")
    return args


def fingerprint(units, tokenizer_json, args, dtype) -> str:
    """What determines the output bytes; a resume is only allowed when it is unchanged (--workers is not)."""
    key = {"version": FORMAT_VERSION, "units": [(u.name, u.size, u.mtime_ns) for u in units],
           "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(), "text_key": args.text_key,
           "split_by": args.split_by, "txt_mode": args.txt_mode, "dtype": dtype.__name__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


class CorpusTokenizer:
    def __init__(self, args, units, tokenizer, dtype, shard_dir):
        self.args, self.units, self.dtype, self.shard_dir = args, units, dtype, shard_dir
        self.tokenizer_json = tokenizer.backend_tokenizer.to_str()
        self.eod = tokenizer.eos_token_id
        self.active = []  # writers with files open, to clean up on failure
        self.bad_files = {}  # unit index -> one-line reason, for units skipped under --skip-bad-files

    def shard_prefix(self, index):
        return os.path.join(self.shard_dir, f"{index:05d}")

    def done_path(self, index):
        return self.shard_prefix(index) + ".done.json"

    def run(self, todo, progress):
        """Tokenize the units `todo` ([(index, unit)]) into shards."""
        if not todo:
            return
        encoder = OrderedEncoder(self.args.workers, self.tokenizer_json, self.eod, self.dtype.__name__)
        try:
            for tag, texts in self._batches(todo, progress):
                for done_tag, result in encoder.submit(tag, texts):
                    self._write(done_tag, result, progress)
            for done_tag, result in encoder.drain():
                self._write(done_tag, result, progress)
            encoder.close()
        except BaseException as err:
            encoder.close(abort=True)
            for writer in self.active:
                writer.abort()
            if isinstance(err, BrokenProcessPool):
                raise DataError("a tokenizer worker process died (out of memory?); finished shards are kept, "
                                "rerun the same command (perhaps with fewer --workers) to resume") from None
            raise

    def _batches(self, todo, progress):
        """Read units in order and cut them into batches; yields (tag, texts). Defects are counted here."""
        finished_bytes = 0
        for index, unit in todo:
            writer = ShardWriter(self.shard_prefix(index), self.dtype, bool(self.args.split_by))
            writer.stats.input_bytes = unit.size
            self.active.append(writer)
            reader = UnitReader(unit, self.args.text_key, self.args.split_by, self.args.txt_mode)
            texts, subsets, chars = [], [], 0
            items = iter(reader)
            while True:
                try:
                    item = next(items, None)
                except UnreadableInput as err:
                    item = err
                if item is None:
                    break
                if isinstance(item, UnreadableInput):
                    if not self.args.skip_bad_files:
                        raise DataError(f"{item}; fix or remove it, or rerun with --skip-bad-files to skip it "
                                        "(finished shards are kept)")
                    print(f"skipping {item}", file=sys.stderr)
                    self.bad_files[index] = str(item)
                    break
                if isinstance(item, Defect):
                    if self.args.strict:
                        raise DataError(f"{item.location}: {item.reason} (--strict stops at the first bad "
                                        f"record; without --strict such records are counted and skipped)")
                    writer.stats.skip(item.reason, item.location)
                    continue
                texts.append(item.text)
                subsets.append(item.subset)
                chars += len(item.text)
                if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
                    progress.update(finished_bytes + reader.bytes_done)
                    yield (writer, subsets), texts
                    texts, subsets, chars = [], [], 0
            finished_bytes += unit.size
            if index in self.bad_files:   # drop what this unit produced; earlier batches may still be queued
                yield (writer, _SKIP, index), None
                continue
            if texts:
                yield (writer, subsets), texts
            progress.update(finished_bytes)
            yield (writer, _END, index), None

    def _write(self, tag, result, progress):
        writer = tag[0]
        if tag[1] == _SKIP:
            writer.abort()
            self.active.remove(writer)
            return
        if tag[1] == _END:
            writer.finish(self.done_path(tag[2]))
            self.active.remove(writer)
            return
        flat, lengths = result
        writer.write_batch(tag[1], flat, lengths)
        progress.update(docs=len(lengths), tokens=len(flat))
        if _TEST_DELAY_S:
            time.sleep(_TEST_DELAY_S)


def _summary_lines(stats: dict, out_desc: str, stats_path: str):
    lines = [f"tokenized {stats['documents']:,} documents, {stats['tokens']:,} tokens (incl. one EOD each) from "
             f"{len(stats['inputs'])} input(s) in {duration(stats['seconds'])} "
             f"({human(stats['tokens_per_s'])} tokens/s, {human(stats['documents_per_s'])} docs/s while tokenizing"
             + (f"; {stats['shards_resumed']} finished shard(s) reused" if stats["shards_resumed"] else "") + ")"]
    skipped = {k: v for k, v in stats["skipped"].items() if v}
    if skipped:
        parts = [f"{k}={v} (first: {', '.join(stats['skipped_examples'].get(k, [])[:3])})"
                 for k, v in skipped.items()]
        lines.append(f"skipped {sum(skipped.values()):,}: " + "; ".join(parts))
    else:
        lines.append("skipped 0")
    if stats["skipped_files"]:
        lines.append(f"skipped {len(stats['skipped_files'])} unreadable input(s) (--skip-bad-files): "
                     + "; ".join(stats["skipped_files"].values()))
    lines += [f"output: {out_desc} ({stats['dtype']})", f"stats: {stats_path}"]
    return lines


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    units = discover_inputs(args.input)
    tokenizer = load_tokenizer(args.tokenizer)
    dtype = token_dtype(len(tokenizer))
    prefix = args.output_prefix
    stats_path, shard_dir = prefix + ".stats.json", prefix + ".shards"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the folder for --output-prefix {prefix}: {err.strerror}") from None
    corpus = CorpusTokenizer(args, units, tokenizer, dtype, shard_dir)
    fp = fingerprint(units, corpus.tokenizer_json, args, dtype)
    if _already_complete(stats_path, fp, args):
        print(f"already complete: {stats_path} matches this command (delete it to redo the run)")
        return 0
    _prepare_shard_dir(shard_dir, fp, units)

    todo = [(i, u) for i, u in enumerate(units) if not os.path.isfile(corpus.done_path(i))]
    resumed = len(units) - len(todo)
    if resumed:
        print(f"resuming: {resumed} of {len(units)} shard(s) already finished", file=sys.stderr)
    indexed_dataset_module()  # import megatron-core (seconds) before the clock of the tokenizing phase starts
    progress = Progress(sum(u.size for _, u in todo), log_interval=args.log_interval)
    corpus.run(todo, progress)
    progress.close()
    tokenize_seconds = time.monotonic() - progress.start

    total = UnitStats()
    for i in range(len(units)):
        if i not in corpus.bad_files:
            total.add(UnitStats.from_json(_read_json(corpus.done_path(i))))
    outputs = _merge_or_list_shards(corpus, total, args)
    stats = {
        "complete": True, "fingerprint": fp, "merged": not args.no_merge,
        "documents": total.documents, "tokens": total.tokens,
        "skipped": {reason: total.skipped.get(reason, 0) for reason in REASONS},
        "skipped_examples": total.examples, "seconds": round(time.time() - t0, 3),
        # Rates cover the documents tokenized by this run, over the reading+tokenizing+writing phase
        # (startup imports and the final merge excluded; both are in "seconds").
        "tokenize_seconds": round(tokenize_seconds, 3),
        "tokens_per_s": round(progress.tokens / max(tokenize_seconds, 1e-9), 1),
        "documents_per_s": round(progress.docs / max(tokenize_seconds, 1e-9), 1),
        "input_bytes": total.input_bytes, "inputs": [u.name for u in units], "shards_resumed": resumed,
        # --skip-bad-files: {input: why it could not be read}; those inputs contributed nothing
        "skipped_files": {units[i].name: why for i, why in sorted(corpus.bad_files.items())},
        # {subset ("" without --split-by): output prefix}, or with --no-merge {subset: [shard prefixes]}
        "outputs": outputs,
        "subsets": {k: {"documents": v["documents"], "tokens": v["tokens"]} for k, v in total.subsets.items()}
        if args.split_by else {},
        "tokenizer": args.tokenizer, "vocab_size": len(tokenizer), "eod": tokenizer.eos_token_id,
        "dtype": dtype.__name__, "workers": args.workers, "split_by": args.split_by, "text_key": args.text_key,
    }
    write_json_atomically(stats_path, stats)
    if not args.no_merge and not args.keep_shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
    if args.no_merge:
        n_shards = sum(len(v) for v in outputs.values())
        out_desc = f"{n_shards} shard(s) in {shard_dir}/ (merge with python -m data_prep.merge)"
    else:
        out_desc = ", ".join(f"{p}.bin/.idx" for p in outputs.values())
    for line in _summary_lines(stats, out_desc, stats_path):
        print(line)
    return 0


def _already_complete(stats_path, fp, args) -> bool:
    previous = _read_json(stats_path)
    if not previous:
        return False
    skipped_ok = args.skip_bad_files or not previous.get("skipped_files")   # else: retry, and fail, on those
    if previous.get("fingerprint") == fp and previous.get("merged") == (not args.no_merge) and skipped_ok and all(
            os.path.isfile(p + ext) for p in _output_prefixes(previous["outputs"]) for ext in (".bin", ".idx")):
        return True
    os.remove(stats_path)  # a new run: never leave an old "complete" marker beside new outputs
    return False


def _prepare_shard_dir(shard_dir, fp, units):
    """Keep finished shards only if they were made by this very command (same fingerprint)."""
    run_info = os.path.join(shard_dir, "run.json")
    if os.path.isdir(shard_dir) and (_read_json(run_info) or {}).get("fingerprint") != fp:
        print(f"{shard_dir} holds shards of a different command (inputs, tokenizer or options changed); "
              f"starting over", file=sys.stderr)
        shutil.rmtree(shard_dir)
    os.makedirs(shard_dir, exist_ok=True)
    write_json_atomically(run_info, {"fingerprint": fp, "inputs": [u.name for u in units]})


def _merge_or_list_shards(corpus, total: UnitStats, args) -> dict:
    """Merge each subset's shards (in input order) into PREFIX<suffix>; with --no-merge just list them."""
    clash = subset_collisions(total.subsets)
    if clash:   # checked before any output is written
        raise DataError(f"--split-by values {clash[0]!r} and {clash[1]!r} map to the same output name; "
                        "rename one of them in the data")
    outputs = {}
    for name in sorted(total.subsets):
        suffix = total.subsets[name]["suffix"]
        shards = [corpus.shard_prefix(i) + suffix for i in range(len(corpus.units))
                  if os.path.isfile(corpus.shard_prefix(i) + suffix + ".idx")]
        if args.no_merge:
            outputs[name] = shards
        else:
            merge_datasets(shards, args.output_prefix + suffix)
            outputs[name] = args.output_prefix + suffix
    return outputs


def _output_prefixes(outputs: dict):
    for value in outputs.values():
        yield from ([value] if isinstance(value, str) else value)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(run_main(main))
