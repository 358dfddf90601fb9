"""portable: prefill once, decode anywhere.

The route: `prefill` runs a prompt once and saves its cache file (`caches/`); `decode` loads it on any backend
(`backends/`), runs the decode loop (`generation`), checks parity against CPU FP32 (`parity`) and reports the
metrics (`metrics`, `report`). The CLI (`cli`) is a thin layer over these.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # `portable.prefill(config)` / `portable.decode(config)` without importing torch on `import portable`.
    if name in ("prefill", "decode"):
        from portable import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'portable' has no attribute {name!r}")
