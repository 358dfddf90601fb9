"""Parity verdicts: is a candidate decode (another backend, precision or cache storage) right?

The reference is CPU FP32 decoding from the same cache file, with the same sampling settings and seed. Three
comparisons:

1. Free running: the candidate's own tokens against the reference's; the first divergent step per sequence.
2. Teacher forced: the candidate is fed the reference's tokens and its next-token distributions are compared at
   every step: agreement of the picked token, KL(reference || candidate), max |delta logit|, and the reference's
   *decision margin* (greedy: top-1 minus top-2 logit; sampled: how far the seeded draw lay from the nearest edge
   of the reference token's slice of the id-ordered CDF, in probability: see `portable.sampling`). At a
   disagreement the margin is taken against the candidate's token (greedy: the reference's top-1 logit minus its
   logit for that token; sampled: how far the draw lay from that token's slice), so a near-tie between the
   reference's top two does not excuse a pick the reference was sure against.
3. The verdict:
   - `exact`: the free-running tokens are identical, and teacher forcing (on those same tokens) disagrees only at
     margins below the tolerance tau; a disagreement where the reference was confident is `diverged`, the runs
     inconsistent.
   - fp32 candidates must be exact: anything else is `diverged`.
   - `diverged` when a sequence's free-running tokens differ from step f on but teacher forcing shows no
     disagreement in that sequence at or before f: up to f the candidate saw the same tokens in both runs, so its
     pick at f must differ there too (same logits, same draw); if it does not, the runs are inconsistent
     (nondeterminism, or other settings). So is a sequence that stops at another step than the reference's with the
     same tokens up to there: stopping depends on the tokens only, so no flip explains it.
   - `within-precision`: every teacher-forced disagreement sits at a reference margin below the tolerance tau.
   - `diverged`: some disagreement sits where the reference was confident (margin >= tau): likely a bug.

How tau is derived: the reference model itself (pristine Hugging Face weights and code, on the CPU) is run at the
candidate's precision, teacher forced on the same tokens, and at every step we measure how far its decision quantity
moved from the FP32 one (greedy: |delta(top1 - top2)| on the reference's top two tokens; sampled: how far the edges
of the reference token's slice moved, max(|delta lo|, |delta hi|), each side with its own top-k / top-p candidates).
A flip needs a margin below that step's error (sampled: a draw inside the reference slice but outside the moved one
lies closer to an edge than the edge moved), so the largest error bounds every flip of the pristine model at this
precision on these tokens; other kernels at the same precision err on the same scale but not at the same steps, so
tau = max(3 x the 95th percentile of the errors, the largest error). The maximum matters where the errors are
heavy-tailed: with top-p a token entering or leaving the nucleus moves the edges by its whole probability. Because
tau comes from the pristine model, a broken candidate cannot widen its own tolerance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from caches import fileformat
from portable.config import RunConfig, SamplingConfig
from portable.errors import PortableError
from portable.generation import DecodeResult
from portable.sampling import Sampler

REFERENCE_FORMAT = "portable-parity-reference"
TOLERANCE_FACTOR = 3.0
TOLERANCE_PERCENTILE = 95.0


@dataclass
class Reference:
    """CPU FP32 decoding of one cache file: its tokens and the logits behind every pick."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    logits: torch.Tensor  # [batch, n, vocab] float32; position j of sequence b is valid for j < len(tokens[b])
    sampling: dict
    max_new_tokens: int
    cache_checksum: str | None
    model_fingerprint: str | None
    stopping: dict | None = None  # {"stop": [...], "ignore_eos": bool}; None in files from before version 2

    def save(self, path: Path) -> None:
        meta = {"format": REFERENCE_FORMAT, "version": 2, "tokens": self.tokens, "finish_reasons": self.finish_reasons,
                "sampling": self.sampling, "max_new_tokens": self.max_new_tokens, "stopping": self.stopping,
                "cache_checksum": self.cache_checksum, "model_fingerprint": self.model_fingerprint}
        fileformat.write(path, {"logits": self.logits.contiguous()}, {"portable": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> "Reference":
        try:
            tensors, raw = fileformat.read(path)
        except PortableError as e:
            raise PortableError(f"reference file: {e}") from e
        try:
            meta = json.loads(raw["portable"])
            if meta.get("format") != REFERENCE_FORMAT:
                raise KeyError("format")
            return cls(tokens=meta["tokens"], finish_reasons=meta["finish_reasons"], logits=tensors["logits"],
                       sampling=meta["sampling"], max_new_tokens=meta["max_new_tokens"],
                       cache_checksum=meta.get("cache_checksum"), model_fingerprint=meta.get("model_fingerprint"),
                       stopping=meta.get("stopping"))
        except (KeyError, json.JSONDecodeError) as e:
            raise PortableError(f"{path} is not a parity reference written by `portable reference`") from e

    def check_matches(self, cache_checksum: str | None, config: RunConfig, model_fingerprint: str | None) -> None:
        """Refuse a reference decoded from another cache file, model, sampling or stop conditions (its tokens would
        differ for reasons that are no bug), or one shorter than this run."""
        if self.cache_checksum and cache_checksum and self.cache_checksum != cache_checksum:
            raise PortableError("the reference file was computed from a different cache file")
        if self.stopping is None:
            raise PortableError("the reference file does not record its stop conditions (an older format); write it "
                                "again with `portable reference`")
        a, b = self.model_fingerprint, model_fingerprint
        if a and b and a.split(":")[0] == b.split(":")[0] and a != b:  # comparable only within one hashing scheme
            raise PortableError(f"the reference file was decoded with other model weights ({a}) than the loaded "
                                f"model ({b})")
        if _decisive(self.sampling) != _decisive(asdict(config.sampling)):
            raise PortableError(f"the reference file was decoded with sampling {self.sampling}, this run uses "
                                f"{asdict(config.sampling)}")
        if self.stopping != stopping(config):
            raise PortableError(f"the reference file was decoded with {_describe_stopping(self.stopping)}, this run "
                                f"uses {_describe_stopping(stopping(config))}; write it again with the same --stop "
                                f"and --ignore-eos")
        if config.max_new_tokens > self.max_new_tokens:
            raise PortableError(f"the reference file holds {self.max_new_tokens} new tokens; this run asks for "
                                f"{config.max_new_tokens}")


def stopping(config: RunConfig) -> dict:
    """The stop conditions a reference records: they decide where its sequences end."""
    return {"stop": list(config.stop), "ignore_eos": config.ignore_eos}


def _decisive(sampling: dict) -> dict:
    """The sampling settings that pick the tokens: greedy decoding draws nothing, so its seed does not count."""
    return {k: v for k, v in sampling.items() if not (k == "seed" and sampling["temperature"] == 0.0)}


def _describe_stopping(stop: dict) -> str:
    strings = " ".join(f"--stop {s!r}" for s in stop["stop"]) or "no --stop"
    return f"{strings} and {'--ignore-eos' if stop['ignore_eos'] else 'EOS stopping'}"


def reference_from(result: DecodeResult, config: RunConfig, cache_checksum: str | None,
                   model_fingerprint: str | None) -> Reference:
    assert result.logits is not None
    return Reference(tokens=result.tokens, finish_reasons=result.finish_reasons, logits=result.logits,
                     sampling=asdict(config.sampling), max_new_tokens=config.max_new_tokens,
                     cache_checksum=cache_checksum, model_fingerprint=model_fingerprint, stopping=stopping(config))


@dataclass
class Mismatch:
    sequence: int
    step: int
    reference_margin: float
    reference_token: int
    candidate_token: int
    reference_text: str = ""
    candidate_text: str = ""


@dataclass
class ParityResult:
    reference: str = "cpu-fp32"
    verdict: str = "skipped"  # exact | within-precision | diverged | skipped
    reason: str = ""
    first_divergence: list[int | None] | None = None  # per sequence; null when exact
    matched_tokens: int = 0
    compared_tokens: int = 0
    top1_agreement: float | None = None  # percent of teacher-forced steps where the candidate picks the same token
    kl_mean: float | None = None
    kl_p95: float | None = None
    kl_max: float | None = None
    max_abs_logit_diff: float | None = None
    tolerance: float | None = None
    tolerance_rule: str | None = None
    mismatches: list[Mismatch] = field(default_factory=list)
    per_step: list[dict] = field(default_factory=list)  # per sequence: {"kl": [...], "margin": [...]}

    def line(self) -> str:
        if self.verdict == "skipped":
            return f"Parity vs CPU FP32: skipped ({self.reason})"
        text = f"Parity vs CPU FP32: {self.verdict} ({self.matched_tokens}/{self.compared_tokens} tokens"
        if self.verdict != "exact" and self.first_divergence:
            firsts = [d for d in self.first_divergence if d is not None]
            text += f", first divergence at step {min(firsts)}" if firsts else ""
        text += ")"
        if self.verdict != "exact":
            text += f": {self.reason}"
        return text


def free_running(reference: Reference, candidate: DecodeResult) -> tuple[list[int | None], int, int]:
    firsts, matched, compared = [], 0, 0
    for ref, cand in zip(reference.tokens, candidate.tokens):
        n = min(len(ref), len(cand))
        first = next((j for j in range(n) if ref[j] != cand[j]), None)
        if first is None and len(ref) != len(cand):
            first = n
        firsts.append(first)
        matched += n if first is None else first
        compared += max(len(ref), len(cand))
    return firsts, matched, compared


def _decision_margins(logits: torch.Tensor, tokens: list[int], history: list[int], sampler: Sampler,
                      draws: list[float] | None, picks: list[int]) -> list[float]:
    """The reference's decision margin at each step (see module docstring): where the candidate `picks` another
    token, the margin between the reference's token and that one, not the nearest flip."""
    margins = []
    seen = list(history)
    for j, tok in enumerate(tokens):
        processed = sampler.process(logits[j:j + 1], [seen])[0]
        other = picks[j]
        if draws is None:
            if other == tok:
                top2 = torch.topk(processed, 2).values
                margins.append(float(top2[0] - top2[1]))
            else:
                margins.append(float(processed[tok] - processed[other]))
        else:
            ids_probs = sampler.distribution(processed[None])[0]
            lo, hi = Sampler.bounds(*ids_probs, tok)
            if other == tok:
                margins.append(max(0.0, min(draws[j] - lo, hi - draws[j])))
            else:  # how far the draw lay from the candidate token's slice (after the reference's, or before it)
                lo_o, hi_o = Sampler.bounds(*ids_probs, other)
                margins.append(max(0.0, lo_o - draws[j] if other > tok else draws[j] - hi_o))
        seen.append(tok)
    return margins


def margin_errors(reference: Reference, other_logits: torch.Tensor, histories: list[list[int]],
                  sampler: Sampler) -> list[float]:
    """How far `other_logits` moved the reference's decision margin, at every valid step (see module docstring)."""
    errors = []
    for b, tokens in enumerate(reference.tokens):
        seen = list(histories[b])
        for j, tok in enumerate(tokens):
            r = sampler.process(reference.logits[b, j:j + 1], [seen])[0]
            c = sampler.process(other_logits[b, j:j + 1], [seen])[0]
            if sampler.config.greedy:
                a, bb = torch.topk(r, 2).indices.tolist()
                errors.append(abs(float((c[a] - c[bb]) - (r[a] - r[bb]))))
            else:  # how far the edges of the reference token's slice moved (each side with its own candidates)
                lo_r, hi_r = Sampler.bounds(*sampler.distribution(r[None])[0], tok)
                lo_c, hi_c = Sampler.bounds(*sampler.distribution(c[None])[0], tok)
                errors.append(max(abs(lo_c - lo_r), abs(hi_c - hi_r)))
            seen.append(tok)
    return errors


def tolerance_from(errors: list[float]) -> float:
    if not errors:
        return 0.0
    values = torch.tensor(errors, dtype=torch.float64)
    return max(TOLERANCE_FACTOR * float(torch.quantile(values, TOLERANCE_PERCENTILE / 100)), float(values.max()))


def compare(reference: Reference, candidate: DecodeResult, teacher: DecodeResult, precision: str,
            histories: list[list[int]], calibrate=None, decode_text=None, storage: str = "native") -> ParityResult:
    """The verdict for `candidate` (free running) and `teacher` (the same candidate, teacher forced).

    `storage`: how the cache file keeps keys/values; a lossy one (int8) is a reduced precision of its own, so fp32
    must then be within its tolerance rather than exact.

    `calibrate()` returns the pristine model's logits at the candidate precision, teacher forced (see module
    docstring); it is called only when a verdict needs a tolerance. `histories` are the prompts' token ids (the
    repetition penalty needs them).
    """
    sampler = Sampler(SamplingConfig(**reference.sampling), len(reference.tokens))
    firsts, matched, compared = free_running(reference, candidate)
    result = ParityResult(first_divergence=None if all(f is None for f in firsts) else firsts,
                          matched_tokens=matched, compared_tokens=compared)
    assert teacher.logits is not None and teacher.picks is not None
    draws_all = _replay_draws(sampler, reference)

    agree, total, kls, diffs = 0, 0, [], [0.0]
    at = []  # the unrounded margin of each mismatch: the verdict compares these with tau
    for b, tokens in enumerate(reference.tokens):
        n = len(tokens)
        ref_l = reference.logits[b, :n].double()
        cand_l = teacher.logits[b, :n].double()
        logp_r = torch.log_softmax(ref_l, -1)
        logp_c = torch.log_softmax(cand_l, -1)
        p_r = logp_r.exp()  # 0 log 0 = 0: a token the reference rules out (-inf) adds nothing, whatever the candidate
        kl = torch.where(p_r > 0, p_r * (logp_r - logp_c), 0.0).sum(-1).clamp_min(0)
        kls.extend(kl.tolist())
        # equal logits (-inf on both sides too) differ by 0; a NaN stays NaN (torch's max keeps it, Python's drops it)
        diffs.extend(torch.where(ref_l == cand_l, 0.0, (ref_l - cand_l).abs()).amax(-1).tolist())
        margins = _decision_margins(reference.logits[b, :n], tokens, histories[b], sampler,
                                    None if draws_all is None else [d[b] for d in draws_all[:n]],
                                    teacher.picks[b][:n])
        result.per_step.append({"kl": [_rounded(v) for v in kl.tolist()], "margin": [_rounded(m) for m in margins]})
        for j in range(n):
            total += 1
            cand_tok = teacher.picks[b][j]
            if cand_tok == tokens[j]:
                agree += 1
            else:
                at.append(margins[j])
                result.mismatches.append(Mismatch(
                    sequence=b, step=j, reference_margin=_rounded(margins[j]), reference_token=tokens[j],
                    candidate_token=cand_tok,
                    reference_text=decode_text([tokens[j]]) if decode_text else "",
                    candidate_text=decode_text([cand_tok]) if decode_text else ""))
    kl_t = torch.tensor(kls or [0.0], dtype=torch.float64)
    result.top1_agreement = round(100.0 * agree / max(total, 1), 3)
    result.kl_mean = float(kl_t.mean())
    result.kl_p95 = float(torch.quantile(kl_t, 0.95))
    result.kl_max = float(kl_t.max())
    result.max_abs_logit_diff = float(torch.tensor(diffs, dtype=torch.float64).max())

    if result.first_divergence is None and not result.mismatches:
        result.verdict, result.reason = "exact", "token-exact"
        return result
    if result.first_divergence is not None and precision == "fp32" and storage == "native":
        result.verdict = "diverged"
        result.reason = "fp32 must be token-exact with CPU FP32"
        return result
    stopped = [(b, f) for b, f in enumerate(firsts)
               if f is not None and f == min(len(reference.tokens[b]), len(candidate.tokens[b]))]
    if stopped:  # one run's tokens are the start of the other's: it stopped on the same tokens, which no flip explains
        b, f = stopped[0]
        result.verdict = "diverged"
        result.reason = (f"sequence {b} stops after {len(candidate.tokens[b])} tokens free-running, the reference "
                         f"after {len(reference.tokens[b])}, with the same first {f}: the candidate's stop conditions "
                         f"differ (EOS ids, stop strings)")
        return result
    unexplained = [(b, f) for b, f in enumerate(firsts) if f is not None
                   and not any(m.sequence == b and m.step <= f for m in result.mismatches)]
    if unexplained:
        b, f = unexplained[0]
        result.verdict = "diverged"
        result.reason = (f"sequence {b} differs free-running from step {f} but teacher forcing on the reference "
                         f"shows no mismatch at or before it: the candidate is inconsistent (nondeterminism?)")
        return result
    errors = margin_errors(reference, calibrate(), histories, sampler) if calibrate else []
    tau = tolerance_from(errors)
    result.tolerance = tau
    what = precision if storage == "native" else f"{precision} with {storage} cache storage"
    result.tolerance_rule = (f"max({TOLERANCE_FACTOR:g} x p{TOLERANCE_PERCENTILE:g}, max) of the {what} "
                             f"decision-margin error of the pristine model on CPU over {len(errors)} steps")
    largest = max(at)
    worst = result.mismatches[at.index(largest)]
    n, agree = len(result.mismatches), result.first_divergence is None
    if largest < tau:  # every flip a near-tie: the output is exact, or within the precision's reach
        result.verdict = "exact" if agree else "within-precision"
        result.reason = (f"token-exact; {n} teacher-forced near-ties (margins < tolerance {tau:.4g}) flipped without "
                         f"effect" if agree else f"all {n} teacher-forced mismatches sit at reference margins < "
                         f"tolerance {tau:.4g} (largest {largest:.4g})")
    else:  # with the free-running tokens the same, a confident flip on those same tokens is an inconsistent run
        result.verdict = "diverged"
        result.reason = (f"{sum(m >= tau for m in at)} mismatch(es) where the reference was confident: margin "
                         f"{largest:.4g} >= tolerance {tau:.4g} at step {worst.step} of sequence {worst.sequence}; "
                         + ("the free-running tokens agree, so the candidate is inconsistent (nondeterminism?)"
                            if agree else "likely a bug"))
    return result


def _replay_draws(sampler: Sampler, reference: Reference) -> list | None:
    """The uniform draws the reference used at each step (None for greedy): the sampler's seeded stream replayed."""
    if sampler.config.greedy:
        return None
    steps = max((len(t) for t in reference.tokens), default=0)
    return [sampler.draw().tolist() for _ in range(steps)]


def skipped(reason: str) -> ParityResult:
    return ParityResult(verdict="skipped", reason=reason)


def summary(result: ParityResult) -> dict:
    data = asdict(result)
    data["kl_mean"] = None if result.kl_mean is None else _rounded(result.kl_mean)
    return data


def _rounded(value: float) -> float:
    """A figure for the report, to 6 significant digits: decimal places would turn the KL of fp16 (~1e-6) and of
    another fp32 kernel (~1e-12) into 0 or one digit, and their plots into steps."""
    return float(f"{value:.6g}")
