"""Export a Hugging Face causal LM to one ONNX decoder graph (the torch side; ONNX Runtime is not imported here).

The graph's contract, with the names Optimum and ONNX Runtime GenAI use:

    inputs   input_ids                  [batch, sequence]              int64
             attention_mask             [batch, past + sequence]       int64, 0 on (left) padding
             position_ids               [batch, sequence]              int64, mask cumsum - 1 (as generate() does)
             past_key_values.{i}.key    [batch, kv_heads, past_i, head_dim]    the cache dtype
             past_key_values.{i}.value  [batch, kv_heads, past_i, head_dim]
    outputs  logits                     [batch, 1, vocab]              float32, last position only (logits_to_keep=1)
             present.{i}.key / .value   [batch, kv_heads, present_i, head_dim]

past_i is the past length for full-attention layers; a sliding-window layer keeps min(past, window - 1) positions
and returns present_i = min(past_i + sequence, window - 1): exactly the cache file's layout, so a file's layers feed
the graph as they are. One graph does both jobs: prefill with empty pasts (past_i = 0), decode with sequence = 1.
Batch, sequence and past lengths are dynamic.

Recurrent models (Mamba) export the decode step only: inputs input_ids [batch, 1] and
past_key_values.{i}.conv_state / .recurrent_state, outputs logits and present.{i}.conv_state / .recurrent_state, no
mask or positions (generate() passes neither). Their prefill cannot be exported: the reference selective scan loops
over the prompt in Python, so torch.export fixes the prompt length.

How the graph computes what `backends/hf_torch.py` computes:
- The wrapper builds the 4-d boolean masks itself (padding & causal & window, per layer kind) and hands them to the
  model, which takes a prepared 4-d mask as it is. This keeps transformers' sliding-window bookkeeping (a Python
  int) out of the traced graph. Every query may also attend to itself, so a padding row is never fully masked: its
  output is finite garbage that no real position reads, instead of NaN that would spread through the cache.
- Attention runs as `F.scaled_dot_product_attention(enable_gqa=True)` (registered as the attention implementation
  "portable_onnx"); at opset 23 it becomes one ONNX `Attention` node per layer without repeating K/V heads.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass

import torch
from transformers import AttentionInterface, DynamicCache

from caches import AttentionLayer, RecurrentLayer, SlidingWindowLayer
from caches import hf as hf_caches
from portable import architectures
from portable.errors import PortableError

OPSET = 23  # the first with the Attention and RMSNormalization operators
GRAPH_VERSION = 3  # bump when the wrapper below computes something different: saved artifacts are keyed by it
ATTENTION = "portable_onnx"
METADATA_KEY = "portable.graph"

# Our layer tensors -> the graph's tensor suffixes.
TENSOR_NAMES = {"keys": "key", "values": "value", "conv_state": "conv_state", "recurrent_state": "recurrent_state"}


@dataclass(frozen=True)
class GraphSpec:
    """What a runner needs to know to drive an exported graph (saved with it, in the artifact and the ONNX file)."""

    kinds: tuple[str, ...]  # per layer: full_attention | sliding_attention | recurrent
    windows: tuple[int, ...]  # per layer: the sliding window (0 where none)
    prefill: bool  # the graph takes a whole prompt (False: Mamba's decode step only)
    cache_dtype: str  # "float32" | "float16": the past/present tensors' dtype
    vocab_size: int
    model_type: str

    def tensors(self, i: int) -> tuple[str, ...]:
        """Layer i's tensor names in our cache classes (keys, values | conv_state, recurrent_state)."""
        return RecurrentLayer.tensor_names if self.kinds[i] == RecurrentLayer.kind else AttentionLayer.tensor_names

    def past_names(self) -> list[str]:
        return [past_name(i, t) for i in range(len(self.kinds)) for t in self.tensors(i)]

    def present_names(self) -> list[str]:
        return [present_name(i, t) for i in range(len(self.kinds)) for t in self.tensors(i)]

    def input_names(self) -> list[str]:
        head = ["input_ids", "attention_mask", "position_ids"] if self.prefill else ["input_ids"]
        return head + self.past_names()

    def output_names(self) -> list[str]:
        return ["logits"] + self.present_names()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        return cls(kinds=tuple(d["kinds"]), windows=tuple(d["windows"]), prefill=bool(d["prefill"]),
                   cache_dtype=d["cache_dtype"], vocab_size=int(d["vocab_size"]), model_type=d["model_type"])


def past_name(i: int, tensor: str) -> str:
    return f"past_key_values.{i}.{TENSOR_NAMES[tensor]}"


def present_name(i: int, tensor: str) -> str:
    return f"present.{i}.{TENSOR_NAMES[tensor]}"


