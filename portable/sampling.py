"""Choosing the next token: greedy or seeded sampling, identical on every backend.

Reproducibility across devices is by construction: the logits are brought to the host as float32, every transform
(repetition penalty, temperature, top-k, top-p) runs there in float64 with ties broken by token id, and the random
number for each sequence and step is drawn on the host from a seeded PCG64 stream (one draw per sequence per step,
finished or not, so streams stay aligned). Given the same logits and seed, every backend picks the same token.

The pick is a continuous function of the probabilities: the candidates are *chosen* by sorting (top-k, top-p), but the
inverse-CDF walk runs over the kept candidates in token-id order. Walking in probability order instead would let two
near-tied tokens that swap rank under another precision move every later slice of the CDF by a whole token's
probability; in id order each slice edge moves only by the probability error of the tokens before it. A sampled
step's decision margin is the distance of the draw from the nearest edge of the picked token's slice (`bounds`).

Top-k sampling finds its candidates where the logits are and moves only those (the same candidates and float64 values
as the full host path: see `Sampler.candidates`), so a large vocabulary costs little.

Greedy decoding without a repetition penalty needs no host round trip: `pick_on_device` takes the argmax where the
logits are (the first maximal index, as on the host).
"""

from __future__ import annotations

import numpy as np
import torch

from portable.config import SamplingConfig


