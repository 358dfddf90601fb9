"""Named suites (seed 003): seven prompt/generation configurations in three tiers.

| config    | prompt |  gen | sampling                             | purpose                         |
|-----------|-------:|-----:|--------------------------------------|---------------------------------|
| short     |     64 |   64 | greedy                               | quick Q&A, baseline latency     |
| medium    |    256 |  256 | greedy                               | standard chat (headline number) |
| prefill   |   1024 |   64 | greedy                               | isolates prefill performance    |
| decode    |     64 | 1024 | greedy                               | isolates decode performance     |
| long      |   1024 | 1024 | greedy                               | stress test, longest sequence   |
| sampled   |    256 |  256 | temp=0.8 top_k=50 top_p=0.9          | sampling transform overhead     |
| full-pipe |    256 |  256 | temp=0.8 top_k=50 top_p=0.9 rep=1.1  | all transforms active           |

Each runs as an end-to-end test (prefill + generation, `pgP,G`) and reports E2E and decode throughput, per-step
P50/P95, TTFT, KV cache size and peak memory. Sampling is seeded (seed 42, as seed 003).
"""

from __future__ import annotations

from portable.bench.spec import TestSpec
from portable.config import SamplingConfig
from portable.errors import PortableError

SEED = 42
_SAMPLED = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, seed=SEED)

CONFIGS: dict[str, TestSpec] = {
    "short": TestSpec("pg", n_prompt=64, n_gen=64, config="short"),
    "medium": TestSpec("pg", n_prompt=256, n_gen=256, config="medium"),
    "prefill": TestSpec("pg", n_prompt=1024, n_gen=64, config="prefill"),
    "decode": TestSpec("pg", n_prompt=64, n_gen=1024, config="decode"),
    "long": TestSpec("pg", n_prompt=1024, n_gen=1024, config="long"),
    "sampled": TestSpec("pg", n_prompt=256, n_gen=256, sampling=_SAMPLED, config="sampled"),
    "full-pipe": TestSpec("pg", n_prompt=256, n_gen=256, config="full-pipe",
                          sampling=SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1,
                                                  seed=SEED)),
}

TIERS: dict[str, tuple[str, ...]] = {
    "quick": ("short", "medium"),
    "standard": ("short", "medium", "prefill", "decode", "sampled"),
    "full": tuple(CONFIGS),
}


def suite(tier: str) -> tuple[TestSpec, ...]:
    """A tier (quick, standard, full) or a comma list of configuration names (e.g. medium,sampled)."""
    if tier in TIERS:
        return tuple(CONFIGS[name] for name in TIERS[tier])
    names = [name.strip() for name in tier.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if not names or unknown:
        raise PortableError(f"unknown suite {tier!r}; choose a tier ({', '.join(TIERS)}) or configurations "
                            f"({', '.join(CONFIGS)})")
    return tuple(CONFIGS[name] for name in dict.fromkeys(names))