def _portable_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA with grouped-query heads passed as they are (ONNX `Attention` takes kv_heads < heads)."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("its attention uses logit soft-capping or attention sinks, which the exported "
                                  "attention does not compute")
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _portable_attention)


def layer_plan(config) -> list[tuple[str, int]]:
    """(kind, window) of every layer of a model with this config, as its Hugging Face cache lays them out."""
    template = DynamicCache(config=config)
    if not template.layers:
        return [(AttentionLayer.kind, 0)] * config.get_text_config(decoder=True).num_hidden_layers
    return [(hf_caches.from_kind(layer), int(getattr(layer, "sliding_window", 0) or 0)) for layer in template.layers]


def attention_masks(attention_mask: torch.Tensor, sequence: int, layers: list, plan: list[tuple[str, int]]):
    """4-d boolean masks [batch, 1, sequence, keys] per layer kind, for keys = cat(layer's past, new positions).

    Slots count every position fed (padding included), as transformers' cache positions do: the new tokens sit in
    slots past .. past + sequence - 1, a layer that keeps `kept` past positions holds slots past - kept onwards.
    """
    total = attention_mask.shape[1]
    past = total - sequence
    pad = attention_mask.bool()
    query = past + torch.arange(sequence, device=attention_mask.device)
    masks = {}
    for layer, (kind, window) in zip(layers, plan):
        if kind in masks:
            continue
        kept = layer.keys.shape[2]
        key = (past - kept) + torch.arange(kept + sequence, device=attention_mask.device)
        allowed = key[None, :] <= query[:, None]
        if kind == SlidingWindowLayer.kind:
            allowed = allowed & (query[:, None] - key[None, :] < window)
        allowed = allowed | (key[None, :] == query[:, None])  # see the module docstring: no fully masked row
        masks[kind] = pad.index_select(1, key)[:, None, None, :] & allowed[None, None]
    return masks


class DecoderGraph(torch.nn.Module):
    """One decoder forward over flat tensors: prefill (empty pasts) or decode steps (see the module docstring)."""

    def __init__(self, model, plan: list[tuple[str, int]]):
        super().__init__()
        self.model = model
        self.plan = plan

    def forward(self, input_ids, attention_mask, position_ids, past):
        sequence = input_ids.shape[1]
        seen = attention_mask.shape[1] - sequence
        layers = [SlidingWindowLayer(keys=k, values=v, window=window, cumulative_length=seen)
                  if kind == SlidingWindowLayer.kind else AttentionLayer(keys=k, values=v)
                  for (k, v), (kind, window) in zip(past, self.plan)]
        masks = attention_masks(attention_mask, sequence, layers, self.plan)
        cache = hf_caches.to_hf(layers, self.model.config)
        mask = masks if len(masks) > 1 else next(iter(masks.values()))
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=1, **{architectures.cache_keyword(self.model): cache})
        return (out.logits.float(), *[t for layer in cache.layers for t in (layer.keys, layer.values)])


class RecurrentStepGraph(torch.nn.Module):
    """One Mamba decode step over flat tensors."""

    def __init__(self, model, arch: architectures.Architecture):
        super().__init__()
        self.model = model
        self.cache_arg = arch.cache_arg

    def forward(self, input_ids, past):
        layers = [RecurrentLayer(conv_state=c, recurrent_state=r) for c, r in past]
        cache = hf_caches.to_hf(layers, self.model.config)
        out = self.model(input_ids=input_ids, use_cache=True, **{self.cache_arg: cache})
        return (out.logits[:, -1:].float(), *[t for layer in cache.layers
                                      for t in (layer.conv_states[0], layer.recurrent_states[0])])


# --- graph optimisations (on the exported onnx_ir model; exact: the same products in the same order) ----------------

