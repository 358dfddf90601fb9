"""The sweep spec: every field a list, parsed from the command line's lists and ranges.

    --batch 1,8,64          a list
    --batch 1-4096*2        a geometric range: 1, 2, 4, ..., 4096
    --batch 128-512+128     an arithmetic range: 128, 256, 384, 512
    --batch 1-4             1, 2, 3, 4
    --tests pp512,tg128     tests by the names llama-bench uses; pg512,128 takes two numbers; tg128@d4096 decodes
                            after a 4,096-token cache

Options may also be repeated (`--batch 1 --batch 8`). Defaults come from `RunConfig` where a run has the same
setting, and from `SweepSpec` below for what only a benchmark has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from portable.config import RunConfig, SamplingConfig
from portable.errors import PortableError

_RUN = RunConfig()
KINDS = ("pp", "tg", "pg")


@dataclass(frozen=True)
class TestSpec:
    """One test: what is prefilled, what is decoded, and with what sampling.

    pp: prefill `n_prompt` tokens per sequence.  tg: decode `n_gen` tokens after a start cache of `depth` tokens (a
    1-token prompt when depth is 0).  pg: prefill `n_prompt` tokens, then generate `n_gen` tokens, end to end.
    """

    __test__ = False  # not a pytest class, despite its name

    kind: str
    n_prompt: int = 0
    n_gen: int = 0
    depth: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    config: str | None = None  # the suite configuration this test comes from ("short", "medium", ...)

    @property
    def name(self) -> str:
        base = {"pp": f"pp{self.n_prompt}", "tg": f"tg{self.n_gen}", "pg": f"pg{self.n_prompt},{self.n_gen}"}
        return base[self.kind] + (f"@d{self.depth}" if self.depth else "")

    @property
    def start_tokens(self) -> int:
        """Tokens per sequence in the cache the decode starts from (tg: the depth, at least the 1-token prompt)."""
        return max(self.depth, 1) if self.kind == "tg" else self.n_prompt

    @property
    def decode_steps(self) -> int:
        """Decode forwards per sequence: tgN runs N; pgP,G runs G - 1 (the prefill's logits give the first token)."""
        return {"pp": 0, "tg": self.n_gen, "pg": max(self.n_gen - 1, 0)}[self.kind]

    @property
    def final_positions(self) -> int:
        """Positions per sequence in the cache when the test ends: pp the prompt; tg the start cache + N steps; pg the
        prompt + G - 1 steps (the last generated token is picked, never fed)."""
        return self.start_tokens + self.decode_steps if self.kind != "pp" else self.n_prompt

    def counted_tokens(self, batch: int) -> int:
        """Tokens the test's throughput counts per repetition (llama-bench: pg counts prompt and generated)."""
        return batch * {"pp": self.n_prompt, "tg": self.n_gen, "pg": self.n_prompt + self.n_gen}[self.kind]


_TEST = re.compile(r"^(pp|tg|pg)(\d+)(?:,(\d+))?(?:@d(\d+))?$")


def parse_tests(values: list[str] | tuple[str, ...] | str) -> tuple[TestSpec, ...]:
    """`pp512,tg128,pg512,128,tg128@d4096` (comma lists, possibly repeated) -> test specs, in the given order."""
    if isinstance(values, str):
        values = [values]
    tokens = [t.strip() for v in values for t in v.split(",") if t.strip()]
    merged: list[str] = []
    for tok in tokens:  # "pg512" followed by "128" (or "128@d4") is one test
        if merged and re.fullmatch(r"pg\d+", merged[-1]) and re.fullmatch(r"\d+(@d\d+)?", tok):
            merged[-1] += "," + tok
        else:
            merged.append(tok)
    tests = []
    for tok in merged:
        m = _TEST.match(tok)
        if not m:
            raise PortableError(f"unknown test {tok!r}; tests look like pp512, tg128, pg512,128 or tg128@d4096")
        kind, a, b, depth = m.group(1), int(m.group(2)), m.group(3), int(m.group(4) or 0)
        if (kind == "pg") != (b is not None):
            raise PortableError(f"test {tok!r}: pg takes a prompt and a generation length (pg512,128); pp and tg "
                                f"take one number")
        if a < 1 or (b is not None and int(b) < 1):
            raise PortableError(f"test {tok!r}: lengths must be at least 1")
        if depth and kind != "tg":
            raise PortableError(f"test {tok!r}: a depth (@dN) applies to tg tests only (a prefill always starts from "
                                f"an empty cache)")
        if kind == "pp":
            tests.append(TestSpec("pp", n_prompt=a))
        elif kind == "tg":
            tests.append(TestSpec("tg", n_gen=a, depth=depth))
        else:
            tests.append(TestSpec("pg", n_prompt=a, n_gen=int(b)))
    if not tests:
        raise PortableError("no tests given")
    return tuple(tests)


_RANGE = re.compile(r"^(\d+)-(\d+)(?:([*+])(\d+))?$")


def parse_ints(values: list[str] | tuple[str, ...] | str, what: str, minimum: int = 1) -> tuple[int, ...]:
    """Comma lists and ranges (`1-4096*2`, `128-512+128`, `1-4`) -> the integers, in order, without repeats."""
    if isinstance(values, str):
        values = [values]
    out: list[int] = []
    for item in (t.strip() for v in values for t in str(v).split(",")):
        if not item:
            continue
        if item.isdigit():
            out.append(int(item))
            continue
        m = _RANGE.match(item)
        if not m:
            raise PortableError(f"--{what} {item!r}: expected a number, a list (1,8,64) or a range (1-4096*2, "
                                f"128-512+128)")
        first, last, op, step = int(m.group(1)), int(m.group(2)), m.group(3) or "+", int(m.group(4) or 1)
        if last < first or (op == "*" and (step < 2 or first < 1)) or (op == "+" and step < 1):
            raise PortableError(f"--{what} {item!r}: an empty or endless range")
        x = first
        while x <= last:
            out.append(x)
            x = x * step if op == "*" else x + step
    if not out:
        raise PortableError(f"--{what}: no values given")
    low = min(out)
    if low < minimum:
        raise PortableError(f"--{what}: {low} is below the minimum {minimum}")
    return tuple(dict.fromkeys(out))


def parse_names(values: list[str] | tuple[str, ...] | str, what: str, choices=None) -> tuple[str, ...]:
    """Comma lists of names (`fp16,bf16`), checked against `choices` when given."""
    if isinstance(values, str):
        values = [values]
    out = [t.strip() for v in values for t in str(v).split(",") if t.strip()]
    if not out:
        raise PortableError(f"--{what}: no values given")
    if choices is not None:
        for name in out:
            if name not in choices:
                raise PortableError(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class SweepSpec:
    """Everything one `portable bench` invocation sweeps over, and how it measures."""

    models: tuple[str, ...] = (_RUN.model,)
    backends: tuple[str, ...] = (_RUN.backend,)
    precisions: tuple[str, ...] = (_RUN.precision,)
    attns: tuple[str, ...] = (_RUN.attn,)
    kernels: tuple[str, ...] = (_RUN.kernels,)
    batches: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = ()  # CPU threads (torch.set_num_threads); empty: leave as it is
    sync_every: tuple[int, ...] = ()  # read tokens back every N decode steps; empty: plan.sync_every_for(backend)
    tests: tuple[TestSpec, ...] = parse_tests("pp512,tg128")
    repetitions: int = 5
    warmup: int = 1  # untimed repetitions of each point first (kernel selection, graph capture, allocator growth)
    compile: bool = _RUN.compile
    device: str | None = _RUN.device
    seed: int = 0  # the random prompt token ids
    compare: tuple[str, ...] = ()  # peers timed on the same points: "hf"
    profile_dir: Path | None = None

    def replace(self, **changes) -> "SweepSpec":
        return replace(self, **changes)
