"""Command-line plumbing shared by `inference.generate` and `inference.benchmark`.

Bad input ends in exactly one `error: ...` line on stderr that names the problem and the fix, and exit
code 2; never a traceback. Model selection (--model DIR, or --preset NAME --random-init) is parsed here
so both commands accept the same flags.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_prep.cli import OneLineArgumentParser, UsageError  # noqa: F401  (re-exported)
from model.config import PRESETS


def run_main(main, argv=None) -> int:
    from inference.decoding import DecodingError
    from inference.loading import ModelLoadError

    try:
        return main(argv) or 0
    except (UsageError, DecodingError, ModelLoadError) as err:
        # Under a launcher every rank meets the same bad input: one line, from rank 0.
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_model_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model", metavar="DIR", help="RUN_DIR (pretrain.train) or HF_DIR (pretrain.export_hf)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model shape, with --random-init")
    parser.add_argument("--random-init", action="store_true", help="random weights for --preset (no checkpoint)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model's own, or the "
                        "bundled one matching the preset's vocabulary)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-init weights, prompts and sampling")
    parser.add_argument("--tp", type=int, help="tensor-parallel ranks, one per process (default: the launcher's "
                        "world size; run under torchrun / deepspeed / srun for --tp > 1)")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compile", choices=["off", "default", "reduce-overhead"], default="off",
                        help="torch.compile the decode steps; reduce-overhead = CUDA graphs on a GPU (off: eager; "
                        "on a CPU compiling was measured slower, docs/inference.md)")
    parser.add_argument("--weight-layout", choices=["auto", "row", "column", "packed"], default="auto",
                        help="how Linear weights are stored for decoding (inference/weight_layout.py): packed (oneDNN "
                        "prepacked) makes multi-token fp32 steps on a CPU nearly as cheap as 1-token ones; auto = "
                        "packed for fp32 on a CPU with --tp 1, column with more ranks, row otherwise")


def add_decoding_args(parser: argparse.ArgumentParser, draft_len_default: str = "1"):
    """Flags of the lossless modes: draft length, sampling, draft vocabulary (DESIGN.md §2)."""
    parser.add_argument("--draft-len", default=draft_len_default, metavar="K|auto",
                        help="tokens the module drafts per verify cycle (1 = one; auto: chosen from measured "
                        "step costs and acceptance)")
    parser.add_argument("--max-draft-len", type=int, default=4, metavar="K", help="upper limit for --draft-len auto")
    parser.add_argument("--draft-width", default="1", metavar="W", help="verify with --draft-len 1, batch 1: "
                        "check the module's W most likely tokens side by side in one full forward (a token tree, "
                        "inference/tree_verify.py; 0 with --lookup: the module idle); the benchmark takes a "
                        "comma-separated list")
    parser.add_argument("--lookup", default="0", metavar="L", help="verify with --draft-len 1, batch 1: also draft "
                        "up to L tokens copied from where the text's last tokens occurred before (prompt lookup, "
                        "inference/lookup.py; 0 = off); the benchmark takes a comma-separated list")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples, "
                        "losslessly in standard and verify (any --draft-len or --draft-width)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this much mass")
    add_draft_vocab_arg(parser)


def add_draft_vocab_arg(parser: argparse.ArgumentParser):
    parser.add_argument("--draft-vocab", metavar="FILE|none", help="draft_vocab.safetensors (python -m "
                        "inference.draft_vocab): the module drafts over these tokens only; default: the model "
                        "directory's own draft_vocab.safetensors if it has one, none: the whole vocabulary")


def parse_draft_widths(text: str) -> list[int]:
    """--draft-width W or W1,W2,...: ints >= 0 (0 only with --lookup), duplicates dropped."""
    return parse_int_list(text, "--draft-width", "give an int >= 1 (or a comma-separated list in the benchmark)")


def parse_lookups(text: str) -> list[int]:
    """--lookup L or L1,L2,...: ints >= 0, duplicates dropped."""
    return parse_int_list(text, "--lookup", "give an int >= 0 (0 = off; or a comma-separated list in the benchmark)")


def parse_int_list(text: str, flag: str, fix: str) -> list[int]:
    try:
        values = list(dict.fromkeys(int(t) for t in str(text).split(",")))
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise UsageError(f"{flag} {text!r}: {fix}")
    return values


def check_draft_width(width: int, mode: str, draft_len, batch: int, lookup: int = 0):
    """inference.decoding's rule for --draft-width and --lookup, as a usage error before any model is loaded."""
    from inference.decoding import DecodingError, check_width

    try:
        check_width(width, mode, draft_len, batch, lookup)
    except DecodingError as err:
        raise UsageError(str(err)) from None