def optimize(model) -> dict[str, int]:
    """The optimize stage: merge matrix products sharing an input, and move each layer's cache concatenation (and,
    where the layer has the plain Llama layout, its head reshapes) into the `Attention` node. Returns counts."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    counts = {"matmuls_merged": _pack_matmuls(model), "attention_fused": _fuse_attention_io(model)}
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)
    return counts


def _pack_matmuls(model) -> int:
    """MatMuls reading the same activation with constant weights (q/k/v, gate/up) -> one MatMul and a Split: one
    larger matrix product instead of several small ones. Returns how many MatMuls were merged away."""
    import numpy as np
    import onnx_ir as ir

    groups: dict[int, list] = {}
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None or weight.shape is None or len(weight.shape) != 2:
            continue
        groups.setdefault(id(node.inputs[0]), []).append(node)
    merged = 0
    for nodes in groups.values():
        weights = [n.inputs[1].const_value for n in nodes]
        if len(nodes) < 2 or len({(w.dtype, w.shape[0]) for w in weights}) != 1:
            continue
        packed = ir.Value(name=f"{nodes[0].inputs[1].name}.packed{len(nodes)}",
                          const_value=ir.tensor(np.concatenate([w.numpy() for w in weights], axis=1)))
        sizes = ir.Value(name=f"{packed.name}.sizes",
                         const_value=ir.tensor(np.array([w.shape[1] for w in weights], dtype=np.int64)))
        model.graph.register_initializer(packed)
        model.graph.register_initializer(sizes)
        matmul = ir.node("MatMul", [nodes[0].inputs[0], packed])
        split = ir.node("Split", [matmul.outputs[0], sizes], {"axis": -1}, num_outputs=len(nodes))
        for old, new in zip(nodes, split.outputs):
            new.name, new.shape, new.type = old.outputs[0].name, old.outputs[0].shape, old.outputs[0].type
        ir.convenience.replace_nodes_and_values(model.graph, nodes[0], nodes, [matmul, split],
                                                [n.outputs[0] for n in nodes], list(split.outputs))
        merged += len(nodes) - 1
    return merged


def _fuse_attention_io(model) -> int:
    """Attention(q, Concat(past_k, k), Concat(past_v, v), mask) -> Attention(q, k, v, mask, past_k, past_v), whose
    present_key / present_value outputs are the concatenations. Where q, k and v are `Transpose(Reshape(x))` head
    splits (through a RotaryEmbedding for q and k) and the output is merged back by `Reshape(Transpose(y))`, the
    node takes and returns the 3-d tensors instead (q_num_heads / kv_num_heads attributes). Returns the count."""
    import onnx_ir as ir

    fused = 0
    for attention in [n for n in model.graph if n.op_type == "Attention" and n.domain == "" and len(n.inputs) == 4]:
        q, k, v, mask = attention.inputs
        concats = [k.producer(), v.producer()]
        if any(c is None or c.op_type != "Concat" or len(c.inputs) != 2 or c.attributes["axis"].value not in (-2, 2)
               for c in concats):
            continue
        (past_k, new_k), (past_v, new_v) = concats[0].inputs, concats[1].inputs
        splits = [_head_split(x) for x in (q, new_k, new_v)]
        merge = _only_consumer(attention.outputs[0], "Transpose", (0, 2, 1, 3))
        merge = _only_consumer(merge.outputs[0], "Reshape") if merge is not None else None
        q_heads = q.shape[1] if q.shape is not None and len(q.shape) == 4 else None
        kv_heads = past_k.shape[1] if past_k.shape is not None and len(past_k.shape) == 4 else None
        attributes = {name: a.value for name, a in attention.attributes.items()}
        nodes, inputs = [], [q, new_k, new_v]
        three_d = (None not in splits and merge is not None and splits[2][1] is None
                   and isinstance(q_heads, int) and isinstance(kv_heads, int))
        if three_d:
            inputs = []
            for (x, rotary), heads in zip(splits, (q_heads, kv_heads, kv_heads)):
                if rotary is not None:
                    rotary = ir.node("RotaryEmbedding", [x, *rotary.inputs[1:]],
                                     {**{n: a.value for n, a in rotary.attributes.items()}, "num_heads": heads})
                    nodes.append(rotary)
                    x = rotary.outputs[0]
                inputs.append(x)
            attributes.update(q_num_heads=q_heads, kv_num_heads=kv_heads)
        node = ir.node("Attention", [*inputs, mask, past_k, past_v], attributes, num_outputs=3)
        nodes.append(node)
        old = [concats[0].outputs[0], concats[1].outputs[0], merge.outputs[0] if three_d else attention.outputs[0]]
        new = [node.outputs[1], node.outputs[2], node.outputs[0]]
        for before, after in zip(old, new):
            after.name, after.shape, after.type = before.name, before.shape, before.type
        model.graph.insert_before(attention, nodes)
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        fused += 1
    return fused


def _only_consumer(value, op_type: str, perm: tuple | None = None):
    uses = value.consumers()
    if len(uses) != 1 or uses[0].op_type != op_type:
        return None
    if perm is not None and tuple(uses[0].attributes["perm"].value) != perm:
        return None
    return uses[0]


def _head_split(x):
    """x = [RotaryEmbedding](Transpose[0,2,1,3](Reshape(x3))), each used once -> (x3, the rotary node or None)."""
    node, rotary = x.producer(), None
    if node is not None and node.op_type == "RotaryEmbedding" and len(node.inputs) == 3:
        rotary, node = node, node.inputs[0].producer()
        if len(rotary.inputs[0].consumers()) != 1:
            return None
    if node is None or node.op_type != "Transpose" or tuple(node.attributes["perm"].value) != (0, 2, 1, 3):
        return None
    reshape = node.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape" or len(node.inputs[0].consumers()) != 1:
        return None
    return reshape.inputs[0], rotary


def check_exportable(model) -> architectures.Architecture:
    arch = architectures.for_model(model)
    if arch.name in architectures.ARCHITECTURES and not arch.onnx_export:
        raise PortableError(f"{arch.name} models cannot be exported to ONNX (see portable/architectures.py); use "
                            f"another backend")
    return arch


def export(model, opset: int = OPSET):
    """Export `model` (eval mode, on the CPU, in the dtype the graph should compute in) to an in-memory ONNX model.

    Returns (onnx_ir.Model, GraphSpec). Fails with a one-line PortableError naming the architecture and the
    exporter's reason when torch.export cannot take the model.
    """
    arch = check_exportable(model)
    plan = layer_plan(model.config)
    dtype = next(model.parameters()).dtype
    text = model.config.get_text_config(decoder=True)
    recurrent = any(kind == RecurrentLayer.kind for kind, _ in plan)
    spec = GraphSpec(kinds=tuple(k for k, _ in plan), windows=tuple(w for _, w in plan), prefill=not recurrent,
                     cache_dtype=str(dtype).removeprefix("torch."), vocab_size=int(text.vocab_size),
                     model_type=model.config.model_type)
    if recurrent and not all(kind == RecurrentLayer.kind for kind, _ in plan):
        raise PortableError(f"{arch.name}: models mixing recurrent and attention layers are not exported to ONNX")
    previous = model.config._attn_implementation
    if not recurrent:
        model.set_attn_implementation(ATTENTION)
    try:
        graph, args, dynamic = (_recurrent_inputs(model, arch) if recurrent else _decoder_inputs(model, plan))
        program = _torch_export(graph, args, dynamic, spec, opset, arch.name)
    except NotImplementedError as e:  # raised by our attention for what it does not compute
        raise PortableError(f"cannot export {arch.name} to ONNX: {e}") from e
    finally:
        if not recurrent:
            model.set_attn_implementation(previous)
    program.model.metadata_props[METADATA_KEY] = json.dumps(spec.to_dict())
    return program.model, spec


def _example_cache(model, batch: int, past: int, **kwargs) -> list:
    """Real cache tensors for `past` positions (so every layer's shapes come from the model, not from its config)."""
    ids = torch.arange(3, 3 + batch * past, device=model.device).view(batch, past) % \
        model.config.get_text_config().vocab_size
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **kwargs)
    return hf_caches.from_hf(architectures.output_cache(out))


