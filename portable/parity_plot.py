"""One PNG per parity check: where the candidate's distributions drift, and whether that drift could flip a token.

Top panel: KL(reference || candidate) per teacher-forced step (log scale). Bottom panel: the reference's decision
margin per step (greedy: top-1 minus top-2 logit; sampled: distance of the seeded draw from the edge of the picked
token's CDF slice), with every teacher-forced top-1 mismatch marked at its margin against the candidate's token
(top-1 minus that token's logit; sampled: the draw's distance from that token's slice), the tolerance (when one was
derived) as a horizontal line, and each sequence's first free-running divergence as a vertical line. A mismatch
above the tolerance line is what makes a verdict `diverged`. A batch's legend stands beside the panels; past ten
sequences (the colour cycle's length) the lines go unnamed and each divergence line carries the numbers of its
sequences.

Matplotlib's object API with the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

from pathlib import Path

from caches.fileformat import atomic_file
from portable.parity import ParityResult

NAMED_SEQUENCES = 10  # a legend entry and a colour of matplotlib's cycle each; a larger batch repeats the colours
KL_FLOOR = 1e-12  # log scale: KL 0 (exact agreement) is drawn at a tenth of the smallest positive KL, or here


def plot(result: ParityResult, title: str, path: Path, sampled: bool = False) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_kl, ax_margin = fig.subplots(2, 1, sharex=True)
    several = len(result.per_step) > 1
    named = several and len(result.per_step) <= NAMED_SEQUENCES
    positive = [v for seq in result.per_step for v in seq["kl"] if v > 0]
    floor = min(positive) / 10 if positive else KL_FLOOR
    unnamed_firsts: dict[int, list[int]] = {}  # step -> sequences first diverging there (a batch too large to name)
    for b, seq in enumerate(result.per_step):
        steps = list(range(len(seq["kl"])))
        label = f"sequence {b}" if named else None
        line, = ax_kl.plot(steps, [max(v, floor) for v in seq["kl"]], marker=".", label=label)
        ax_margin.plot(steps, seq["margin"], marker=".", color=line.get_color(), label=label)
        first = (result.first_divergence or [None] * (b + 1))[b]
        if first is not None:
            if several and not named:
                unnamed_firsts.setdefault(first, []).append(b)
                continue
            for ax in (ax_kl, ax_margin):
                ax.axvline(first, color=line.get_color(), linestyle="--", linewidth=1,
                           label=f"first divergence{f' (sequence {b})' if several else ''}" if ax is ax_margin
                           else None)
    for n, (first, sequences) in enumerate(sorted(unnamed_firsts.items())):  # the colours repeat: numbers instead
        for ax in (ax_kl, ax_margin):
            ax.axvline(first, color="dimgray", linestyle="--", linewidth=1,
                       label="first divergence (sequences as numbered)" if ax is ax_margin and n == 0 else None)
        ax_kl.annotate(", ".join(map(str, sequences)), (first, 0.98), xycoords=("data", "axes fraction"),
                       ha="left", va="top", fontsize="x-small", color="dimgray")
    if result.mismatches:
        ax_margin.scatter([m.step for m in result.mismatches], [m.reference_margin for m in result.mismatches],
                          marker="x", s=60, color="red", zorder=3, label="teacher-forced top-1 mismatch")
    if result.tolerance is not None:
        ax_margin.axhline(result.tolerance, color="gray", linestyle=":", label=f"tolerance {result.tolerance:.3g}")
    ax_kl.set_yscale("log")
    zeros = any(v <= 0 for seq in result.per_step for v in seq["kl"])  # drawn at the floor: say so on the axis
    ax_kl.set_ylabel("KL(ref || cand)" + (f"\n(KL 0 drawn at {floor:.0e})" if zeros else ""))
    ax_margin.set_ylabel("reference margin\n" + ("(draw to CDF edge;\nx: to the candidate's slice)" if sampled else
                                                 "(top-1 - top-2 logit;\nx: top-1 - candidate's)"))
    ax_margin.set_xlabel("decode step")
    for ax in (ax_kl, ax_margin):
        ax.grid(alpha=0.3)
    if ax_margin.get_legend_handles_labels()[0]:  # a batch's legend beside the plot, where it hides no line
        ax_margin.legend(fontsize="small", **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if several else {}))
    fig.suptitle(f"{title}: {result.verdict} ({result.matched_tokens}/{result.compared_tokens} tokens, top-1 "
                 f"{result.top1_agreement:.1f}%)")
    with atomic_file(path) as f:  # drawn next to it and renamed: a killed run never leaves half a PNG
        fig.savefig(f, format="png", dpi=90)
    return Path(path)
