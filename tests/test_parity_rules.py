"""The parity verdict's rules on hand-made tokens and logits (no model): the sampler's distribution against Hugging
Face's processors, its id-ordered CDF and its slices, the decision margin at a mismatch, the tolerance, and each
verdict rule of `portable.parity.compare`. The verdicts on the embedded model and the `portable parity` matrix are in
test_parity.py."""

from __future__ import annotations

import math

import pytest
import torch

from portable.config import SamplingConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_candidates_found_with_the_logits_pick_what_the_host_path_picks(dtype):
    """The preselected path against the full float64 host path on logits with many ties at the threshold, with and
    without a repetition penalty (seen tokens inside and outside the raw top-k)."""
    from portable.config import SamplingConfig
    from portable.sampling import Sampler

    gen = torch.Generator().manual_seed(0)
    for trial in range(48):
        config = SamplingConfig(temperature=(0.3, 0.8, 1.7)[trial % 3], top_k=(1, 5, 50, 5000)[trial % 4],
                                top_p=(1.0, 0.9, 0.5)[trial % 3], seed=trial,
                                repetition_penalty=(1.0, 1.3, 0.7, 1.1)[trial // 4 % 4])
        logits = (torch.randn(3, 4096, generator=gen) * 4).round(decimals=trial % 2).to(dtype)  # rounding: ties
        ranked = torch.sort(logits[1].float(), descending=True, stable=True).indices
        history = [[], ranked[:8].tolist() + ranked[40:50].tolist() + [7, 7, 4095],  # inside and past the top-k
                   torch.sort(logits[2].float(), descending=True, stable=True).indices[40:50].tolist()
                   + torch.randint(0, 4096, (10,), generator=gen).tolist()]  # a penalty < 1 lifts these into it
        fast, host = Sampler(config, 3), Sampler(config, 3)
        assert fast.preselects
        host_rows = host.distribution(host.process(logits, history))
        for (ids, vals), (hids, hprobs) in zip(fast.candidates(logits, history), host_rows):
            fids, fprobs = fast._nucleus(ids, vals)
            assert torch.equal(fids, hids) and torch.equal(fprobs, hprobs)
        for _ in range(3):
            picked = fast.pick(logits, history)
            assert picked == [Sampler._choose(i, p, r) for (i, p), r in zip(host_rows, host.draw())]


def test_the_sampling_distribution_is_that_of_hugging_faces_processors():
    """README: penalty (prompt and generated tokens), temperature, top-k (ties at the k-th kept), top-p (at least one
    token) give `generate`'s distribution on the same logits."""
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    from portable.sampling import Sampler

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 64, generator=gen) * 3
    logits[1, [10, 20, 30]] = logits[1].sort(descending=True).values[1]  # ties at the 2nd largest value
    history = [[5, 9, 9, 63], [1, 40, 40, 1]]  # the prompt's tokens and the generated ones alike
    for t, k, p, rp in [(1.0, 0, 1.0, 1.3), (0.7, 3, 1.0, 0.8), (1.3, 0, 0.8, 1.2), (0.9, 10, 0.5, 1.1),
                        (1.0, 0, 0.0, 1.0), (0.5, 2, 0.95, 1.0)]:
        config = SamplingConfig(temperature=t, top_k=k, top_p=p, repetition_penalty=rp)
        hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(rp), TemperatureLogitsWarper(t)]
                                 + ([TopKLogitsWarper(k)] if k else []) + ([TopPLogitsWarper(p)] if p < 1 else []))
        expected = torch.softmax(hf(torch.tensor(history), logits.double()), -1)
        sampler = Sampler(config, 2)
        for b, (ids, probs) in enumerate(sampler.distribution(sampler.process(logits, history))):
            ours = torch.zeros(64, dtype=torch.float64).index_put_((ids,), probs)
            assert torch.allclose(ours, expected[b], atol=1e-6), (config, b)


