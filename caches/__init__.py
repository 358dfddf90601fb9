"""The cache file format: layer states (`layers`), the prompt cache container (`container`), the file contract
(`store`: save, load, validate, migrate), int8 storage (`quant`), and conversion to framework caches (`hf`)."""

from caches.container import PromptCache
from caches.layers import AttentionLayer, RecurrentLayer, SlidingWindowLayer
from caches.store import FORMAT_VERSION, check_writable, load_cache, read_metadata, save_cache

__all__ = ["PromptCache", "AttentionLayer", "SlidingWindowLayer", "RecurrentLayer", "save_cache", "check_writable",
           "load_cache", "read_metadata", "FORMAT_VERSION"]
