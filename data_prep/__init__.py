"""Data preparation: corpus readers, tokenization into Megatron indexed datasets, merging, blending.

Commands: `python -m data_prep.tokenize`, `python -m data_prep.merge`, `python -m data_prep.train_tokenizer`.
Training side: `data_prep.datasets.DataConfig` and `build_datasets`.
"""