def test_a_near_tie_swapping_rank_moves_the_sampled_slices_only_by_the_probability_error():
    """Two tokens at ~0.49 each swap rank between reference and candidate: the id-ordered CDF walk picks the same
    token for every draw except those closer to a slice edge than the edge moved."""
    from portable.sampling import Sampler

    sampler = Sampler(SamplingConfig(temperature=1.0), 1)
    ref = torch.full((1, 64), -30.0, dtype=torch.float64)
    ref[0, 5], ref[0, 40], ref[0, 9] = 0.0020, 0.0, -3.0
    cand = ref.clone()
    cand[0, 5], cand[0, 40] = 0.0, 0.0020  # the rank of the two leaders swaps
    (ids_r, p_r), = sampler.distribution(ref)
    (ids_c, p_c), = sampler.distribution(cand)
    edges_r = [Sampler.bounds(ids_r, p_r, t)[1] for t in range(64)]
    moved = max(abs(a - Sampler.bounds(ids_c, p_c, t)[1]) for t, a in enumerate(edges_r))
    assert 0 < moved < 0.001  # the probability error, not the ~0.49 of a token
    draws = torch.linspace(0, 1, 20001)[:-1].tolist()
    differ = [r for r in draws if Sampler._choose(ids_r, p_r, r) != Sampler._choose(ids_c, p_c, r)]
    assert 0 < len(differ) / len(draws) <= 2 * moved + 1e-3
    assert all(min(abs(r - e) for e in edges_r) <= moved for r in differ)  # only draws next to a moving edge
    for r in draws[::997]:  # the margin is the distance of the draw from the nearest edge of the picked slice
        lo, hi = Sampler.bounds(ids_r, p_r, Sampler._choose(ids_r, p_r, r))
        assert lo <= r < hi


def hand_made(tokens, logits, sampling=SamplingConfig()):
    """A reference from hand-made tokens and logits (unit tests of the verdict)."""
    from portable import parity

    return parity.Reference(tokens=tokens, finish_reasons=["length"] * len(tokens), logits=logits,
                            sampling=sampling.__dict__, max_new_tokens=max(len(t) for t in tokens),
                            cache_checksum=None, model_fingerprint=None, stopping={"stop": [], "ignore_eos": False})


def compare_by_hand(reference, candidate_tokens, picks, teacher_logits, calibration, precision="bf16"):
    """The verdict for free-running `candidate_tokens` and teacher-forced `picks`/`teacher_logits`, with the
    pristine model's `calibration` logits."""
    from portable import parity
    from portable.generation import DecodeResult

    batch = len(reference.tokens)
    candidate = DecodeResult(tokens=candidate_tokens, finish_reasons=["length"] * batch)
    teacher = DecodeResult(tokens=reference.tokens, finish_reasons=["length"] * batch, logits=teacher_logits,
                           picks=picks)
    return parity.compare(reference, candidate, teacher, precision, [[0]] * batch, calibrate=lambda: calibration)


def test_a_pick_the_reference_was_sure_against_is_diverged_though_its_top_two_are_near_tied():
    """Greedy: the reference's top two tie within the tolerance, but the candidate picks a third token 15 logits
    below: the margin is against the candidate's token, not between the reference's top two."""
    logits = torch.zeros(1, 2, 8)
    logits[0, 0, 1], logits[0, 0, 2], logits[0, 0, 3] = 10.0, 9.99, -5.0
    logits[0, 1, 4] = 5.0
    calibration = logits.clone()
    calibration[0, 0, 2] = 10.0  # the pristine model's error on the top-two gap: 0.01
    teacher = logits.clone()
    teacher[0, 0, 3] = 11.0
    p = compare_by_hand(hand_made([[1, 4]], logits), [[3, 4]], [[3, 4]], teacher, calibration)
    assert p.verdict == "diverged" and "reference was confident" in p.reason, p.line()
    assert p.mismatches[0].reference_margin == 15.0 and p.per_step[0]["margin"] == [15.0, 5.0]
    near = teacher.clone()
    near[0, 0, 3], near[0, 0, 2] = -5.0, 10.01  # a flip to the second token stays within precision
    p = compare_by_hand(hand_made([[1, 4]], logits), [[2, 4]], [[2, 4]], near, calibration)
    assert p.verdict == "within-precision", p.line()
    assert p.mismatches[0].reference_margin == pytest.approx(0.01, abs=1e-6)  # float32's 10 - 9.99


