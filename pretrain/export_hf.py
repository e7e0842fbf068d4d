"""python -m pretrain.export_hf --checkpoint RUN_DIR --output HF_DIR [--tag step_N] [--dtype fp32|bf16] [--force]
    [--vllm]

Consolidates one checkpoint tag (default: `latest`) on one process and writes a Hugging Face folder:

    model.safetensors            the base as LlamaForCausalLM weights (vanilla transformers loads it)
    model.safetensors.index.json names model.safetensors alone, so vLLM leaves the module's file out
    recycle_module.safetensors   the recyclable module (keys recycle.*)
    config.json                  LlamaConfig + recycle_layers + auto_map -> RecycleGPTForCausalLM
    generation_config.json, tokenizer files
    draft_vocab.safetensors      the run's draft vocabulary when it has one (recycle.draft_vocab): our decoding
                                 and the remote code draft over it by default, import_hf carries it back; vLLM
                                 ignores it
    modeling_recyclegpt.py + decoding.py, drafting.py, rows.py, sampling.py, draft_policy.py, step_costs.py,
    kv_cache.py, draft_vocab.py, strides.py
                                 the remote code: the HF model adapter, our own decode loop and draft vocabulary
                                 (pretrain/remote_code.py finds the loop's files and rewrites their imports)
    with --vllm also: vllm_draft/ (the module as vLLM's MTP draft) and vllm_speculative_config.json
                                 (pretrain/vllm_export.py; docs/serving.md)

Everything is written to a temporary folder next to HF_DIR and renamed at the end, so HF_DIR is never
half-written. Errors are one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

MODULE_FILE = "recycle_module.safetensors"
DTYPES = ("fp32", "bf16")


class ExportError(Exception):
    """Bad input to the exporter; the message is shown as one line."""


def hf_config(cfg, dtype: str, tokenizer=None) -> dict:
    from transformers import LlamaConfig

    from pretrain.hf_convert import llama_config_kwargs

    extra = {}
    if tokenizer is not None:
        extra = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                 if getattr(tokenizer, k, None) is not None}
    conf = LlamaConfig(**llama_config_kwargs(cfg), **extra).to_dict()
    conf.update(architectures=["LlamaForCausalLM"], model_type="llama",
                dtype="bfloat16" if dtype == "bf16" else "float32",
                auto_map={"AutoModelForCausalLM": "modeling_recyclegpt.RecycleGPTForCausalLM"},
                recycle_layers=cfg.recycle_layers, recycle_module_file=MODULE_FILE if cfg.recycle_layers else None)
    conf.pop("torch_dtype", None)
    return conf


def write_hf_dir(tmp: Path, cfg, state: dict, dtype: str, tokenizer_dir: Path | None,
                 vllm_output: Path | None = None, vllm_draft_tokens: int = 1):
    """Write an HF folder for our one-device state dict `state` into `tmp` (an empty directory); with
    `vllm_output` (the folder `tmp` becomes) also the vLLM draft and its speculative config."""
    import torch
    from safetensors.torch import save_file

    from pretrain.hf_convert import to_hf
    from pretrain.remote_code import write_remote_code

    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    base, module = to_hf(cfg, state)
    base = {k: v.to(cast).contiguous() for k, v in base.items()}
    save_file(base, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    # Loaders that read every *.safetensors of a folder (vLLM) would take the module's file for base
    # weights; an index naming model.safetensors alone keeps them to the base.
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in base.values())},
             "weight_map": {k: "model.safetensors" for k in sorted(base)}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if module:
        save_file({k: v.to(cast).contiguous() for k, v in module.items()}, str(tmp / MODULE_FILE),
                  metadata={"format": "pt"})
    tokenizer = None
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    conf = hf_config(cfg, dtype, tokenizer)
    if vllm_output is not None:
        from pretrain.vllm_export import mtp_fields, write_vllm_files
        conf.update(mtp_fields(cfg))
        write_vllm_files(tmp, vllm_output, cfg, module, conf, cast, vllm_draft_tokens)
    (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
    gen = {"do_sample": False, "max_length": cfg.max_seq_len}
    if tokenizer is not None:
        gen.update({k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if getattr(tokenizer, k, None) is not None})
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
    write_remote_code(tmp)


def replace_dir(tmp: Path, output: Path):
    """Move `tmp` to `output`; an existing output (only with --force) is moved aside first, then deleted."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(output: Path, force: bool):
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise ExportError(f"output {output} exists and is not empty; pass --force to replace it")


def export(run_dir: Path, output: Path, tag: str | None = None, dtype: str = "fp32", force: bool = False,
           vllm: bool = False) -> Path:
    from model.config import ModelConfig  # noqa: F401  (import check before any work)
    from pretrain.checkpoint import checkpoint_dir, latest_tag
    from pretrain.config import ConfigError, load_config
    from pretrain.consolidate import consolidated_state_dict

    run_dir, output = Path(run_dir), Path(output)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not valid; valid: {', '.join(DTYPES)}")
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml); pass the run.dir of a training run")
    ckpt = checkpoint_dir(run_dir)
    tag = tag or latest_tag(ckpt)
    if tag is None:
        raise ExportError(f"{run_dir} has no checkpoint (checkpoints/latest); train first or pass --tag step_N")
    if not (ckpt / tag).is_dir():
        have = sorted(p.name for p in ckpt.glob("step_*")) if ckpt.is_dir() else []
        raise ExportError(f"checkpoint tag {tag} not found in {ckpt}; available: {', '.join(have) or 'none'}")
    check_output(output, force)
    try:
        run_cfg = load_config(str(run_dir / "config.yaml"))
        cfg = run_cfg.model.build()
    except (ConfigError, ValueError) as err:
        raise ExportError(f"{run_dir}/config.yaml: {err}") from None
    # vLLM drafts as many tokens per step as the module was trained to chain (recycle.train_depth).
    draft_tokens = int(getattr(run_cfg.recycle, "train_depth", 1) or 1)
    if vllm:
        from pretrain.vllm_export import VLLMExportError, check_exportable
        try:
            check_exportable(cfg)
        except VLLMExportError as err:
            raise ExportError(str(err)) from None
    state = consolidated_state_dict(ckpt / tag, cfg)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_hf_dir(tmp, cfg, state, dtype, run_dir / "tokenizer", output if vllm else None, draft_tokens)
        from model.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
        if (run_dir / DRAFT_VOCAB_FILE).is_file():     # the module learned only these tokens' logits
            shutil.copy2(run_dir / DRAFT_VOCAB_FILE, tmp / DRAFT_VOCAB_FILE)
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.export_hf", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="RUN_DIR of a training run")
    p.add_argument("--output", required=True, help="HF_DIR to write")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_200 (default: latest)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--force", action="store_true", help="replace a non-empty HF_DIR")
    p.add_argument("--vllm", action="store_true",
                   help="also write the module as vLLM's speculative draft (HF_DIR/vllm_draft, "
                        "HF_DIR/vllm_speculative_config.json); see docs/serving.md")
    args = p.parse_args(argv)
    try:
        out = export(Path(args.checkpoint), Path(args.output), args.tag, args.dtype, args.force, args.vllm)
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
