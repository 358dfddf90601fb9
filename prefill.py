"""Prefill: run a prompt through the model once and save its KV cache to a file.

    python prefill.py                                  # the embedded model, the default prompt, CPU fp32
    python prefill.py --prompt 'def add(a, b):\n' --batch 4 --out add.safetensors

The same as `portable prefill`; `python prefill.py --help` lists the options.
"""

import sys

from portable.launch import main

if __name__ == "__main__":
    main(sys.argv[1:], prog_name="prefill.py", command="prefill")
