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
    """recycle.base_bf16: the frozen base (a teacher) runs on bf16 copies of its weights, the module trains in
    fp32 on its states, and the losses stay within bf16 rounding of the fp32 ones; the parameters (what a
    checkpoint saves) stay fp32."""
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
    assert not torch.equal(bf16.recycle_loss, fp32.recycle_loss)
    assert {p.dtype for p in model.state_dict().values()} == {torch.float32}


def test_module_bf16_is_mixed_precision_for_the_training_step_only():
    """recycle.module_bf16: the module's training step runs under bf16 autocast (fp32 weights, fp32 gradients,
    fp32 losses within bf16 rounding of the fp32 step); validation (eval mode) runs it in fp32."""
    model = make_model(RecycleObjective(target="base", depth=2)).train()
    model.freeze_base()
    ids, mask = batch()
    fp32 = model(ids[:, :-1], ids[:, 1:], mask)
    dtypes = []
    model.recycle.layers[0].mlp.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    model.freeze_base(module_bf16=True)
    mixed = model(ids[:, :-1], ids[:, 1:], mask)
    mixed.loss.backward()
    assert dtypes == [torch.bfloat16] * 2                 # one module pass per depth
    assert mixed.recycle_loss.dtype == torch.float32 and not torch.equal(mixed.recycle_loss, fp32.recycle_loss)
    torch.testing.assert_close(mixed.recycle_loss, fp32.recycle_loss, rtol=0.05, atol=0.02)
    assert {p.grad.dtype for p in model.recycle.parameters()} == {torch.float32}
    with torch.no_grad():
        model.eval()(ids[:, :-1], ids[:, 1:], mask)
    assert dtypes[2:] == [torch.float32] * 2


def frozen_and_plain_steps(objective, bf16=False):
    """One training step of a frozen base through its teacher pass, and the same step through the plain
    forward (the path validation takes), with the module's gradients of each."""
    model = make_model(objective).train()
    model.freeze_base(bf16=bf16)
    ids, mask = batch()
    widths = []
    model.lm_head.register_forward_hook(lambda mod, args, out: widths.append(out.shape[-1]))
    out = []
    for teacher in (model.frozen, None):
        model.frozen = teacher
        model.zero_grad(set_to_none=True)
        widths.clear()
        step = model(ids[:, :-1], ids[:, 1:], mask)
        step.loss.backward()
        out.append((step, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                    list(widths)))
    return model, out


@pytest.mark.parametrize("target", ["tokens", "base", "mix"])
def test_a_frozen_base_step_reads_the_teacher_over_the_draft_rows_and_skips_the_base_loss(target):
    """model/frozen_base.py: the frozen base's training step computes the teacher's logits over the draft rows
    only and no base cross-entropy; the module's losses and gradients equal the plain forward's."""
    draft_ids = torch.randperm(CFG.vocab_size, generator=torch.Generator().manual_seed(3))[:40]
    objective = RecycleObjective(weight=0.7, target=target, mix=0.3, depth=2, depth_weights=(1.0, 0.5),
                                 draft_ids=draft_ids)
    _, ((fast, fast_grads, fast_heads), (plain, plain_grads, plain_heads)) = frozen_and_plain_steps(objective)
    assert fast_heads == [] and plain_heads == [CFG.vocab_size]      # the 96-wide head: the plain step only
    for a, b in [(fast.recycle_loss, plain.recycle_loss), (fast.deeper_losses[0], plain.deeper_losses[0])]:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.isnan(fast.lm_loss) and torch.isfinite(plain.lm_loss)
    torch.testing.assert_close(fast.loss, 0.7 * (fast.recycle_loss + 0.5 * fast.deeper_losses[0]))
    assert fast_grads.keys() == plain_grads.keys() and all(n.startswith("recycle.") for n in fast_grads)
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_frozen_teacher_pass_runs_the_base_head_only_where_the_target_needs_it():
    heads = {}
    for target in ("tokens", "base"):
        model = make_model(RecycleObjective(target=target)).train()
        model.freeze_base()
        calls = []
        model.lm_head.register_forward_hook(lambda mod, args, out: calls.append(out.shape[-1]))
        ids, mask = batch()
        model(ids[:, :-1], ids[:, 1:], mask)
        heads[target] = calls
    # the module's own logits go through the head once per depth; a teacher adds the base's pass
    assert heads == {"tokens": [CFG.vocab_size], "base": [CFG.vocab_size, CFG.vocab_size]}


def test_bf16_copies_follow_a_change_of_the_base_weights():
    """A checkpoint load writes the base's weights in place after the copies were made: the next step must
    teach from the loaded weights, as the autocast path would."""
    objective = RecycleObjective(target="base")
    model = make_model(objective).train()
    model.freeze_base(bf16=True)
    ids, mask = batch()
    before = model(ids[:, :-1], ids[:, 1:], mask).recycle_loss
    other = make_model(objective, seed=5).state_dict()
    model.load_state_dict({k: v for k, v in other.items() if not k.startswith("recycle.")}, strict=False)
    after = model(ids[:, :-1], ids[:, 1:], mask).recycle_loss
    fresh = make_model(objective).train()
    fresh.load_state_dict(model.state_dict())
    fresh.freeze_base(bf16=True)
    torch.testing.assert_close(after, fresh(ids[:, :-1], ids[:, 1:], mask).recycle_loss)
    assert not torch.allclose(before, after)


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
    ("recycle.module_bf16=true", "recycle.module_bf16=true is mixed precision for a module on a frozen base: set "
                                 "recycle.detach_base=true"),
    ("recycle.module_bf16=auto", "recycle.module_bf16=auto is mixed precision for a module on a frozen base"),
    ("recycle.base_bf16=fast", "recycle.base_bf16='fast' must be true, false or auto"),
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