def parse_draft_len(text: str, max_draft_len: int):
    """'auto' or an int >= 1, checked before any model loads."""
    if max_draft_len < 1:
        raise UsageError(f"--max-draft-len {max_draft_len} must be >= 1")
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise UsageError(f"--draft-len {text!r}: give an int >= 1 or 'auto'")
    return k


def sampling_from_args(args):
    from inference.sampling import Sampling

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if sampling.problems():
        raise UsageError("; ".join(f"--{p}" for p in sampling.problems()))
    resolve_draft_vocab(args)
    return sampling


def resolve_draft_vocab(args):
    """args.draft_vocab -> a file or None. Unset means the model's own: a module trained with recycle.draft_vocab
    learned only those tokens' logits, so it drafts over RUN_DIR/draft_vocab.safetensors unless told `none`."""
    from model.draft_vocab import FILE_NAME

    if args.draft_vocab == "none":
        args.draft_vocab = None
    elif args.draft_vocab is None:
        beside = Path(args.model) / FILE_NAME if getattr(args, "model", None) else None
        if beside is not None and beside.is_file():
            print(f"drafting over {beside}, the model's own draft vocabulary (--draft-vocab none: the whole "
                  "vocabulary)", file=sys.stderr)
            args.draft_vocab = str(beside)
    elif not Path(args.draft_vocab).is_file():
        raise UsageError(f"--draft-vocab {args.draft_vocab}: no such file; write one with python -m "
                         "inference.draft_vocab --data PREFIX --output FILE")


def check_model_args(args):
    """Validate the model flags before anything heavy is imported or loaded."""
    if args.model and args.preset:
        raise UsageError("pass either --model DIR or --preset NAME --random-init, not both")
    if not args.model and not args.preset:
        raise UsageError("no model given: pass --model RUN_DIR|HF_DIR, or --preset NAME --random-init "
                         f"(presets: {', '.join(sorted(PRESETS))})")
    if args.preset and not args.random_init:
        raise UsageError(f"--preset {args.preset} has no weights to load; add --random-init, or pass a trained "
                         "model with --model DIR")
    if args.random_init and not args.preset:
        raise UsageError("--random-init needs --preset NAME (it gives the model's shape)")
    if args.model and not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: no such directory; pass a RUN_DIR written by pretrain.train or an "
                         "HF_DIR written by pretrain.export_hf, or use --preset NAME --random-init")
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise UsageError(f"--tokenizer {args.tokenizer}: no such directory; pass a folder with tokenizer.json")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch sees no CUDA device; use --device cpu")
    from inference import tp_loading

    try:                                    # shapes only: the TP check comes before any process group or weight
        args.tp = tp_loading.requested_tp(args.tp)
        args.model_config = tp_loading.model_config(args.model, args.preset)
        tp_loading.check_tp(args.model_config, args.tp)
    except tp_loading.TPError as err:
        raise UsageError(str(err)) from None
    if args.weight_layout == "packed":      # the one layout some setups cannot store: refuse before loading
        import torch

        from inference import weight_layout
        try:
            weight_layout.resolve("packed", "cuda" if args.device == "cuda" else "cpu", torch.float32, args.tp)
        except ValueError as err:
            raise UsageError(str(err)) from None


def model_from_args(args, cache_len: int):
    """(model, tokenizer or None, device, dtype, description) for the validated model flags; `cache_len`
    (KV-cache positions) only enters the memory check of --random-init presets. Starts the process groups
    when --tp > 1 (each rank then holds its shard only)."""
    import torch

    from inference import loading, tp_loading

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = loading.parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    if args.random_init:
        tp_loading.check_memory(args.model_config, args.preset, dtype, device, cache_len, args.tp)
    ctx = tp_loading.start(args.tp)
    if ctx is not None:
        device = ctx.device
    if args.model and args.tp == 1:
        model, tokenizer = loading.load_model_dir(args.model, dtype, device)
    else:       # random init (any tp) and every tp > 1: this rank's shard, built directly
        model, tokenizer = tp_loading.load_shard(args.model, args.preset, args.seed, dtype, device, args.model_config)
    from inference import weight_layout
    try:
        weight_layout.apply_flag(model, args.weight_layout, device, dtype, args.tp)
    except ValueError as err:
        raise UsageError(str(err)) from None
    from inference.compiled import compile_steps
    compile_steps(model, args.compile)
    description = args.model if args.model else f"preset {args.preset} (random init)"
    if args.tokenizer:
        tokenizer = loading.load_tokenizer(args.tokenizer)
    elif tokenizer is None:
        tokenizer = loading.default_tokenizer(model.cfg.vocab_size)
    return model, tokenizer, device, dtype, description
