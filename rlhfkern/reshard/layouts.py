"""Model shape and weight layouts: where every element of every HF tensor lives on every rank.

A layout maps each rank's parameters to pieces of the HF tensors (DESIGN.md "Weight layouts").
A piece says: along `axis`, local[offset : offset + (stop - start)] == hf[name][start : stop],
the other axis whole. Parts of a local tensor that no piece covers are padding (vocabulary rows
past V) and hold zeros. Both frameworks split each HF tensor along the same axis (rows for
column-parallel, columns for row-parallel), so one axis per tensor is enough.
"""

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The shapes a layout needs, from a HF config (Llama/Mistral, Qwen2 with qkv bias, Qwen3
    with q/k norms). value_head: the body with a scalar head instead of the LM head (a value
    model: transformers' token classifier with one label, its `score` Linear(hidden, 1) with a
    bias; never tied)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    layers: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    value_head: bool = False

    @classmethod
    def from_hf_config(cls, config, value_head=False):
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        model_type = getattr(config, "model_type", "")
        return cls(hidden=config.hidden_size, heads=heads, kv_heads=kv, head_dim=head_dim,
                   ffn=config.intermediate_size, vocab=config.vocab_size, layers=config.num_hidden_layers,
                   tied=not value_head and bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=bool(getattr(config, "attention_bias", False)) or model_type == "qwen2",
                   qk_norm=model_type == "qwen3", value_head=value_head)

    def hf_shapes(self):
        """{HF name: shape} of the whole model."""
        H, hd, F = self.hidden, self.head_dim, self.ffn
        q, kv = self.heads * hd, self.kv_heads * hd
        shapes = {"model.embed_tokens.weight": (self.vocab, H), "model.norm.weight": (H,)}
        if self.value_head:
            shapes.update({"score.weight": (1, H), "score.bias": (1,)})
        elif not self.tied:
            shapes["lm_head.weight"] = (self.vocab, H)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                p + "mlp.down_proj.weight": (H, F),
            })
            if self.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if self.qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        return shapes


@dataclasses.dataclass(frozen=True)
class Piece:
    hf: str       # HF tensor name
    axis: int     # the axis both tensors are cut along
    start: int    # HF range [start, stop) along axis
    stop: int
    offset: int   # where it starts in the local tensor along axis


@dataclasses.dataclass
class Param:
    shape: tuple
    pieces: list  # of Piece; uncovered parts are zero padding


def _pad(n, multiple):
    return math.ceil(n / multiple) * multiple


class Layout:
    """Base: `params(rank) -> {name: Param}` for ranks 0..world-1; shard / unshard."""

    world = 1

    def params(self, rank):
        raise NotImplementedError

    def process_of(self, rank):
        return rank

    def shard(self, hf_state_dict):
        """{rank: {name: tensor}} from the HF tensors (padding zero-filled)."""
        out = {}
        like = next(iter(hf_state_dict.values()))
        for rank in range(self.world):
            out[rank] = {}
            for name, p in self.params(rank).items():
                t = torch.zeros(p.shape, dtype=like.dtype, device=like.device)
                for pc in p.pieces:
                    t.narrow(pc.axis, pc.offset, pc.stop - pc.start).copy_(
                        hf_state_dict[pc.hf].narrow(pc.axis, pc.start, pc.stop - pc.start))
                out[rank][name] = t
        return out

    def unshard(self, shards):
        """The HF state dict back from {rank: {name: tensor}} (any replica of each element)."""
        shapes = self.spec.hf_shapes()
        out = {}
        for rank in range(self.world):
            for name, p in self.params(rank).items():
                t = shards[rank][name]
                for pc in p.pieces:
                    if pc.hf not in out:
                        out[pc.hf] = torch.empty(shapes[pc.hf], dtype=t.dtype, device=t.device)
                    out[pc.hf].narrow(pc.axis, pc.start, pc.stop - pc.start).copy_(
                        t.narrow(pc.axis, pc.offset, pc.stop - pc.start))
        return out


def _rows(hf, start, stop, offset):
    return Piece(hf, 0, start, stop, offset)


def _whole(spec_shapes, hf):
    return Param(spec_shapes[hf], [Piece(hf, 0, 0, spec_shapes[hf][0], 0)])


class HFLayout(Layout):
    """The HF model in one rank."""

    def __init__(self, spec):
        self.spec = spec
        self.world = 1

    def params(self, rank):
        shapes = self.spec.hf_shapes()
        return {name: _whole(shapes, name) for name in shapes}


class ReplicatedLayout(Layout):
    """`dp` data-parallel replicas of a layout: rank r holds what rank r % layout.world holds."""

    def __init__(self, layout, dp):
        if dp < 1:
            raise ValueError(f"dp must be >= 1, got {dp}")
        self.inner, self.spec, self.dp = layout, layout.spec, dp
        self.world = layout.world * dp

    def params(self, rank):
        return self.inner.params(rank % self.inner.world)


