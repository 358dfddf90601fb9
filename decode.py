"""Decode: load a KV cache file, generate token by token on a backend, check parity with CPU FP32, print metrics.

    python decode.py                                   # CPU fp32 from kv_cache.safetensors
    python decode.py --backend cuda --precision bf16 --json report.json

The same as `portable decode`; `python decode.py --help` lists the options.
"""

import sys

from portable.launch import main

if __name__ == "__main__":
    main(sys.argv[1:], prog_name="decode.py", command="decode")
