"""The `data:` section of the training YAML: one schema, used by pretrain.config (parsing, overrides, errors) and
data_prep.datasets (building the datasets). Kept free of heavy imports so a config loads in milliseconds."""
from dataclasses import dataclass, field


@dataclass
class DataConfig:
    prefixes: list = field(default_factory=list)        # [[weight, prefix], ...] or plain prefixes (weight 1.0);
    #                                                     a prefix is the path without .bin/.idx
    valid_prefixes: list = field(default_factory=list)  # separate validation corpus; then test is None
    split: str = "98,2,0"    # train,valid,test weights, as Megatron's --split
    tokenizer: str = "assets/tokenizers/sotu-bpe-8k"
    cache_dir: str = ""      # index cache; "" -> <folder of the first prefix>/index-cache
    eod_mask_loss: bool = False
