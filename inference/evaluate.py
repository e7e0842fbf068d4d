"""How good is the module on held-out text, and what does the lossy mode cost? (docs/real-model.md)

    python -m inference.evaluate --model DIR --input FILE_OR_PREFIX... --output FILE.json \
        [--prompts N] [--prompt-len P] [--new-tokens T] [--tokens N] [--window W] [--draft-vocab FILE|none]
        [--draft-len K] [--draft-width W --lookup L]

--input: raw text in any format `data_prep.tokenize` reads (tokenized here with the model's tokenizer), or a
tokenized PREFIX (PREFIX.bin + PREFIX.idx from data_prep.tokenize, same tokenizer as the model).

Teacher-forced, over --tokens tokens in windows of --window:
    base_ppl            the full model's perplexity on the text
    acceptance_rate     the module's top-1 at position i equals the full model's own argmax at i+1 (exactly
                        what `verify` accepts), overall and per position bucket (`accuracy_by_position`)
    tau_predicted       verify's tokens per full forward if every draft were accepted independently with that
                        rate a: (1 - a^(k+1)) / (1 - a) for --draft-len k (1 + a for k = 1)
    acceptance_by_width how often one of the module's top W tokens is the full model's argmax, W = 1, 2, 4, 8:
                        what `verify --draft-width W` accepts (its tau is 1 + that rate)
Decoded, on --prompts prompts of --prompt-len tokens drawn from the text, --new-tokens greedy tokens each:
    tau_measured        verify's new tokens / full forwards (prefill included), over all prompts
    recycle_nll_gap     the full model's mean NLL of `recycle` continuations minus that of `standard` ones
    recycle_agreement   fraction of positions where the recycle continuation equals the standard one
and tokens/s per mode. With --draft-width W != 1 or --lookup L > 0, a fourth entry `verify_tree` decodes the
same prompts through that token tree (inference/tree_verify.py): `tree_tau_measured`, `tree_identical`. The
module's token is its top-1 over the draft vocabulary that decoding uses (the model
directory's own draft_vocab.safetensors unless --draft-vocab says otherwise; `draft_vocab_size` in the JSON,
0 = the whole vocabulary). Writes FILE.json and FILE.png (accuracy by position, tau per prompt).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from inference.cli import (OneLineArgumentParser, UsageError, add_draft_vocab_arg, add_model_args, check_draft_width,
                           check_model_args, model_from_args, resolve_draft_vocab, run_main)

BUCKETS = (0, 8, 32, 128, 512, 2048)    # position-in-window bucket edges (lower bounds)
WIDTHS = (1, 2, 4, 8)                    # --draft-width values whose acceptance the JSON reports


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="python -m inference.evaluate", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_PREFIX",
                   help="held-out text files/folders, or a tokenized PREFIX (PREFIX.bin/.idx)")
    p.add_argument("--output", required=True, metavar="FILE.json", help="results; the plot goes next to it (.png)")
    p.add_argument("--prompts", type=int, default=8, help="prompts decoded in each mode (default 8)")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (default 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt and mode (default 64)")
    p.add_argument("--tokens", type=int, default=16384, help="teacher-forced tokens scored (default 16384)")
    p.add_argument("--window", type=int, default=256, help="teacher-forced window length (default 256)")
    p.add_argument("--draft-len", type=int, default=1, help="tokens the module drafts per verify cycle (default 1)")
    p.add_argument("--draft-width", type=int, default=1, metavar="W", help="with --lookup, or W > 1: also decode "
                   "through a token tree of the module's top W tokens (entry verify_tree)")
    p.add_argument("--lookup", type=int, default=0, metavar="L", help="... and up to L tokens copied from earlier "
                   "in the text (inference/lookup.py)")
    add_draft_vocab_arg(p)
    return p


def check_args(args):
    check_model_args(args)
    for name in ("prompts", "prompt_len", "new_tokens", "tokens", "window", "draft_len"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    check_draft_width(args.draft_width, "verify", 1, 1, args.lookup)
    if args.window < 3:
        raise UsageError(f"--window={args.window} must be >= 3 (the module predicts two positions ahead)")
    for item in args.input:
        if not (is_prefix(item) or os.path.exists(item)):
            raise UsageError(f"--input {item}: no such file or folder, and no {item}.bin/.idx; pass raw text "
                             "(jsonl, jsonl.zst, parquet, txt, a saved dataset) or a prefix from data_prep.tokenize")
    resolve_draft_vocab(args)
    out = Path(args.output)
    if out.suffix != ".json":
        raise UsageError(f"--output {args.output} must end in .json (the plot is written next to it as .png)")
    if out.parent and not out.parent.exists():
        raise UsageError(f"--output {args.output}: folder {out.parent} does not exist")


def is_prefix(path: str) -> bool:
    return os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx")


# ------------------------------------------------------------------------------------------- text
def read_documents(inputs: list[str], tokenizer, limit: int) -> list[list[int]]:
    """Token ids per document, in input order, until `limit` tokens are collected (streamed, never loaded whole)."""
    docs, total = [], 0
    for item in inputs:
        for ids in (_prefix_docs(item) if is_prefix(item) else _text_docs(item, tokenizer)):
            if len(ids) >= 3:
                docs.append(ids)
                total += len(ids)
            if total >= limit:
                return docs
    if not docs:
        raise UsageError(f"--input {' '.join(inputs)} holds no document of 3 or more tokens")
    return docs


def _prefix_docs(prefix: str):
    from data_prep.shards import indexed_dataset_module

    dataset = indexed_dataset_module().IndexedDataset(prefix)
    for i in range(len(dataset)):
        yield [int(t) for t in dataset[i]]


def _text_docs(path: str, tokenizer):
    from data_prep.readers import Doc, UnitReader, discover_inputs

    if tokenizer is None:
        raise UsageError(f"--input {path} is raw text, which needs a tokenizer; pass --tokenizer DIR")
    for unit in discover_inputs([path]):
        for doc in UnitReader(unit):
            if isinstance(doc, Doc):
                yield tokenizer.encode(doc.text, add_special_tokens=False)


def windows(docs: list[list[int]], window: int, limit: int) -> list[list[int]]:
    """Consecutive windows of each document (a short last piece is kept if it has >= 3 tokens)."""
    out, total = [], 0
    for ids in docs:
        for start in range(0, len(ids), window):
            piece = ids[start:start + window]
            if len(piece) >= 3 and total < limit:
                out.append(piece)
                total += len(piece)
    return out


def prompts_from(docs: list[list[int]], count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, spread evenly over the documents long enough to hold one."""
    pool = [ids[start:start + length] for ids in docs for start in range(0, len(ids) - length + 1, length)]
    if not pool:
        raise UsageError(f"--prompt-len {length}: no document in --input is that long; lower --prompt-len")
    step = max(len(pool) // count, 1)
    return pool[::step][:count]


# --------------------------------------------------------------------------------- teacher forcing
def teacher_forced(model, pieces: list[list[int]], device, draft_vocab=None) -> dict:
    """Base NLL and module agreement with the base's own next argmax, per position, over all windows (the
    module's top-1 over the draft vocabulary when decoding drafts over one)."""
    import torch
    import torch.nn.functional as F

    from inference.tree_verify import top_tokens

    nll_sum, nll_count = 0.0, 0
    hits = {b: [0, 0] for b in BUCKETS}
    corpus_hits = [0, 0]
    width_hits = {w: 0 for w in WIDTHS}
    with torch.inference_mode():
        for piece in pieces:
            ids = torch.tensor([piece], dtype=torch.long, device=device)
            h = model.hidden(ids)
            logits = model.logits(h[0]).float()                        # [T, V]: position i predicts x_{i+1}
            nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
            nll_sum, nll_count = nll_sum + nll.item(), nll_count + ids.shape[1] - 1
            if model.recycle is None:
                continue
            g = model.recycle_hidden(h[:, :-1], ids[:, 1:])             # g_i reads x_{i+1}, predicts x_{i+2}
            top = top_tokens(model, g[0], max(WIDTHS), draft_vocab)[:-1]   # positions 0 .. T-3, best first
            guess = top[:, 0]
            base_next = logits.argmax(-1)[1:-1]                         # base's argmax at i+1 (verify's check)
            for w in WIDTHS:
                width_hits[w] += int((top[:, :w] == base_next[:, None]).any(-1).sum())
            agree = (guess == base_next).tolist()
            corpus_hits[0] += int((guess == ids[0, 2:]).sum())
            corpus_hits[1] += len(agree)
            for i, ok in enumerate(agree):
                bucket = max(b for b in BUCKETS if b <= i)
                hits[bucket][0] += ok
                hits[bucket][1] += 1
    acc_total = sum(h[0] for h in hits.values())
    n_total = sum(h[1] for h in hits.values())
    return {"tokens_scored": nll_count, "base_nll": nll_sum / max(nll_count, 1),
            "base_ppl": math.exp(min(nll_sum / max(nll_count, 1), 50.0)),
            "acceptance_rate": acc_total / n_total if n_total else None,
            "module_corpus_accuracy": corpus_hits[0] / corpus_hits[1] if corpus_hits[1] else None,
            "acceptance_by_width": {str(w): h / corpus_hits[1] for w, h in width_hits.items()} if corpus_hits[1] else None,
            "accuracy_by_position": [{"positions": f"{b}-{_bucket_end(b)}", "accuracy": h[0] / h[1], "count": h[1]}
                                     for b, h in hits.items() if h[1]]}


def _bucket_end(lower: int) -> str:
    later = [b for b in BUCKETS if b > lower]
    return str(later[0] - 1) if later else ""


def continuation_nll(model, prompt: list[int], continuation: list[int], device) -> float:
    """The full model's mean NLL (nats/token) of `continuation` after `prompt`."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor([prompt + continuation], dtype=torch.long, device=device)
    with torch.inference_mode():
        logits = model.logits(model.hidden(ids)[0]).float()
    P = len(prompt)
    return F.cross_entropy(logits[P - 1:-1], ids[0, P:]).item()


# ----------------------------------------------------------------------------------------- decoding
def predicted_tau(acceptance: float, draft_len: int) -> float:
    """Expected tokens per verify cycle: accepted drafts (a run of successes, at most k) + the full model's own."""
    return sum(acceptance ** j for j in range(draft_len + 1))


def decoded(model, prompts: list[list[int]], new_tokens: int, device, draft_len: int = 1, draft_vocab=None,
            tree: tuple[int, int] = (1, 0)) -> dict:
    """Every prompt in standard, recycle and verify, and through the token tree `tree` = (width, lookup) unless it
    is (1, 0) (entry order rotated per prompt, EOS ignored)."""
    from inference.decoding import MODES, generate

    modes = MODES if model.recycle is not None else ("standard",)
    if model.recycle is not None and tree != (1, 0):
        modes += ("verify_tree",)
    runs = {m: [] for m in modes}
    generate(model, prompts[0], "standard", 4)                # warm-up: first-call costs out of the figures
    for n, prompt in enumerate(prompts):
        for m in modes[n % len(modes):] + modes[:n % len(modes)]:
            width, lookup = tree if m == "verify_tree" else (1, 0)
            runs[m].append(generate(model, prompt, m.removesuffix("_tree"), new_tokens,
                                    draft_len=draft_len if m == "verify" else 1, draft_vocab=draft_vocab,
                                    draft_width=width, lookup=lookup))
    out = {"tokens_per_s": {m: sum(g.stats.new_tokens for g in gens) / sum(g.stats.seconds for g in gens)
                            for m, gens in runs.items()}}
    if model.recycle is None:
        return out
    std, rec, ver = runs["standard"], runs["recycle"], runs["verify"]
    out["verify_identical"] = sum(v.tokens == s.tokens for v, s in zip(ver, std)) / len(std)
    out["tau_per_prompt"] = [g.stats.tau for g in ver]
    out["tau_measured"] = sum(g.stats.new_tokens for g in ver) / sum(g.stats.full_forwards for g in ver)
    proposed = sum(g.stats.proposed for g in ver)
    out["verify_acceptance"] = sum(g.stats.accepted for g in ver) / proposed if proposed else None
    if "verify_tree" in runs:
        trees = runs["verify_tree"]
        out["tree"] = {"draft_width": tree[0], "lookup": tree[1]}
        out["tree_identical"] = sum(t.tokens == s.tokens for t, s in zip(trees, std)) / len(std)
        out["tree_tau_measured"] = sum(g.stats.new_tokens for g in trees) / sum(g.stats.full_forwards for g in trees)
    nll_std = [continuation_nll(model, p, g.tokens, device) for p, g in zip(prompts, std)]
    nll_rec = [continuation_nll(model, p, g.tokens, device) for p, g in zip(prompts, rec)]
    out["standard_nll"] = sum(nll_std) / len(nll_std)
    out["recycle_nll"] = sum(nll_rec) / len(nll_rec)
    out["recycle_nll_gap"] = out["recycle_nll"] - out["standard_nll"]
    same = sum(a == b for s, r in zip(std, rec) for a, b in zip(s.tokens, r.tokens))
    out["recycle_agreement"] = same / sum(min(len(s.tokens), len(r.tokens)) for s, r in zip(std, rec))
    out["_runs"] = runs
    return out


def samples(tokenizer, prompt: list[int], runs: dict) -> dict:
    """The first prompt's text and each mode's continuation (for the summary of `make real-model`)."""
    if tokenizer is None:
        return {}
    return {"prompt": tokenizer.decode(prompt),
            **{m: tokenizer.decode(gens[0].tokens) for m, gens in runs.items()}}


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    buckets = result.get("accuracy_by_position") or []
    left.bar([b["positions"] for b in buckets], [b["accuracy"] for b in buckets])
    left.set(title="module top-1 = base's next argmax", xlabel="position in window", ylabel="accuracy", ylim=(0, 1))
    taus = result.get("tau_per_prompt") or []
    right.hist(taus, bins=min(max(len(taus), 1), 20), range=(1, 2))
    right.set(title=f"verify tau per prompt (measured {result.get('tau_measured') or float('nan'):.2f})",
              xlabel="tokens per full forward", ylabel="prompts")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def evaluate(args) -> dict:
    model, tokenizer, device, dtype, description = model_from_args(args, args.prompt_len + args.new_tokens + 1
                                                                  + args.draft_len)
    limit = args.prompt_len + args.new_tokens + args.draft_len
    if limit > model.cfg.max_seq_len:
        raise UsageError(f"--prompt-len + --new-tokens ({limit - 1}) exceeds the model's context "
                         f"({model.cfg.max_seq_len}); lower them")
    docs = read_documents(args.input, tokenizer, args.tokens + args.prompts * args.prompt_len * 4)
    pieces = windows(docs, min(args.window, model.cfg.max_seq_len), args.tokens)
    print(f"scoring {sum(map(len, pieces))} tokens in {len(pieces)} windows", file=sys.stderr, flush=True)
    from inference.draft_vocab import load_draft_vocab

    draft_vocab = load_draft_vocab(args, model)
    if draft_vocab is not None:
        draft_vocab.to(device)
    result = {"model": description, "inputs": args.input, "dtype": str(dtype).removeprefix("torch."),
              "draft_vocab": args.draft_vocab, "draft_vocab_size": len(draft_vocab or []),
              **teacher_forced(model, pieces, device, draft_vocab)}
    acceptance = result["acceptance_rate"]
    result["tau_predicted"] = predicted_tau(acceptance, args.draft_len) if acceptance is not None else None
    prompts = prompts_from(docs, args.prompts, args.prompt_len)
    print(f"decoding {len(prompts)} prompts x {args.new_tokens} tokens per mode", file=sys.stderr, flush=True)
    dec = decoded(model, prompts, args.new_tokens, device, args.draft_len, draft_vocab, (args.draft_width, args.lookup))
    runs = dec.pop("_runs", None)
    result.update({"tau_measured": None, "recycle_nll_gap": None, "recycle_agreement": None})
    result.update(dec)
    result.update(prompts=len(prompts), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  draft_len=args.draft_len)
    if runs:
        result["samples"] = samples(tokenizer, prompts[0], runs)
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    result = evaluate(args)
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    plot(result, out.with_suffix(".png"))
    keys = ("base_ppl", "acceptance_rate", "tau_predicted", "tau_measured", "recycle_nll_gap", "recycle_agreement")
    print(" ".join(f"{k}={result[k]:.4f}" if isinstance(result[k], float) else f"{k}={result[k]}" for k in keys))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
