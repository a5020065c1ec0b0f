"""Stage two: CLIP embedding -> codes with an autoregressive transformer."""

from generator.gpt import GPT, GPTConfig, KVCache
from generator.sampling import generate, generate_naive

__all__ = ["GPT", "GPTConfig", "KVCache", "generate", "generate_naive"]