def _decoder_inputs(model, plan):
    # Example sizes >= 2 everywhere: torch.export specialises dimensions of size 0 and 1.
    batch, past, sequence = 2, 5, 3
    mask = torch.ones(batch, past + sequence, dtype=torch.long)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    layers = _example_cache(model, batch, past, attention_mask=mask[:, :past], position_ids=positions[:, :past],
                            **{architectures.cache_keyword(model): DynamicCache(config=model.config)})
    ids = torch.full((batch, sequence), 5, dtype=torch.long)
    pasts = [(layer.keys, layer.values) for layer in layers]
    dyn = torch.export.Dim.DYNAMIC  # named dimensions fail on these models; DYNAMIC lets export relate them
    dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
               "past": [({0: dyn, 2: dyn}, {0: dyn, 2: dyn}) for _ in pasts]}
    return DecoderGraph(model, plan), (ids, mask, positions[:, past:], pasts), dynamic


def _recurrent_inputs(model, arch):
    batch = 2
    layers = _example_cache(model, batch, 4, **{arch.cache_arg: DynamicCache(config=model.config)})
    pasts = [(layer.conv_state, layer.recurrent_state) for layer in layers]
    dyn = torch.export.Dim.DYNAMIC
    dynamic = {"input_ids": {0: dyn}, "past": [({0: dyn}, {0: dyn}) for _ in pasts]}
    return RecurrentStepGraph(model, arch), (torch.full((batch, 1), 5, dtype=torch.long), pasts), dynamic


def _torch_export(graph, args, dynamic, spec: GraphSpec, opset: int, name: str):
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset,
                                        input_names=spec.input_names(), output_names=spec.output_names(),
                                        verbose=False, optimize=True)
    except PortableError:
        raise
    except Exception as e:  # torch.export's errors are long reports: keep their summary line
        raise PortableError(f"cannot export {name} to ONNX: {_summary(e)}") from e
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return program


def _summary(error: Exception) -> str:
    text = str(error)
    for marker in ("## Exception summary", "Exception summary"):
        if marker in text:
            text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not line.startswith("<class")]
    detail = next((line for line in str(error).splitlines() if line.startswith("<class")), None)
    first = detail.split(">:", 1)[-1].strip() if detail else (lines[0] if lines else type(error).__name__)
    return first[:300]
