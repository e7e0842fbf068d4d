"""The training objective (model/objective.py) on one process: the base-distribution target, the unrolled
draft depths against decode-style references, the frozen base without autograd, and the config keys."""
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, RecycleGPT, RecycleObjective
from model.spec import LocalSpec

CFG = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64,
                  max_seq_len=32, recycle_layers=2)


def make_model(objective=RecycleObjective(), seed=0):
    torch.manual_seed(seed)
    model = RecycleGPT(CFG).eval()
    with torch.no_grad():   # norm weights off 1, so a missing or swapped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.objective = objective
    return model


def batch(length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (2, length + 1), generator=g)
    mask = (torch.rand(2, length, generator=g) > 0.25).float()
    return ids, mask


@torch.no_grad()
def reference_depth_losses(model, ids, mask, depth, share, draft_ids=None):
    """Per depth j, position by position from prefixes only, as a decoder drafting j tokens sees them:
    h_i from x_0..x_i; the module's depth-1 states over positions 0..i; depth j+1 from the depth-j states
    and E[x_{i+j+1}] (draft_step); target x_{i+j+1} and the base's distribution at position i+j."""
    T = ids.shape[1] - 1
    prefix_h = [None] + [model.hidden(ids[:, :n]) for n in range(1, T + 1)]   # prefix_h[n]: h of x_0..x_{n-1}
    out = []
    for j in range(1, depth + 1):
        num, den = 0.0, 0.0
        for i in range(T - j):
            state = model.draft_step(prefix_h[i + 1], ids[:, 1:i + 2])
            for d in range(2, j + 1):
                state = model.draft_step(state, ids[:, d:i + d + 1])
            q_logits = model.logits(state[:, -1])
            teacher = model.logits(prefix_h[i + j + 1][:, -1])     # the base at position i + j
            target, m = ids[:, i + j + 1], mask[:, i + j]
            if draft_ids is not None:     # both distributions over the draft tokens only, renormalised there
                q_logits, teacher = q_logits[:, draft_ids], teacher[:, draft_ids]
                where = {t: n for n, t in enumerate(draft_ids.tolist())}
                if share < 1:             # a corpus token the module cannot draft is no target
                    m = m * torch.tensor([float(t in where) for t in target.tolist()])
                target = torch.tensor([where.get(t, 0) for t in target.tolist()])
            log_q, log_p = F.log_softmax(q_logits, -1), F.log_softmax(teacher, -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            ce = -log_q.gather(-1, target[:, None]).squeeze(-1)
            num = num + ((share * kl + (1 - share) * ce) * m).sum()
            den = den + m.sum()
        out.append(num / den)
    return out


@pytest.mark.parametrize("target, share", [("tokens", 0.0), ("base", 1.0), ("mix", 0.3)])
def test_each_depth_and_target_equals_a_prefix_by_prefix_reference(target, share):
    objective = RecycleObjective(weight=0.7, target=target, mix=0.3, depth=3, depth_weights=(1.0, 0.5, 0.25))
    model = make_model(objective)
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids[:, :-1], ids[:, 1:], mask)
    got = [out.recycle_loss, *out.deeper_losses]
    want = reference_depth_losses(model, ids, mask, 3, share)
    for j, (a, b) in enumerate(zip(got, want), 1):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=f"depth {j}")
    torch.testing.assert_close(out.loss, out.lm_loss + 0.7 * (got[0] + 0.5 * got[1] + 0.25 * got[2]))
    assert set(out.named()) == {"loss", "lm_loss", "recycle_loss", "recycle_loss_d2", "recycle_loss_d3"}


@pytest.mark.parametrize("target, share", [("tokens", 0.0), ("base", 1.0), ("mix", 0.3)])
def test_a_draft_vocabulary_restricts_both_distributions_and_the_corpus_targets(target, share):
    """recycle.draft_vocab: the module's logits are W_out's draft rows only (its head costs V'/V), the teacher
    is renormalised over them, corpus tokens outside them are no target; checked against the reference."""
    draft_ids = torch.randperm(CFG.vocab_size, generator=torch.Generator().manual_seed(3))[:40]
    objective = RecycleObjective(target=target, mix=0.3, depth=2, draft_ids=draft_ids)
    model = make_model(objective)
    ids, mask = batch()
    assert not set(ids[:, 2:].flatten().tolist()) <= set(draft_ids.tolist())   # some targets lie outside
    widths = []
    model.lm_head.register_forward_hook(lambda mod, args, out: widths.append(out.shape[-1]))
    with torch.no_grad():
        out = model(ids[:, :-1], ids[:, 1:], mask)
        assert widths == [CFG.vocab_size]              # the module's logits do not go through the full head
        logits = objective.module_logits(model.lm_head, torch.randn(3, CFG.hidden_size))
    assert logits.shape == (3, 40)
    want = reference_depth_losses(model, ids, mask, 2, share, draft_ids)
    for j, (a, b) in enumerate(zip([out.recycle_loss, *out.deeper_losses], want), 1):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=f"depth {j}")