def _vocab_param(hf, vocab, hidden, padded, parts, r):
    """Rows [r Vp/parts, (r+1) Vp/parts) of the padded vocabulary; rows >= vocab stay zero."""
    per = padded // parts
    lo, hi = r * per, min((r + 1) * per, vocab)
    return Param((per, hidden), [_rows(hf, lo, hi, 0)] if hi > lo else [])


class MegatronLayout(Layout):
    """megatron-core (local spec) names and fused layouts, tp x pp ranks, tp fastest.

    linear_qkv is one column-parallel linear over the grouped rows [q heads of g, k_g, v_g],
    g = 0..KV heads-1, cut into tp equal contiguous ranges. With tp a multiple of the KV heads a
    rank's range is part of one group, not always whole heads (megatron's attention all-gathers
    the group and keeps its own query heads); linear_proj holds query heads r nh/tp.. as ever.
    A value model (spec.value_head): the last stage's output_layer is the scalar head, weight
    [1, H] and bias [1], whole on every tp rank (its input, the final norm's output, is too)."""

    def __init__(self, spec, tp=1, pp=1, vocab_multiple=128):
        # what megatron-core 0.16.1 accepts: TransformerConfig's two checks, then the divisions
        # its column/row-parallel linears make (linear_qkv rows, fc1/fc2 by the ffn)
        if spec.heads % tp:
            raise ValueError(f"Megatron tp={tp} must divide the attention heads ({spec.heads})")
        if spec.kv_heads % tp and tp % spec.kv_heads:
            raise ValueError(f"Megatron tp={tp} must divide the KV heads ({spec.kv_heads}) or be a multiple of "
                             f"them (megatron-core's num_query_groups)")
        if (spec.heads + 2 * spec.kv_heads) * spec.head_dim % tp:
            raise ValueError(f"Megatron tp={tp} must divide the linear_qkv rows ((heads + 2 KV heads) x head_dim "
                             f"= {(spec.heads + 2 * spec.kv_heads) * spec.head_dim})")
        if spec.ffn % tp:
            raise ValueError(f"Megatron tp={tp} must divide the ffn ({spec.ffn})")
        if spec.layers % pp:
            raise ValueError(f"Megatron pp={pp} must divide the layers ({spec.layers})")
        self.spec, self.tp, self.pp = spec, tp, pp
        self.world = tp * pp
        self.padded_vocab = _pad(spec.vocab, vocab_multiple * tp)

    def params(self, rank):
        s, tp = self.spec, self.tp
        t, stage = rank % tp, rank // tp
        H, hd, F = s.hidden, s.head_dim, s.ffn
        nq = s.heads // s.kv_heads
        shapes = s.hf_shapes()
        out = {}
        if stage == 0:
            out["embedding.word_embeddings.weight"] = _vocab_param("model.embed_tokens.weight", s.vocab, H,
                                                                   self.padded_vocab, tp, t)
        per_stage = s.layers // self.pp
        qkv = (s.heads + 2 * s.kv_heads) * hd
        r0, r1 = t * qkv // tp, (t + 1) * qkv // tp  # this rank's rows of the grouped linear_qkv
        f0, f1 = t * F // tp, (t + 1) * F // tp
        for local in range(per_stage):
            i = stage * per_stage + local
            hf, mg = f"model.layers.{i}.", f"decoder.layers.{local}."
            out[mg + "input_layernorm.weight"] = _whole(shapes, hf + "input_layernorm.weight")
            out[mg + "pre_mlp_layernorm.weight"] = _whole(shapes, hf + "post_attention_layernorm.weight")
            for kind in (["weight", "bias"] if s.qkv_bias else ["weight"]):
                pieces, row = [], 0
                for g in range(s.kv_heads):  # per KV group: its nq query heads, its k head, its v head
                    for name, h0, n in ((f"q_proj.{kind}", g * nq, nq), (f"k_proj.{kind}", g, 1),
                                        (f"v_proj.{kind}", g, 1)):
                        a, b = max(row, r0), min(row + n * hd, r1)  # the part of the block on this rank
                        if a < b:
                            pieces.append(_rows(hf + "self_attn." + name, h0 * hd + a - row, h0 * hd + b - row, a - r0))
                        row += n * hd
                shape = (r1 - r0, H) if kind == "weight" else (r1 - r0,)
                out[mg + f"self_attention.linear_qkv.{kind}"] = Param(shape, pieces)
            if s.qk_norm:
                out[mg + "self_attention.q_layernorm.weight"] = _whole(shapes, hf + "self_attn.q_norm.weight")
                out[mg + "self_attention.k_layernorm.weight"] = _whole(shapes, hf + "self_attn.k_norm.weight")
            q0, q1 = t * s.heads // tp * hd, (t + 1) * s.heads // tp * hd
            out[mg + "self_attention.linear_proj.weight"] = Param((H, q1 - q0), [Piece(hf + "self_attn.o_proj.weight", 1, q0, q1, 0)])
            out[mg + "mlp.linear_fc1.weight"] = Param((2 * (f1 - f0), H), [_rows(hf + "mlp.gate_proj.weight", f0, f1, 0),
                                                                           _rows(hf + "mlp.up_proj.weight", f0, f1, f1 - f0)])
            out[mg + "mlp.linear_fc2.weight"] = Param((H, f1 - f0), [Piece(hf + "mlp.down_proj.weight", 1, f0, f1, 0)])
        if stage == self.pp - 1:
            out["decoder.final_layernorm.weight"] = _whole(shapes, "model.norm.weight")
            if s.value_head:
                out["output_layer.weight"] = _whole(shapes, "score.weight")
                out["output_layer.bias"] = _whole(shapes, "score.bias")
            elif not s.tied or self.pp > 1:  # tied with pp > 1: the last stage keeps its own copy
                head = "model.embed_tokens.weight" if s.tied else "lm_head.weight"
                out["output_layer.weight"] = _vocab_param(head, s.vocab, H, self.padded_vocab, tp, t)
        return out