class Sampler:
    def __init__(self, config: SamplingConfig, batch: int):
        self.config = config
        self.batch = batch
        self._rng = np.random.Generator(np.random.PCG64(config.seed))

    @property
    def on_device(self) -> bool:
        """True when the pick needs only the argmax of the raw logits (no host transfer of the logits)."""
        return self.config.greedy and self.config.repetition_penalty == 1.0

    def pick_on_device(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    def process(self, logits: torch.Tensor, history: list[list[int]]) -> torch.Tensor:
        """The logits after repetition penalty and temperature, float64 on the host: [batch, vocab]."""
        x = logits.detach().to("cpu", torch.float32).to(torch.float64)
        penalty = self.config.repetition_penalty
        if penalty != 1.0:
            for b, seen in enumerate(history):
                if seen:
                    idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
                    vals = x[b, idx]
                    x[b, idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
        if not self.config.greedy:
            x = x / self.config.temperature
        return x

    def distribution(self, processed: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row: (ascending token ids, probabilities) of the candidates kept by top-k and top-p."""
        rows = []
        for row in processed:
            if self.config.top_k > 0 and self.config.top_k < row.numel():
                kth = torch.topk(row, self.config.top_k).values[-1]
                ids = torch.nonzero(row >= kth).view(-1)  # keep every tie at the threshold, as transformers does
            else:
                ids = torch.arange(row.numel())
            rows.append(self._nucleus(ids, row[ids]))
        return rows

    def _nucleus(self, ids: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates (ascending ids, float64 values) -> (ascending ids, probabilities) after top-p: the nucleus is
        the most probable prefix (ties by ascending token id), kept in id order."""
        probs = torch.softmax(vals, dim=0)
        if self.config.top_p < 1.0:
            order = torch.sort(-vals, stable=True).indices  # descending, ties by ascending token id
            cum = torch.cumsum(probs[order], dim=0)
            keep = int(torch.searchsorted(cum, torch.tensor(self.config.top_p, dtype=cum.dtype)).item()) + 1
            kept = torch.sort(order[:keep]).values
            ids, probs = ids[kept], probs[kept] / probs[kept].sum()
        return ids, probs

    @property
    def preselects(self) -> bool:
        """Top-k sampling: the candidates are found where the logits are and only they travel to the host (see
        `candidates`), with the same tokens as the full host path."""
        return not self.config.greedy and self.config.top_k > 0

    def candidates(self, logits: torch.Tensor, history: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row: (ascending token ids, processed float64 values) of the top-k after the repetition penalty, ties
        at the threshold included — what `distribution(process(...))` keeps, without moving the whole row.

        Why it is the same set: float32 -> float64 and the division by a positive temperature keep the order of the
        values strictly, and the penalty changes only seen tokens. So every token of the final top-k is a seen token
        or an unseen one whose raw value ranks within the top (k + number of seen tokens) of the raw row; that union
        is brought over, the penalty and temperature applied there exactly as `process` does, and the top-k (ties
        included) taken within it."""
        x = logits.detach().float()
        batch, vocab = x.shape
        penalty = self.config.repetition_penalty
        seen = [sorted(set(h)) for h in history] if penalty != 1.0 and history else [[] for _ in range(batch)]
        ranks = [min(self.config.top_k + len(s), vocab) for s in seen]
        top = torch.topk(x, max(ranks), dim=-1).values
        if len(set(ranks)) == 1:  # no host-to-device copy of the ranks in the common case
            threshold = top[:, ranks[0] - 1:ranks[0]]
        else:
            threshold = top.gather(1, torch.tensor(ranks, device=x.device)[:, None] - 1)
        rows, ids = torch.nonzero(x >= threshold, as_tuple=True)
        vals = x[rows, ids]
        rows, ids, vals = rows.cpu(), ids.cpu(), vals.cpu().to(torch.float64)
        out = []
        for b in range(batch):
            bid, bval = ids[rows == b], vals[rows == b]
            if seen[b]:
                s = torch.tensor(seen[b], dtype=torch.long)
                extra = s[~torch.isin(s, bid)]
                if extra.numel():
                    bid = torch.cat([bid, extra])
                    bval = torch.cat([bval, x[b, extra.to(x.device)].cpu().to(torch.float64)])
                    order = torch.argsort(bid)
                    bid, bval = bid[order], bval[order]
                hit = torch.isin(bid, s)
                v = bval[hit]
                bval[hit] = torch.where(v > 0, v / penalty, v * penalty)
            bval = bval / self.config.temperature
            kth = torch.topk(bval, min(self.config.top_k, bval.numel())).values[-1]
            keep = bval >= kth
            out.append((bid[keep], bval[keep]))
        return out

    def draw(self) -> np.ndarray:
        """This step's uniform numbers, one per sequence."""
        return self._rng.random(self.batch)

    def pick(self, logits: torch.Tensor, history: list[list[int]]) -> list[int]:
        """The next token of each sequence (host ints)."""
        if self.on_device:
            return logits.argmax(dim=-1).tolist()
        if self.preselects:
            rows = [self._nucleus(ids, vals) for ids, vals in self.candidates(logits, history)]
        else:
            processed = self.process(logits, history)
            if self.config.greedy:
                return processed.argmax(dim=-1).tolist()
            rows = self.distribution(processed)
        return [self._choose(ids, probs, r) for (ids, probs), r in zip(rows, self.draw())]

    @staticmethod
    def _choose(ids: torch.Tensor, probs: torch.Tensor, r: float) -> int:
        """The token whose slice of the id-ordered CDF holds the draw `r`."""
        cdf = torch.cumsum(probs, dim=0)
        j = min(int(torch.searchsorted(cdf, torch.tensor(r * cdf[-1].item(), dtype=cdf.dtype), right=True)),
                len(ids) - 1)
        return int(ids[j])

    @staticmethod
    def bounds(ids: torch.Tensor, probs: torch.Tensor, token: int) -> tuple[float, float]:
        """The slice [lo, hi) of `token` in the CDF that `_choose` walks, normalised to 1; an empty slice at the
        token's place in id order when it is not a candidate."""
        cdf = torch.cumsum(probs, dim=0)
        total = float(cdf[-1])
        k = int(torch.searchsorted(ids, token))
        lo = float(cdf[k - 1]) / total if k else 0.0
        hi = float(cdf[k]) / total if k < len(ids) and int(ids[k]) == token else lo
        return lo, hi
