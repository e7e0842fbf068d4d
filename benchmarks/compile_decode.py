"""Does `torch.compile` of the decode steps (inference/compiled.py) pay on this machine? Eager vs compiled,
same weights, same prompt, interleaved repeats after a warmup that includes the compilation.

    python benchmarks/compile_decode.py --preset tiny --compile default --new-tokens 32 --repeats 5 \\
        --output runs/bench/compile_tiny.json

Prints tokens/s of both per mode, the ratio, the compilation time, and whether the tokens agree.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--compile", default="default", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
    p.add_argument("--modes", default="standard,recycle")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", required=True)
    args = p.parse_args()

    import torch

    from inference.compiled import compile_steps
    from inference.decoding import generate
    from inference.tp_loading import empty_model, fill, random_tensors
    from model.config import preset

    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    eager = empty_model(cfg, torch.float32, "cpu")
    fill(eager, random_tensors(cfg, 0), cfg, 0, 1, full=True)
    compiled = empty_model(cfg, torch.float32, "cpu")
    compiled.load_state_dict(eager.state_dict())
    compile_steps(compiled, args.compile)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    modes = args.modes.split(",")

    start = time.perf_counter()
    for mode in modes:                                   # compilation happens here, for every step shape
        generate(compiled, prompt, mode, args.new_tokens)
    compile_s = time.perf_counter() - start
    for mode in modes:
        generate(eager, prompt, mode, args.new_tokens)
    tps = {(v, m): [] for v in ("eager", "compiled") for m in modes}
    same = {}
    for r in range(args.repeats):
        for mode in modes:
            order = [("eager", eager), ("compiled", compiled)][::1 if r % 2 else -1]
            toks = {}
            for name, model in order:
                g = generate(model, prompt, mode, args.new_tokens)
                tps[(name, mode)].append(g.stats.tokens_per_s)
                toks[name] = g.tokens
            same[mode] = same.get(mode, True) and toks["eager"] == toks["compiled"]
    report = {"preset": args.preset, "compile": args.compile, "threads": args.threads, "torch": torch.__version__,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "compile_and_first_runs_s": compile_s, "modes": {}}
    for mode in modes:
        e, c = statistics.median(tps[("eager", mode)]), statistics.median(tps[("compiled", mode)])
        report["modes"][mode] = {"eager_tokens_per_s": e, "compiled_tokens_per_s": c, "compiled_over_eager": c / e,
                                 "same_tokens": same[mode]}
        print(f"{mode:<10} eager {e:8.1f} tok/s   compiled {c:8.1f} tok/s   ratio {c / e:.2f}x   same tokens: "
              f"{same[mode]}")
    print(f"compilation + first runs: {compile_s:.0f} s")
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
