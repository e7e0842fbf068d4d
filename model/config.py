"""Model configuration and the presets of DESIGN.md §1.

A preset is a plain `ModelConfig`; YAML configs name a preset and may override single fields.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2          # grouped-query attention; == num_heads gives plain multi-head
    ffn_hidden_size: int = 704     # SwiGLU inner width
    max_seq_len: int = 256
    recycle_layers: int = 1        # depth N of the recyclable module; 0 gives a plain LM
    rope_theta: float = 10000.0
    # Rotary frequency scaling of long-context models (model/layers.py::rope_inv_freq): none | linear | llama3.
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0         # llama3 only
    rope_high_freq_factor: float = 4.0        # llama3 only
    rope_original_max_positions: int = 8192   # llama3 only: the context the model was pretrained with
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if (self.hidden_size // max(self.num_heads, 1)) % 2:
            problems.append(f"head_dim={self.hidden_size // self.num_heads} must be even for rotary embeddings")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "ffn_hidden_size", "max_seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.recycle_layers < 0:
            problems.append(f"recycle_layers={self.recycle_layers} must be >= 0 (0 = plain LM)")
        if self.rope_scaling not in ROPE_SCALINGS:
            problems.append(f"rope_scaling={self.rope_scaling!r} is unknown; valid: {', '.join(ROPE_SCALINGS)}")
        if self.rope_scaling_factor <= 0 or self.rope_original_max_positions < 1:
            problems.append("rope_scaling_factor must be > 0 and rope_original_max_positions >= 1")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            problems.append(f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                            f"rope_low_freq_factor={self.rope_low_freq_factor}")
        if problems:
            raise ValueError("model config: " + "; ".join(problems))

    @property
    def rope_scaling_args(self) -> tuple:
        """Everything the rotary tables depend on besides theta, hashable (tables are cached per value)."""
        if self.rope_scaling == "none":
            return ("none",)
        return (self.rope_scaling, self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                self.rope_original_max_positions)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def num_parameters(self) -> dict:
        """Parameter counts from shapes alone (no tensors), so 13B presets can be sized on a laptop."""
        d, f, hd = self.hidden_size, self.ffn_hidden_size, self.head_dim
        attn = d * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * d
        layer = attn + 3 * d * f + 2 * d                      # qkv+proj, SwiGLU fc1 (gate,up) + fc2, two norms
        embed = self.vocab_size * d
        base = embed + self.num_layers * layer + d + embed     # embedding, layers, final norm, untied head
        module = 0
        if self.recycle_layers:
            module = 2 * d * d + 2 * d + self.recycle_layers * layer + d  # W_proj, two input norms, layers, norm_r
        return {"base": base, "recycle": module, "total": base + module}


PRESETS: dict[str, ModelConfig] = {
    # CPU demo and CI: trains in minutes on 2 cores with the bundled 8k BPE.
    "tiny": ModelConfig(),
    "125m": ModelConfig(vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                        ffn_hidden_size=2048, max_seq_len=2048, recycle_layers=1),
    # The paper's 1.3B: a 4-layer module is about 15 % of the 1.42B base.
    "1.3b": ModelConfig(vocab_size=50304, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
                        ffn_hidden_size=5504, max_seq_len=2048, recycle_layers=4),
    # LLaMA-2 shapes; the module keeps the 1:8 depth ratio of the 1.3B preset's 4 of 24 roughly.
    "7b": ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      ffn_hidden_size=11008, max_seq_len=4096, recycle_layers=4),
    "13b": ModelConfig(vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                       ffn_hidden_size=13824, max_seq_len=4096, recycle_layers=5),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
