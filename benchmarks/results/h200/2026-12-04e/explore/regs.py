import sys, torch
sys.path.insert(0, '.')
from backends.kernels import attention as A
dev = torch.device('cuda')
for d, hq, hk, n in ((128, 16, 8, 2048), (64, 32, 8, 2048)):
    att = A.RopeAttention(1, hq, hk, d, 320, dev, block_s=32, min_chunks_p2=16 if d >= 128 else 1)
    att.m.zero_(); att.l.fill_(1.0); att.acc.zero_()
    att.slot = torch.tensor([64], dtype=torch.int32, device=dev)
    wo = torch.randn(n, hq * d, dtype=torch.bfloat16, device=dev)
    h = torch.zeros(n, dtype=torch.float32, device=dev)
    o = torch.zeros(1, hq, d, dtype=torch.bfloat16, device=dev)
    for heads, bn, warps in ((1, 128, 4), (2, 128, 4), (2, 64, 4), (2, 128, 8)):
        att.combine_oproj_(wo, h, True, bn, warps, heads, o_like=o)
torch.cuda.synchronize()
def walk(x, depth=0):
    if hasattr(x, 'n_regs'):
        yield x
    elif isinstance(x, dict):
        for v in x.values(): yield from walk(v, depth + 1)
    elif isinstance(x, (list, tuple)) and depth < 4:
        for v in x: yield from walk(v, depth + 1)
for k in walk(A._combine_oproj_kernel.device_caches):
    md = k.metadata
    print('combine_oproj', 'warps', md.num_warps, 'regs', k.n_regs, 'spills', k.n_spills, 'shared', md.shared,
          {c: v for c, v in getattr(md, 'constants', {}).items()} if hasattr(md, 'constants') else '')
