"""lm-evaluation-harness with our model registered as `recyclegpt` (docs/real-model.md).

    python -m inference.lm_eval --model recyclegpt --model_args pretrained=DIR,mode=standard|recycle|verify \
        --tasks T [any other lm_eval flag]

This is lm-eval's own command line; importing this file registers the model first. DIR is a RUN_DIR or an
HF_DIR, as for inference.generate. `generate_until` requests decode through the chosen mode (greedy), so
the lossy `recycle` mode's cost shows on real benchmarks; `loglikelihood` requests score with the full
model (the module plays no part in a likelihood). Extra model_args: dtype=fp32|bf16, device=cpu|cuda,
draft_len=K (verify), draft_width=W and lookup=L (verify's lossless token tree: the module's top W tokens and up
to L tokens copied from the text, as inference.generate's flags), max_length=N (context; default the model's),
draft_vocab=FILE|none (the module's token
over a draft vocabulary in recycle and verify; default: DIR/draft_vocab.safetensors if there is one),
weight_layout=auto|row|column|packed (as inference.generate's --weight-layout; auto: packed for fp32 on a CPU).
Needs the optional extra: pip install -e ".[eval]".
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import lm_eval.models  # noqa: F401  (lm-eval's own models first: it fills an empty registry only, see below)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from inference.cli import resolve_draft_vocab
from inference.decoding import MODES, DecodingError, check_width, generate
from inference.draft_vocab import load_draft_vocab
from inference import weight_layout as layouts
from inference.loading import ModelLoadError, load_model_dir, parse_dtype


# lm-eval registers its own models (hf, vllm, ...) lazily, and only while its registry is empty
# (lm_eval.api.registry.get_model): registering ours into an empty registry first would hide them all from
# this process. Importing lm_eval.models above registers them before ours.
@register_model("recyclegpt")
class RecycleGPTLM(TemplateLM):
    def __init__(self, pretrained: str, mode: str = "standard", dtype: str = "fp32", device: str = "cpu",
                 draft_len: int = 1, max_length: int | None = None, batch_size=1, draft_vocab: str | None = None,
                 weight_layout: str = "auto", draft_width: int = 1, lookup: int = 0, **unused):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is unknown; valid: {', '.join(MODES)}")
        self.draft_width, self.lookup = int(draft_width), int(lookup)
        try:                  # one prompt at a time here, so batch 1
            check_width(self.draft_width, mode, int(draft_len), 1, self.lookup)
        except DecodingError as err:
            raise ValueError(f"model_args draft_width={draft_width},lookup={lookup}: {err}") from None
        torch_dtype = parse_dtype(dtype)
        self.model, self.tokenizer = load_model_dir(pretrained, torch_dtype, torch.device(device))
        if self.tokenizer is None:
            raise ModelLoadError(f"{pretrained} has no tokenizer; lm-eval needs one (export with a tokenizer)")
        if mode != "standard" and self.model.recycle is None:
            raise ValueError(f"mode={mode} needs a recyclable module, but {pretrained} has none; use mode=standard")
        layouts.apply_flag(self.model, weight_layout, device, torch_dtype)
        self.mode, self.draft_len = mode, int(draft_len)
        where = SimpleNamespace(model=pretrained, draft_vocab=draft_vocab)
        resolve_draft_vocab(where)
        self.draft_vocab = load_draft_vocab(where, self.model)
        self.max_length = int(max_length or self.model.cfg.max_seq_len)
        self._device = torch.device(device)

    # ------------------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's `hf` model does: BOS if the tokenizer has one, else EOS, before an empty context.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------ likelihoods
    @torch.inference_mode()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) under the full model, and whether it is the greedy continuation."""
        ids = (context + continuation)[-(self.max_length + 1):]
        inputs = torch.tensor([ids[:-1]], dtype=torch.long, device=self._device)
        logits = self.model.logits(self.model.hidden(inputs)[0]).float()[-len(continuation):]
        target = torch.tensor(continuation, dtype=torch.long, device=self._device)
        logprobs = F.log_softmax(logits, dim=-1)
        total = logprobs.gather(1, target[:, None]).sum().item()
        return total, bool((logits.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return [self._score(ctx, cont) for _, ctx, cont in tqdm(requests, disable=disable_tqdm, desc="loglikelihood")]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1))
            out.append(sum(self._score(ctx, cont)[0] for ctx, cont in windows))
        return out

    # ------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc=f"generate ({self.mode})"):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            # Leave room for verify's drafts past the last token (inference.decoding's own budget).
            room = self.max_length - max_new - self.draft_len - 2
            prompt = self.tok_encode(context)[-max(room, 1):]
            gen = generate(self.model, prompt, self.mode, max_new, self.eot_token_id, draft_len=self.draft_len,
                           draft_vocab=self.draft_vocab, draft_width=self.draft_width, lookup=self.lookup)
            text = self.tok_decode([t for t in gen.tokens if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
