"""int8_mm at batch 16 against the dense bf16 product, for the linear shapes of Llama-3.2-1B and Qwen3-1.7B."""
import itertools, json, sys
import torch, triton
from backends import quantize
from backends.kernels import int8_mm

shapes = {"llama": [(3072, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (128256, 2048)],
          "qwen3": [(4096, 2048), (2048, 2048), (6144, 2048), (2048, 6144), (151936, 2048)]}
sms = torch.cuda.get_device_properties(0).multi_processor_count
rows = []
for model, ss in shapes.items():
    for n, k in ss:
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        q, s = quantize.quantize_rows(w)
        out = torch.empty(16, n, device="cuda")
        dense_us = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w), warmup=20, rep=100) * 1e3
        default = int8_mm.default_config(16, n, k)
        best = None
        for bn, bk, warps, stages, split in itertools.product((32, 64, 128), (128, 256), (4, 8), (3, 4),
                                                               (None, 1, 2, 4, 8)):
            c = int8_mm.MmConfig(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                                 split_k=split or default.split_k)
            if split and k % (bk * split):
                continue
            try:
                us = triton.testing.do_bench(lambda: int8_mm.int8_mm(x, q, s, out=out, config=c), warmup=5, rep=20) * 1e3
            except Exception as e:
                continue
            if best is None or us < best[0]:
                best = (us, c)
        d_us = triton.testing.do_bench(lambda: int8_mm.int8_mm(x, q, s, out=out), warmup=20, rep=100) * 1e3
        ref = x.float() @ quantize.dequantize_rows(q, s, torch.float32).t()
        err = float((int8_mm.int8_mm(x, q, s) - ref).norm() / ref.norm())
        row = {"model": model, "n": n, "k": k, "dense_bf16_us": round(dense_us, 1), "int8_default_us": round(d_us, 1),
               "default": default.__dict__, "best_us": round(best[0], 1), "best": best[1].__dict__, "rel_err": err,
               "int8_GBps_default": round(n * k / d_us / 1e3, 1), "dense_GBps": round(2 * n * k / dense_us / 1e3, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