class VLLMLayout(Layout):
    """vLLM names and layouts over tp ranks; with tp > KV heads each KV head is replicated on
    tp / KV-heads ranks."""

    def __init__(self, spec, tp=1, vocab_multiple=64):
        if spec.heads % tp or spec.ffn % tp or (spec.kv_heads % tp and tp % spec.kv_heads):
            raise ValueError(f"vLLM tp={tp} must divide heads and ffn, and divide or be a multiple of KV heads")
        self.spec, self.tp = spec, tp
        self.world = tp
        self.padded_vocab = _pad(_pad(spec.vocab, vocab_multiple), tp)

    def params(self, rank):
        s, tp, t = self.spec, self.tp, rank
        H, hd, F = s.hidden, s.head_dim, s.ffn
        shapes = s.hf_shapes()
        out = {"model.embed_tokens.weight": _vocab_param("model.embed_tokens.weight", s.vocab, H, self.padded_vocab,
                                                         tp, t),
               "model.norm.weight": _whole(shapes, "model.norm.weight")}
        if not s.tied:
            out["lm_head.weight"] = _vocab_param("lm_head.weight", s.vocab, H, self.padded_vocab, tp, t)
        q0, q1 = t * s.heads // tp, (t + 1) * s.heads // tp
        if tp <= s.kv_heads:
            k0, k1 = t * s.kv_heads // tp, (t + 1) * s.kv_heads // tp
        else:  # replicated: rank t holds KV head t // (tp / kv_heads)
            k0 = t // (tp // s.kv_heads)
            k1 = k0 + 1
        f0, f1 = t * F // tp, (t + 1) * F // tp
        for i in range(s.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = _whole(shapes, p + "input_layernorm.weight")
            out[p + "post_attention_layernorm.weight"] = _whole(shapes, p + "post_attention_layernorm.weight")
            for kind in (["weight", "bias"] if s.qkv_bias else ["weight"]):
                qn, kn = (q1 - q0) * hd, (k1 - k0) * hd
                pieces = [_rows(p + f"self_attn.q_proj.{kind}", q0 * hd, q1 * hd, 0),
                          _rows(p + f"self_attn.k_proj.{kind}", k0 * hd, k1 * hd, qn),
                          _rows(p + f"self_attn.v_proj.{kind}", k0 * hd, k1 * hd, qn + kn)]
                rows = qn + 2 * kn
                out[p + f"self_attn.qkv_proj.{kind}"] = Param((rows, H) if kind == "weight" else (rows,), pieces)
            if s.qk_norm:
                out[p + "self_attn.q_norm.weight"] = _whole(shapes, p + "self_attn.q_norm.weight")
                out[p + "self_attn.k_norm.weight"] = _whole(shapes, p + "self_attn.k_norm.weight")
            out[p + "self_attn.o_proj.weight"] = Param((H, (q1 - q0) * hd),
                                                       [Piece(p + "self_attn.o_proj.weight", 1, q0 * hd, q1 * hd, 0)])
            out[p + "mlp.gate_up_proj.weight"] = Param((2 * (f1 - f0), H), [_rows(p + "mlp.gate_proj.weight", f0, f1, 0),
                                                                            _rows(p + "mlp.up_proj.weight", f0, f1, f1 - f0)])
            out[p + "mlp.down_proj.weight"] = Param((H, f1 - f0), [Piece(p + "mlp.down_proj.weight", 1, f0, f1, 0)])
        return out