def test_a_sampled_pick_far_from_the_draw_is_diverged_though_the_draw_lay_near_an_edge():
    """Sampled: the seeded draw (0.637 for seed 0) lies 0.002 above the lower edge of the reference token's slice
    [0.635, 0.9), but the candidate picks token 3, whose slice [0.95, 1) is 0.31 away: confident."""
    sampling = SamplingConfig(temperature=1.0, seed=0)
    logits = torch.tensor([0.635, 0.265, 0.05, 0.05]).log().view(1, 1, 4)
    calibration = logits.clone()
    calibration[0, 0, 0] += 0.01  # the pristine model moves the slice's edges by ~0.002
    teacher = logits.clone()
    teacher[0, 0, 3] += 3.0
    p = compare_by_hand(hand_made([[1]], logits, sampling), [[3]], [[3]], teacher, calibration)
    assert p.verdict == "diverged" and "reference was confident" in p.reason, p.line()
    assert p.mismatches[0].reference_margin == pytest.approx(0.95 - 0.637, abs=1e-3)
    p = compare_by_hand(hand_made([[1]], logits, sampling), [[0]], [[0]], teacher, calibration)
    assert p.verdict == "within-precision" and p.mismatches[0].reference_margin < 0.002, p.line()


def test_a_margin_is_compared_with_the_tolerance_before_it_is_rounded_for_the_report():
    """A margin of 4e-7 against a tolerance of 3e-7 is confident, although the report rounds it to 0."""
    logits = torch.zeros(1, 1, 8)
    logits[0, 0, 1] = 4e-7
    calibration = logits.clone()
    calibration[0, 0, 1] = 3e-7  # one step, error 1e-7 on the top-two gap: tolerance 3e-7
    teacher = logits.clone()
    teacher[0, 0, 2] = 1e-3
    p = compare_by_hand(hand_made([[1]], logits), [[2]], [[2]], teacher, calibration, precision="fp16")
    assert p.tolerance == pytest.approx(3e-7) and p.mismatches[0].reference_margin == pytest.approx(4e-7)
    assert p.verdict == "diverged" and "reference was confident" in p.reason, p.line()


def test_the_per_step_figures_keep_small_kls_and_margins():
    """fp16 drifts by a KL of ~1e-6 and another fp32 kernel by ~1e-12: the per-step figures (the JSON, the plots)
    keep them to 6 significant digits, not to 6 decimal places (which made them 0 or 1e-6 steps)."""
    logits = torch.zeros(1, 3, 8)
    logits[0, :, 1] = torch.tensor([5.0, 3e-7, 5.0])
    teacher = logits.clone()
    teacher[0, 0, 2], teacher[0, 1, 2], teacher[0, 2, 2] = 1e-2, 1e-5, 1e-3
    p = compare_by_hand(hand_made([[1, 1, 1]], logits), [[1, 1, 1]], [[1, 1, 1]], teacher, logits)
    ref, cand = torch.log_softmax(logits[0].double(), -1), torch.log_softmax(teacher[0].double(), -1)
    kl = (ref.exp() * (ref - cand)).sum(-1).tolist()
    assert p.verdict == "exact" and all(0 < v < 1e-5 for v in kl), (p.line(), kl)
    assert p.per_step[0]["kl"] == pytest.approx(kl, rel=1e-5)
    assert p.per_step[0]["margin"][1] == pytest.approx(3e-7, rel=1e-5)


def test_identical_free_running_tokens_with_a_confident_teacher_forced_mismatch_are_not_exact():
    """Free running gives the reference's tokens, but teacher forced on those same tokens the candidate picks one
    10 logits below the reference's: not a near-tie flipped without effect but an inconsistent candidate."""
    logits = torch.zeros(1, 2, 8)
    logits[0, 0, 1], logits[0, 1, 4] = 10.0, 5.0
    calibration = logits.clone()
    calibration[0, 0, 2] = 0.01
    teacher = logits.clone()
    teacher[0, 0, 6] = 20.0
    p = compare_by_hand(hand_made([[1, 4]], logits), [[1, 4]], [[6, 4]], teacher, calibration)
    assert p.verdict == "diverged" and "inconsistent" in p.reason and p.first_divergence is None, p.line()
    teacher = logits.clone()
    teacher[0, 0, 2] = 10.001  # a near-tie flip, below the tolerance (0.03): exact output
    logits[0, 0, 2] = 9.999
    p = compare_by_hand(hand_made([[1, 4]], logits), [[1, 4]], [[2, 4]], teacher, calibration)
    assert p.verdict == "exact" and "near-ties" in p.reason and p.tolerance > 0.002, p.line()


