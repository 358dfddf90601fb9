"""Our own decode step for the Llama family (Llama, Qwen3, Mistral, Gemma3), on the Hugging Face weights.

Why: Hugging Face's modeling code with a static cache and torch.compile reaches about 30% of the memory-bandwidth
limit at batch 1 on an H100; the limit needs the weights streamed once per token with few launches. The shape
follows gpt-fast: a static preallocated cache, fixed shapes, one captured CUDA graph per (batch, length).

One step, batch 1, `--kernels triton` (5 launches per layer, plus embedding, head and advance):
    h (fp32 residual) = embed[token] * embed_scale
    per layer:  qkv   = W_qkv . rmsnorm(h)                          gemv, RMSNorm folded into its loop
                partial = attention(rope(qk_norm(q)), cache + rope(k), v)  split over the slots; the chunk that
                                                                      holds the new slot writes k and v
                h    += W_o . combine(partial)                      combine folded into the output projection
                                                                      (Gemma: o = combine; h += norm(W_o . o))
                a     = act(W_g . rmsnorm(h)) * (W_u . rmsnorm(h))  gemv, two weights, gated epilogue
                h    += W_d . a                                     (Gemma: h += norm(W_d . a))
    logits = W_head . rmsnorm(h); positions += 1; slot += 1
    (greedy steps: the head GEMV also writes each program's largest logit and its row; the advance kernel finishes
    the argmax and writes the token as the next step's input, so consecutive graph replays need no host work)
On Hopper GPUs every launch uses programmatic dependent launch (`pdl`): a kernel may launch while its predecessor
finishes, and a GEMV loads its first weight tile before it waits for the predecessor's output.
Batches > 1 (and `--kernels torch`) use matrix products through PyTorch and the same fused rope/attention/norm
kernels (or their PyTorch references). The residual stream stays in fp32 throughout.

Slots: the static cache holds `seen + max_new_tokens` slots per sequence; left padding puts sequence b's first real
token at slot start[b], so its position is slot - start[b]. Sliding-window layers mask slots older than the window.
Prefill is left to the Hugging Face model (the backend's reference path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends import quantize
from backends.kernels import activation, attention, gemv, int8_mm, norms, rope, step, stream_gemv
from caches import PromptCache, SlidingWindowLayer
from portable import architectures


@dataclass
class Layer:
    ln1: torch.Tensor
    wqkv: torch.Tensor | None  # the dense weights; None with int8 weights (then `int8` holds them)
    wo: torch.Tensor | None
    ln2: torch.Tensor
    wg: torch.Tensor | None
    wu: torch.Tensor | None
    wd: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_attn: torch.Tensor | None  # Gemma3 post-norms
    post_ff: torch.Tensor | None
    inv_freq: torch.Tensor
    rope_scaling: float
    window: int  # 0 = full attention
    int8: dict | None = None  # weight-only int8: {"qkv", "o", "g", "u", "d"} -> (q int8 [N, K], s fp32 [N])


def _layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * \
        config.num_hidden_layers


def supports(model) -> str | None:
    """None if our decode step covers this model; otherwise why not (the runner then uses the HF path)."""
    arch = architectures.for_model(model)
    if not arch.llama_family:
        return f"{model.config.model_type} is not in the Llama family"
    config = model.config
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None) is not None:
            return f"{name} is not supported"
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if lin.bias is not None:
                return "linear layers with biases are not supported"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if "dynamic" in str(rope_type):
        return f"rope type {rope_type} changes with the sequence length"
    return None


class FastDecoder:
    """The weights, static buffers and step function; device-agnostic (CUDA graphs are added by
    `backends.fast_runner.FastRunner`)."""

    def __init__(self, model, kernels: str = "triton", pdl: bool = False, int8: dict | None = None):
        """`int8`: {linear module: (q, s)} from `backends.quantize.quantize_linears_(model)` (the model's weights are
        then q * s, computed on access where `lean`): every step reads the int8 rows, the batch-1 GEMVs and the
        batches > 1 (`int8_mm`, or its PyTorch reference with `--kernels torch`); no dense copy of a linear weight is
        kept here."""
        config = model.config
        self.config = config
        self.kernels = kernels
        self.pdl = pdl and kernels == "triton"
        # L2 prefetch of GEMV weights before waiting (needs pdl). Off: on an H100 it made the GEMVs 20% slower
        # (successor kernels stream while their predecessor still does; benchmarks/gpu_profile.py).
        self.prefetch = False
        self.preload = None  # None: as the GEMV config says (True for every default config)
        self.trigger = "end"  # when a GEMV lets its successor launch: "last" (last tile), "end" ("start" is unsafe:
        # the attention kernel loads the cache before its wait, relying on the GEMV before it having passed its own)
        self.gemv_configs: dict[str, gemv.GemvConfig] = {}  # per kind (qkv, gate_up, down, head); default_config else
        # "stream": the 2-byte-weight GEMVs through `stream_gemv` (bulk copies into shared memory) where it takes
        # their shape, the default on NVIDIA sm_90+ GPUs (H200: 10-12% off the step; BENCHMARKS.md); "triton":
        # `gemv.gemv` everywhere
        self.gemv_impl = "triton"  # "stream" below, for 2-byte weights on a GPU that takes it
        self.stream_chunk_bytes, self.stream_ring_bytes = stream_gemv.CHUNK_BYTES, stream_gemv.RING_BYTES
        self.stream_rings: dict[str, int] = {}  # per GEMV kind, a ring other than `_ring`'s
        # a measurement (benchmarks/gpu_profile.py --stamps): int64 [stream GEMV launches per step, programs, 64]; the
        # step's i-th stream GEMV writes its programs' timer stamps into stamps[i] (stream_gemv.cu lists them)
        self.stamps: torch.Tensor | None = None
        self.stamp_kinds: list[str] = []  # the kind (qkv, o, gate_up, down, head) of each stamps[i] of the step
        # Measured on an H100 (benchmarks/gpu_profile.py): 32-slot blocks with 8 warps for pass 1 of the attention,
        # 128-row programs for the combine + output projection; on an H200 with the stream GEMVs, two heads per
        # program (-17 us per Qwen3-1.7B step, Llama-3.2-1B unchanged), where the weight tile stays in registers
        # (head_dim <= 128)
        self.oproj_block_n, self.oproj_warps, self.oproj_heads = 128, 4, 2  # heads: 1 where head_dim > 128 (below)
        self.attention_block_s, self.attention_warps = 32, 8
        inner = model.model
        self.dtype = inner.embed_tokens.weight.dtype
        self.device = inner.embed_tokens.weight.device
        self.gemma = config.model_type.startswith("gemma")
        self.offset = 1.0 if self.gemma else 0.0
        self.eps = config.rms_norm_eps
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        self.act = "gelu_tanh" if "gelu" in act else "silu"
        self.hq, self.hk = config.num_attention_heads, config.num_key_value_heads
        self.d = getattr(config, "head_dim", None) or config.hidden_size // self.hq
        if self.d > 128:
            self.oproj_heads = 1
        # the combines' chunk axis at least this long (DecodeAttention.chunks_p2). H200, tg128's 130 slots, once more
        # than 64 are in use: Qwen3-1.7B -30 us per step with 16 (911 -> 926 tok/s; 32 was slower than 16);
        # Llama-3.2-1B -18 us with 16 since gate/up's deeper ring (stream_gemv.GATE_UP_RING_BYTES), 1-2 us slower before
        self.attention_min_chunks_p2 = 16
        self.scale = (config.query_pre_attn_scalar ** -0.5) if self.gemma else self.d ** -0.5
        self.embed = inner.embed_tokens.weight
        self.embed_scale = float(inner.embed_tokens.embed_scale.to(self.dtype)) if self.gemma else 1.0
        self.final_norm = inner.norm.weight
        self.head = None if int8 else model.lm_head.weight  # int8: the head's rows are in head_int8
        self.vocab = model.lm_head.out_features
        self.intermediate = inner.layers[0].mlp.gate_proj.out_features
        self.weights = "int8" if int8 else "native"
        self.head_int8 = int8[model.lm_head] if int8 else None
        if (kernels == "triton" and not int8 and self.dtype in (torch.bfloat16, torch.float16)
                and stream_gemv.available(self.device) is None):
            self.gemv_impl = "stream"
        types = _layer_types(config)
        rotary = inner.rotary_emb
        self.layers = []
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            kind = types[i]
            if hasattr(rotary, f"{kind}_inv_freq"):  # Gemma3: one rotary base per layer type
                inv_freq, rscale = getattr(rotary, f"{kind}_inv_freq"), getattr(rotary, f"{kind}_attention_scaling")
            else:
                inv_freq, rscale = rotary.inv_freq, rotary.attention_scaling
            dense = not int8
            self.layers.append(Layer(
                ln1=layer.input_layernorm.weight,
                wqkv=_fuse_rows((attn.q_proj, attn.k_proj, attn.v_proj)) if dense else None,
                wo=attn.o_proj.weight if dense else None,
                ln2=(layer.pre_feedforward_layernorm if self.gemma else layer.post_attention_layernorm).weight,
                wg=mlp.gate_proj.weight if dense else None, wu=mlp.up_proj.weight if dense else None,
                wd=mlp.down_proj.weight if dense else None,
                q_norm=attn.q_norm.weight if hasattr(attn, "q_norm") else None,
                k_norm=attn.k_norm.weight if hasattr(attn, "k_norm") else None,
                post_attn=layer.post_attention_layernorm.weight if self.gemma else None,
                post_ff=layer.post_feedforward_layernorm.weight if self.gemma else None,
                inv_freq=inv_freq.float().contiguous(), rope_scaling=float(rscale),
                window=int(config.sliding_window) if kind == "sliding_attention" else 0,
                int8=_layer_int8(int8, attn, mlp) if int8 else None))
        self.shape = None

    # ---- static state ----
    def allocate(self, batch: int, slots: int) -> None:
        if self.shape == (batch, slots):
            return
        dev, dt = self.device, self.dtype
        hidden = self.embed.shape[1]
        self.k_cache = [torch.zeros(batch, self.hk, slots, self.d, dtype=dt, device=dev) for _ in self.layers]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.long, device=dev)
        self.start = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.slot = torch.zeros(1, dtype=torch.int32, device=dev)
        self.h = torch.zeros(batch, hidden, dtype=torch.float32, device=dev)
        self.qkv = torch.zeros(batch, (self.hq + 2 * self.hk) * self.d, dtype=dt, device=dev)
        self.q = torch.zeros(batch, self.hq, self.d, dtype=dt, device=dev)
        self.o = torch.zeros(batch, self.hq, self.d, dtype=dt, device=dev)
        self.mlp = torch.zeros(batch, self.intermediate, dtype=dt, device=dev)
        self.tmp = torch.zeros(batch, hidden, dtype=dt, device=dev)
        self.logits = torch.zeros(batch, self.vocab, dtype=torch.float32, device=dev)
        self.history = torch.zeros(batch, slots, dtype=torch.long, device=dev)  # greedy picks, by the slot they feed
        head_plan = None if self.head_int8 else self._stream_plan(self.head, gated=False)
        head = self.head_int8[0] if self.head_int8 else self.head
        blocks = head_plan.grid if head_plan else gemv.argmax_blocks(
            *head.shape, self.gemv_configs.get("head"), itemsize=head.element_size())
        self.amax = torch.zeros(blocks, dtype=torch.float32, device=dev)
        self.aidx = torch.zeros(blocks, dtype=torch.int32, device=dev)
        self.attention = attention.RopeAttention(batch, self.hq, self.hk, self.d, slots, dev,
                                                 block_s=self.attention_block_s,
                                                 min_chunks_p2=self.attention_min_chunks_p2)
        self.attention.num_warps = self.attention_warps
        self.shape = (batch, slots)

    def load_cache(self, cache: PromptCache, max_new_tokens: int) -> None:
        """Copy a prompt cache (already on this device and dtype) into the static cache."""
        seen = cache.seen_tokens
        self.allocate(cache.batch, seen + max_new_tokens)
        for layer, kc, vc, state in zip(self.layers, self.k_cache, self.v_cache, cache.layers):
            kept = state.keys.shape[2]
            first = (state.cumulative_length if isinstance(state, SlidingWindowLayer) else seen) - kept
            kc.zero_()
            vc.zero_()
            kc[:, :, first:first + kept] = state.keys
            vc[:, :, first:first + kept] = state.values
        lengths = cache.positions.to(self.device)
        self.positions.copy_(lengths)
        self.start.copy_((seen - lengths).to(torch.int32))
        self.slot.fill_(seen)

    # ---- the step ----
    def _fused(self) -> bool:
        return self.kernels == "triton" and self.shape[0] == 1

    def step(self, greedy: bool = False) -> torch.Tensor:
        """One decode step for `self.tokens`; advances positions and the slot; returns logits [batch, vocab].

        `greedy`: the step also picks the argmax of the logits (the first maximal id, as `Sampler.pick_on_device`),
        writes it to `self.tokens` as the next step's input and to `self.history[:, slot]`, so that consecutive
        greedy steps (one CUDA graph each) need nothing from the host between them."""
        triton_ = self.kernels == "triton"
        self.stamp_kinds = []
        (step.embed_ if triton_ else step.embed_torch_)(self.tokens, self.embed, self.h, self.embed_scale, self.pdl)
        if self._fused():
            self._layers_gemv(greedy)
        else:
            self._layers_matmul()
        pick = None
        if greedy and self._fused():  # the head GEMV left per-block maxima: the advance kernel finishes the argmax
            pick = (self.amax, self.aidx, self.tokens, self.history[0])
        elif greedy:
            self.tokens.copy_(self.logits.argmax(dim=-1))
            self.history.scatter_(1, self.slot.long().expand(self.shape[0], 1), self.tokens[:, None])
        if triton_:
            step.advance_(self.positions, self.slot, self.pdl, pick=pick)
        else:
            step.advance_torch_(self.positions, self.slot, self.pdl)
        return self.logits

    def _k(self):
        """The kernel set: Triton kernels or their PyTorch references."""
        triton_ = self.kernels == "triton"
        return (norms.rmsnorm if triton_ else norms.rmsnorm_torch,
                norms.rmsnorm_add_ if triton_ else norms.rmsnorm_add_torch_,
                activation.gated if triton_ else activation.gated_torch)

    def _attend(self, i: int, layer: Layer, combine: bool = True) -> None:
        """RoPE, cache write and attention of layer i; the output goes to self.o unless `combine` is False (then the
        caller folds the combine into the output projection)."""
        if self.kernels == "triton":
            self.attention.rope_attention(self.qkv, self.positions, layer.inv_freq, layer.rope_scaling,
                                          self.k_cache[i], self.v_cache[i], self.start, self.slot, self.scale,
                                          layer.window, layer.q_norm, layer.k_norm, self.eps, self.offset, self.pdl)
            if combine:
                self.attention.combine(self.o, self.pdl)
            return
        rope.qkv_rope_cache_torch_(self.qkv, self.positions, layer.inv_freq, layer.rope_scaling, self.q,
                                   self.k_cache[i], self.v_cache[i], self.slot, layer.q_norm, layer.k_norm, self.eps,
                                   self.offset)
        attention.decode_attention_torch(self.q, self.k_cache[i], self.v_cache[i], self.start, self.slot, self.scale,
                                         layer.window, out=self.o)

    def _stream_plan(self, w: torch.Tensor, gated: bool, kind: str | None = None) -> stream_gemv.Plan | None:
        """The work split `stream_gemv` would use for weight `w` (of GEMV `kind`), or None where the Triton GEMV
        runs it."""
        if (self.gemv_impl != "stream" or self.kernels != "triton" or self.weights != "native"
                or w.dtype not in (torch.bfloat16, torch.float16)):
            return None
        return stream_gemv.plan(*w.shape, gated, stream_gemv.sms(w.device), self.stream_chunk_bytes,
                                self._ring(kind, w, gated))

    def _ring(self, kind: str | None, w: torch.Tensor, gated: bool) -> int:
        """The stream GEMV's ring for `kind`: as `stream_rings` says, else stream_ring_bytes, except qkv's, which
        holds half of a program's rows, so that its programs fit on an SM beside the down projection's and start
        copying before that one ends (H200, BENCHMARKS.md: the best of 48-144 KiB for both presets; with
        oproj_heads=2, -33 us per Qwen3-1.7B step), and gate/up's, which fills while the attention runs:
        stream_gemv.GATE_UP_RING_BYTES (-8 to -16 us per greedy step on an H200 against stream_ring_bytes)."""
        if kind in self.stream_rings:
            return self.stream_rings[kind]
        if kind == "gate_up":
            return stream_gemv.GATE_UP_RING_BYTES
        if kind == "qkv":
            p = stream_gemv.plan(*w.shape, gated, stream_gemv.sms(w.device), self.stream_chunk_bytes,
                                 self.stream_ring_bytes)
            if p is not None:
                return p.rows_per_cta * w.shape[1] * w.element_size() // 2
        return self.stream_ring_bytes

    def _gemv(self, kind, x, w, out, s=None, *, up=None, us=None, **kw) -> None:
        """One batch-1 GEMV of `kind` (qkv, o, gate_up, down, head; the other arguments as `gemv.gemv`'s), through
        `stream_gemv` where it applies."""
        if s is None and self._stream_plan(w, up is not None) is not None:
            stamps = None
            if self.stamps is not None:
                stamps = self.stamps[len(self.stamp_kinds)].view(-1)
                self.stamp_kinds.append(kind)
            stream_gemv.stream_gemv(x, w, out, up=up, pdl=self.pdl, chunk_bytes=self.stream_chunk_bytes,
                                    ring_bytes=self._ring(kind, w, up is not None), stamps=stamps, **kw)
        else:
            gemv.gemv(x, w, out, config=self.gemv_configs.get(kind), scale=s, up=up, up_scale=us,
                      prefetch=self.prefetch, preload=self.preload, trigger=self.trigger, pdl=self.pdl, **kw)

    def _layers_gemv(self, greedy: bool = False) -> None:
        rmsnorm_add = norms.rmsnorm_add_
        h, o, eps, off = self.h[0], self.o.view(-1), self.eps, self.offset
        for i, layer in enumerate(self.layers):
            w, s = _weight(layer, "qkv")
            self._gemv("qkv", h, w, self.qkv[0], s, norm_w=layer.ln1, eps=eps, norm_offset=off)
            self._attend(i, layer, combine=self.gemma)
            w, s = _weight(layer, "o")
            if self.gemma:
                self._gemv("o", o, w, self.tmp[0], s)
                rmsnorm_add(self.tmp, self.h, layer.post_attn, eps, off)
            else:
                self.attention.combine_oproj_(w, h, self.pdl, self.oproj_block_n, self.oproj_warps,
                                              self.oproj_heads, scale=s, o_like=self.o)
            (w, s), (u, us) = _weight(layer, "g"), _weight(layer, "u")
            self._gemv("gate_up", h, w, self.mlp[0], s, norm_w=layer.ln2, eps=eps, norm_offset=off, up=u, us=us,
                       act=self.act)
            w, s = _weight(layer, "d")
            if self.gemma:
                self._gemv("down", self.mlp[0], w, self.tmp[0], s)
                rmsnorm_add(self.tmp, self.h, layer.post_ff, eps, off)
            else:
                self._gemv("down", self.mlp[0], w, h, s, accumulate=True)
        w, s = self.head_int8 or (self.head, None)
        self._gemv("head", h, w, self.logits[0], s, norm_w=self.final_norm, eps=eps, norm_offset=off,
                   argmax=(self.amax, self.aidx) if greedy else None)

    def _layers_matmul(self) -> None:
        rmsnorm, rmsnorm_add, gated = self._k()
        mm = self._mm
        eps, off, b = self.eps, self.offset, self.shape[0]
        for i, layer in enumerate(self.layers):
            x = rmsnorm(self.h, layer.ln1, eps, off, out_dtype=self.dtype)
            if layer.int8:  # copy_ rounds the fp32 sums to the model's dtype itself
                self.qkv.copy_(self._mm_int8(x, *layer.int8["qkv"]))
            else:
                torch.matmul(x, layer.wqkv.t(), out=self.qkv)
            self._attend(i, layer)
            attn_out = mm(self.o.view(b, -1), layer, "o")
            if self.gemma:
                rmsnorm_add(attn_out, self.h, layer.post_attn, eps, off)
            else:
                self.h.add_(attn_out)
            x = rmsnorm(self.h, layer.ln2, eps, off, out_dtype=self.dtype)
            a = gated(mm(x, layer, "g"), mm(x, layer, "u"), self.act)
            ff = mm(a, layer, "d")
            if self.gemma:
                rmsnorm_add(ff, self.h, layer.post_ff, eps, off)
            else:
                self.h.add_(ff)
        x = rmsnorm(self.h, self.final_norm, eps, off, out_dtype=self.dtype)
        if self.head_int8:
            self._mm_int8(x, *self.head_int8, out=self.logits)
        else:
            self.logits.copy_(torch.nn.functional.linear(x, self.head))

    def _mm(self, x: torch.Tensor, layer: Layer, name: str) -> torch.Tensor:
        """x times a layer's weight `name` (transposed), in the model's dtype: a matrix product, or with int8
        weights `int8_mm` on the int8 rows (fp32 sums, rounded to the model's dtype as a dense product's are)."""
        w, s = _weight(layer, name)
        if s is None:
            return torch.nn.functional.linear(x, w)
        return self._mm_int8(x, w, s).to(self.dtype)

    def _mm_int8(self, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None):
        return (int8_mm.int8_mm if self.kernels == "triton" else int8_mm.int8_mm_torch)(x, q, s, out=out)


_DENSE = {"qkv": "wqkv", "o": "wo", "g": "wg", "u": "wu", "d": "wd"}


def _fuse_rows(linears) -> torch.Tensor:
    """The weights of `linears` stacked by rows into one tensor, which the modules' own weights then view: the HF
    model (prefill, the reference path) and the step share one copy, not two (on Llama-3.2-1B in bf16 the second
    copy was 201 MB, 7% of the decode's peak memory)."""
    with torch.no_grad():
        fused = torch.cat([lin.weight for lin in linears]).contiguous()
        row = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight.data = fused[row:row + n]
            row += n
    return fused


def _layer_int8(int8: dict, attn, mlp) -> dict:
    """A layer's int8 weights by the names `_weight` uses; q, k and v rows concatenated like `wqkv`, the entries of
    `int8` for q, k and v then viewing the concatenation (one copy, as `_fuse_rows`)."""
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    q = torch.cat([int8[m][0] for m in parts]).contiguous()
    s = torch.cat([int8[m][1] for m in parts]).contiguous()
    row = 0
    for m in parts:
        n = int8[m][0].shape[0]
        quantize.rebind_(int8, m, q[row:row + n], s[row:row + n])
        row += n
    return {"qkv": (q, s), "o": int8[attn.o_proj], "g": int8[mlp.gate_proj], "u": int8[mlp.up_proj],
            "d": int8[mlp.down_proj]}


def _weight(layer: Layer, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, row scales) the GEMV streams: the int8 rows and their scales, or the dense weight and None."""
    if layer.int8:
        return layer.int8[name]
    return getattr(layer, _DENSE[name]), None