def test_a_bf16_frozen_base_runs_its_forward_in_bf16_and_the_module_in_fp32():
    """recycle.base_bf16: the frozen base (a teacher) runs under bf16 autocast, the module trains in fp32 on
    its states, and the losses stay within bf16 rounding of the fp32 ones."""
    model = make_model(RecycleObjective(target="base", depth=2)).train()
    model.freeze_base()
    ids, mask = batch()
    fp32 = model(ids[:, :-1], ids[:, 1:], mask)
    dtypes = {}
    model.layers[0].mlp.register_forward_hook(lambda mod, args, out: dtypes.update(base=out.dtype))
    model.recycle.layers[0].mlp.register_forward_hook(lambda mod, args, out: dtypes.update(module=out.dtype))
    model.freeze_base(bf16=True)
    bf16 = model(ids[:, :-1], ids[:, 1:], mask)
    assert dtypes == {"base": torch.bfloat16, "module": torch.float32}
    assert bf16.recycle_loss.dtype == torch.float32 and bf16.recycle_loss.grad_fn is not None
    torch.testing.assert_close(bf16.recycle_loss, fp32.recycle_loss, rtol=0.05, atol=0.02)
    assert not torch.equal(bf16.lm_loss, fp32.lm_loss)


def test_base_target_teaches_toward_the_base_not_the_base_toward_the_module():
    ids, _ = batch()
    labels = ids[:, 1:]
    lm = torch.randn(2, 9, CFG.vocab_size, requires_grad=True)
    rec = torch.randn(2, 8, CFG.vocab_size, requires_grad=True)
    out = RecycleObjective(target="base")(LocalSpec(), lm, [rec], labels, None)
    out.recycle_loss.backward()
    assert lm.grad is None and rec.grad is not None
    # the minimum: the module's distribution equal to the base's one position later
    same = RecycleObjective(target="base")(LocalSpec(), lm.detach(), [lm.detach()[:, 1:]], labels, None)
    assert abs(float(same.recycle_loss)) < 1e-6


def test_frozen_base_runs_without_autograd_and_only_the_module_gets_gradients():
    model = make_model(RecycleObjective(target="mix", depth=2)).train()
    grad_enabled = []
    model.layers[0].register_forward_hook(lambda mod, args, out: grad_enabled.append(torch.is_grad_enabled()))
    ids, mask = batch()
    model(ids[:, :-1], ids[:, 1:], mask).loss.backward()
    assert grad_enabled == [True]                      # joint training: the base builds its graph
    model.zero_grad(set_to_none=True)
    model.freeze_base()
    out = model(ids[:, :-1], ids[:, 1:], mask)
    assert grad_enabled[-1] is False and out.lm_loss.grad_fn is None
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("recycle."), name


@torch.no_grad()
def test_decoding_with_one_cache_per_depth_reproduces_the_training_states():
    """The convention a k-token drafter follows (model/recycle.py): per depth its own KV cache, fed in
    chunks, gives the same states as the unrolled training pass."""
    model = make_model()
    ids, _ = batch(length=10)
    T = 10
    h = model.hidden(ids[:, :T])
    trained = model.recycle.unroll(h, model.embedding(ids[:, 1:T + 1]), model.rotary, 3)
    caches = [model.new_caches(2, T)[1] for _ in range(3)]
    chunks = [(0, 4), (4, 5), (5, 7)]
    got = [[] for _ in range(3)]
    for a, b in chunks:
        state = h[:, a:b]
        for d in range(3):
            state = model.draft_step(state, ids[:, a + d + 1:b + d + 1], caches[d])
            got[d].append(state)
    for d in range(3):
        torch.testing.assert_close(torch.cat(got[d], 1), trained[d][:, :7], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=0), "recycle.train_depth=0 must be >= 1"),
    (dict(depth=2, depth_weights=(1.0,)), "recycle.depth_weights has 1 entries; recycle.train_depth=2 needs 2"),
    (dict(target="teacher"), "recycle.target='teacher'; valid: tokens, base, mix"),
    (dict(target="mix", mix=1.5), "recycle.mix=1.5 must be between 0 and 1"),
])
def test_bad_objective_values_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        RecycleObjective(**kwargs)