@pytest.mark.parametrize("candidate_tokens", [[[1]], [[1, 2, 3, 5]]], ids=["stops-earlier", "stops-later"])
def test_a_sequence_that_stops_at_another_step_on_the_same_tokens_is_diverged(candidate_tokens):
    """Free running stops after other tokens than the reference although they agree up to there: no teacher-forced
    near-tie flip explains that (stopping depends on the tokens only), even one at the step where they part."""
    logits = torch.zeros(1, 3, 8)
    logits[0, 0, 1], logits[0, 1, 2], logits[0, 1, 7], logits[0, 2, 3] = 5.0, 5.0, 4.99, 5.0
    calibration = logits.clone()
    calibration[0, 1, 7] = 5.0
    teacher = logits.clone()
    teacher[0, 1, 7] = 5.01  # a near-tie flip at step 1 (within the tolerance) ...
    p = compare_by_hand(hand_made([[1, 2, 3]], logits), candidate_tokens, [[1, 7, 3]], teacher, calibration)
    assert p.verdict == "diverged" and "stop conditions differ" in p.reason, p.line()
    p = compare_by_hand(hand_made([[1, 2, 3]], logits), [[1, 7, 4]], [[1, 7, 3]], teacher, calibration)
    assert p.verdict == "within-precision", p.line()  # ... explains a free-running token that differs there


def test_kl_and_logit_difference_with_non_finite_logits():
    """A token both sides rule out (-inf, as a masked padded vocabulary) adds nothing to the KL and |delta logit|
    (it made both NaN, and the NaN dropped sequence 0's difference of 4); a NaN in the candidate's logits shows."""
    logits = torch.zeros(2, 2, 8)
    logits[:, :, 1], logits[:, :, 7] = 5.0, float("-inf")
    teacher = logits.clone()
    teacher[0, 0, 3] = 4.0
    p = compare_by_hand(hand_made([[1, 1], [1, 1]], logits), [[1, 1], [1, 1]], [[1, 1], [1, 1]], teacher, logits)
    assert p.verdict == "exact" and p.max_abs_logit_diff == 4.0, p.line()
    assert 0 < p.kl_max < 1 and p.per_step[1]["kl"] == [0.0, 0.0]
    teacher = logits.clone()
    teacher[1, 1, :7] = float("nan")
    p = compare_by_hand(hand_made([[1, 1], [1, 1]], logits), [[1, 1], [1, 1]], [[1, 1], [1, 1]], teacher, logits)
    assert math.isnan(p.max_abs_logit_diff) and math.isnan(p.kl_max)


def test_a_sequence_that_diverges_without_a_teacher_forced_mismatch_is_diverged():
    """Sequence 0 flips at a near-tie in both runs (within precision); sequence 1 differs free-running although
    teacher forcing agrees up to its first divergent step: inconsistent, whatever sequence 0 shows."""
    tokens = [[1, 2, 3], [4, 5, 6]]
    logits = torch.zeros(2, 3, 8)
    for b, row in enumerate(tokens):
        for j, t in enumerate(row):
            logits[b, j, t] = 5.0
    logits[0, 1, 7] = 4.99  # a near-tie with token 2
    teacher_logits = logits.clone()
    teacher_logits[0, 1, 7] = 5.01
    reference = hand_made(tokens, logits)
    picks = [[1, 7, 3], [4, 5, 6]]
    consistent = compare_by_hand(reference, [[1, 7, 0], [4, 5, 6]], picks, teacher_logits, teacher_logits)
    assert consistent.verdict == "within-precision", consistent.line()
    p = compare_by_hand(reference, [[1, 7, 0], [4, 0, 6]], picks, teacher_logits, teacher_logits)
    assert p.verdict == "diverged" and "sequence 1 differs free-running from step 1" in p.reason, p.line()
