"""Model math only: config and presets, layers, the recyclable module, KV caches. No launching."""
from model.config import PRESETS, ModelConfig, preset
from model.gpt import RecycleGPT
from model.kv_cache import KVCache
from model.objective import LossOutput, RecycleObjective
from model.spec import LocalSpec

__all__ = ["PRESETS", "ModelConfig", "preset", "RecycleGPT", "LossOutput", "RecycleObjective", "KVCache",
           "LocalSpec"]