@pytest.mark.parametrize("override, message", [
    ("recycle.train_depth=0", "recycle.train_depth=0 must be >= 1"),
    ("recycle.depth_weights=[1.0]", "recycle.depth_weights has 1 entries"),
    ("recycle.init=copy", "recycle.init='copy'; valid: random, base_last_layers"),
    ("recycle.target=logits", "recycle.target='logits'; valid: tokens, base, mix"),
    ("recycle.depth_weights=[a, b]", "must be a list of numbers"),
    ("recycle.draft_vocab=100000", "recycle.draft_vocab=100000 must be an int between 0 (the whole vocabulary) and "
                                   "model.vocab_size=8192"),
    ("recycle.base_bf16=true", "recycle.base_bf16=true runs a frozen base in bf16: set recycle.detach_base=true"),
    (("parallel.tp=2", "recycle.draft_vocab=512"), "recycle.draft_vocab=512 with parallel.tp=2: the LM head is split"),
])
def test_config_keys_are_checked_with_one_line_errors(override, message):
    from pretrain.config import ConfigError, load_config
    overrides = ["data.prefixes=[x]", "recycle.train_depth=2", *([override] if isinstance(override, str) else override)]
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("module_layers", [1, 2])
def test_module_init_copies_the_base_last_layers(module_layers):
    from model.recycle import init_from_base_layers
    cfg = ModelConfig(**{**CFG.to_dict(), "num_layers": 3, "recycle_layers": module_layers})
    torch.manual_seed(0)
    state = RecycleGPT(cfg).state_dict()
    new = init_from_base_layers(state, cfg)
    for j in range(module_layers):
        src = 3 - module_layers + j
        names = [k for k in state if k.startswith(f"recycle.layers.{j}.")]
        assert names
        for k in names:
            assert torch.equal(new[k], state[k.replace(f"recycle.layers.{j}.", f"layers.{src}.")]), k
    d = cfg.hidden_size
    assert torch.equal(new["recycle.linear_in.weight"][:, :d], torch.eye(d))
    assert torch.equal(new["recycle.linear_in.weight"][:, d:], state["recycle.linear_in.weight"][:, d:])
    assert torch.equal(new["recycle.final_norm.weight"], state["final_norm.weight"])
    assert all(torch.equal(new[k], state[k]) for k in state if not k.startswith("recycle."))


def test_import_and_first_start_initialise_a_new_module_from_the_base(tmp_path):
    """pretrain.import_hf with recycle.init=base_last_layers, and a random-module import whose training
    config asks for it (pretrain.runtime.imported_weights) give the same module."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrain.config import load_config
    from pretrain.import_hf import main as import_main
    from pretrain.runtime import imported_weights

    hf = tmp_path / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(hf)
    assert import_main(["--hf", str(hf), "--output", str(tmp_path / "copied"), "recycle.init=base_last_layers"]) == 0
    copied = load_file(str(tmp_path / "copied" / "init" / "model.safetensors"))
    for k in [k for k in copied if k.startswith("recycle.layers.0.")]:
        assert torch.equal(copied[k], copied[k.replace("recycle.layers.0.", "layers.2.")]), k
    assert import_main(["--hf", str(hf), "--output", str(tmp_path / "random")]) == 0
    random = load_file(str(tmp_path / "random" / "init" / "model.safetensors"))
    assert not torch.equal(random["recycle.layers.0.mlp.linear_fc2.weight"], random["layers.2.mlp.linear_fc2.weight"])
    cfg = load_config(str(tmp_path / "random" / "config.yaml"), ["recycle.init=base_last_layers"])
    started = imported_weights(cfg)
    assert started.keys() == copied.keys() and all(torch.equal(started[k], copied[k]) for k in copied)
