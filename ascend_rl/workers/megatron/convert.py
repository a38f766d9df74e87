"""Hugging Face state dict ↔ Megatron-core state dict (the local layer spec's names), whole or split over
tensor- and expert-parallel ranks. Pure tensor functions, exact both ways: no megatron import.

Megatron's layout, as `GPTModel` with `get_gpt_layer_local_spec` names and shapes its parameters:
- `linear_qkv` fuses q, k, v per key/value group: for each group its heads' q rows, then its k rows, then its v
  rows ([groups · (heads_per_group + 2) · head_dim, hidden]), so a TP rank's slice is whole groups.
- `linear_fc1` is [gate; up] (SwiGLU); a TP rank holds [its gate slice; its up slice].
- Column-parallel (qkv, fc1) split on dim 0, row-parallel (proj, fc2) on dim 1; norms and the router are copied.
- The embedding and the untied output layer are vocab-parallel: their rows padded with zeros to a multiple of
  TP × `make_vocab_size_divisible_by` (Megatron-LM's rule), then split on dim 0.
- MoE experts (SequentialMLP: `mlp.experts.local_experts.E.linear_fc{1,2}`): expert-parallel rank r of EP
  holds experts r·E/EP .. (r+1)·E/EP - 1, named by their local index 0..E/EP-1, each split like the dense MLP
  over the expert-tensor-parallel (ETP) ranks. `hf_to_mcore` / `split_tp` / `merge_tp` take Megatron's
  default EP 1, ETP = TP; `Place`, `rank_shard` and `merge_ranks` any EP and ETP.

HF names are those of the models transformers 5 builds (Qwen3-MoE experts fused into `gate_up_proj` [E, 2F, H]
and `down_proj` [E, H, F]). A tied `lm_head.weight` is left out, as `save_pretrained` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from ascend_rl.workers.megatron.arch import Architecture

Tensor = torch.Tensor
VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """The embedding rows Megatron allocates: the vocabulary rounded up to a multiple of TP × divisible_by."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def hf_to_mcore(hf: dict[str, Tensor], arch: Architecture, tp: int = 1, divisible_by: int = 128) -> list[dict]:
    """Each TP rank's Megatron state dict (parameters only; `_extra_state` entries are the model's business)."""
    return split_tp(hf_to_mcore_full(hf, arch, padded_vocab_size(arch.vocab_size, tp, divisible_by)), arch, tp)


def mcore_to_hf(shards: list[dict[str, Tensor]], arch: Architecture) -> dict[str, Tensor]:
    """The HF state dict from every TP rank's Megatron state dict, in rank order."""
    return mcore_full_to_hf(merge_tp(shards, arch), arch)


def hf_to_mcore_rank(hf: dict[str, Tensor], arch: Architecture, place: Place, divisible_by: int = 128) -> dict:
    """The Megatron state dict of the rank at `place` (its TP slice, its experts' ETP slices)."""
    return rank_shard(hf_to_mcore_full(hf, arch, padded_vocab_size(arch.vocab_size, place.tp, divisible_by)),
                      arch, place)


# --- whole model (TP 1) -----------------------------------------------------------------------------------


def hf_to_mcore_full(hf: dict[str, Tensor], arch: Architecture, padded_vocab: int | None = None) -> dict[str, Tensor]:
    """The TP-1 Megatron state dict; the vocabulary padded to `padded_vocab` rows (default: not padded)."""
    src = dict(hf)
    take = src.pop
    rows = padded_vocab or arch.vocab_size
    out = {"embedding.word_embeddings.weight": _pad_rows(take("model.embed_tokens.weight"), rows),
           "decoder.final_layernorm.weight": take("model.norm.weight")}
    if arch.tie_word_embeddings:
        src.pop("lm_head.weight", None)  # the same tensor as the embedding
    else:
        out["output_layer.weight"] = _pad_rows(take("lm_head.weight"), rows)
    for i in range(arch.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out.update({m + mc: take(h + hf) for hf, mc in _one_to_one(arch)})
        a = h + "self_attn."
        names = ("weight", "bias") if arch.qkv_bias else ("weight",)
        for kind in names:
            q, k, v = (take(f"{a}{p}_proj.{kind}") for p in "qkv")
            out[f"{m}self_attention.linear_qkv.{kind}"] = fuse_qkv(q, k, v, arch)
        if arch.moe:
            gate_up, down = take(h + "mlp.experts.gate_up_proj"), take(h + "mlp.experts.down_proj")
            for e in range(arch.num_experts):
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e].clone()
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e].clone()
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"),
                                                          take(h + "mlp.up_proj.weight")])
    if src:
        raise KeyError(f"HF weights the {arch.model_type} converter does not know: {sorted(src)[:8]}")
    return out


def mcore_full_to_hf(mc: dict[str, Tensor], arch: Architecture) -> dict[str, Tensor]:
    """The HF state dict from the TP-1 Megatron one (padding rows dropped)."""
    src = {k: v for k, v in mc.items() if not k.endswith("._extra_state")}
    out = mcore_outer_to_hf(src, arch)
    for i in range(arch.num_layers):
        out.update(mcore_layer_to_hf(src, arch, i))
    if src:
        raise KeyError(f"Megatron weights the {arch.model_type} converter does not know: {sorted(src)[:8]}")
    return out


def mcore_outer_to_hf(src: dict[str, Tensor], arch: Architecture) -> dict[str, Tensor]:
    """The HF tensors outside the decoder layers (embedding, final norm, untied output layer), taken out of the
    TP-1 Megatron `src`."""
    take = src.pop
    vocab = arch.vocab_size
    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")[:vocab],
           "model.norm.weight": take("decoder.final_layernorm.weight")}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = take("output_layer.weight")[:vocab]
    return out


def mcore_layer_to_hf(src: dict[str, Tensor], arch: Architecture, i: int) -> dict[str, Tensor]:
    """Decoder layer `i`'s HF tensors, taken out of the TP-1 Megatron `src` (global expert indices)."""
    take = src.pop
    h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {h + hf: take(m + mc) for hf, mc in _one_to_one(arch)}
    a = h + "self_attn."
    for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
        q, k, v = split_qkv(take(f"{m}self_attention.linear_qkv.{kind}"), arch)
        out.update({f"{a}q_proj.{kind}": q, f"{a}k_proj.{kind}": k, f"{a}v_proj.{kind}": v})
    if arch.moe:
        experts = range(arch.num_experts)
        out[h + "mlp.experts.gate_up_proj"] = torch.stack(
            [take(f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight") for e in experts])
        out[h + "mlp.experts.down_proj"] = torch.stack(
            [take(f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight") for e in experts])
    else:
        gate, up = take(m + "mlp.linear_fc1.weight").chunk(2)
        out.update({h + "mlp.gate_proj.weight": gate.clone(), h + "mlp.up_proj.weight": up.clone()})
    return out


def _one_to_one(arch: Architecture) -> list[tuple[str, str]]:
    """(HF, Megatron) names within a layer that rename one tensor, the same in both directions; QKV, the MLP's
    [gate; up] and the experts are reshaped, above."""
    pairs = [("input_layernorm.weight", "input_layernorm.weight"),
             ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
             ("self_attn.o_proj.weight", "self_attention.linear_proj.weight")]
    if arch.qk_norm:
        pairs += [("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
                  ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight")]
    pairs.append(("mlp.gate.weight", "mlp.router.weight") if arch.moe
                 else ("mlp.down_proj.weight", "mlp.linear_fc2.weight"))
    return pairs


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, arch: Architecture) -> Tensor:
    """q [heads·d, ...], k and v [groups·d, ...] → Megatron's per-group [q_g; k_g; v_g] rows."""
    g, d = arch.num_query_groups, arch.head_dim
    tail = q.shape[1:]
    parts = (q.reshape(g, arch.heads_per_group * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail))
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(qkv: Tensor, arch: Architecture) -> tuple[Tensor, Tensor, Tensor]:
    g, d = arch.num_query_groups, arch.head_dim
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(g, -1, *tail).split([arch.heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


# --- tensor parallelism -----------------------------------------------------------------------------------


def split_kind(name: str) -> str:
    """How a parameter is laid out over TP (or, for an expert, ETP) ranks: vocab, column, gated (fc1), row, or
    copied."""
    if name in VOCAB_PARALLEL:
        return "vocab"
    if ".linear_qkv." in name:
        return "column"
    if name.endswith("linear_fc1.weight"):
        return "gated"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    return "copied"  # norms, q/k norms, router


def split_tensor(name: str, t: Tensor, n: int) -> list[Tensor]:
    """`t`'s slices for n TP (ETP) ranks, in rank order."""
    kind = split_kind(name)
    if kind == "vocab" and t.shape[0] % n:
        raise ValueError(f"{name} has {t.shape[0]} rows, not a multiple of TP {n}: pad the vocabulary for it")
    if kind in ("vocab", "column"):
        return list(t.chunk(n, dim=0))
    if kind == "row":
        return list(t.chunk(n, dim=1))
    if kind == "gated":
        gates, ups = (half.chunk(n, dim=0) for half in t.chunk(2, dim=0))
        return [torch.cat([g, u]) for g, u in zip(gates, ups)]
    return [t] * n


def merge_tensors(name: str, pieces: list[Tensor]) -> Tensor:
    """The whole tensor from its TP (ETP) slices in rank order; copies must be equal."""
    kind = split_kind(name)
    if kind in ("vocab", "column"):
        return torch.cat(pieces, dim=0)
    if kind == "row":
        return torch.cat(pieces, dim=1)
    if kind == "gated":
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if any(not torch.equal(p, pieces[0]) for p in pieces[1:]):
        raise ValueError(f"{name} differs between TP ranks; it should be a copy")
    return pieces[0]


def split_tp(full: dict[str, Tensor], arch: Architecture, tp: int) -> list[dict[str, Tensor]]:
    """Each TP rank's slice of the TP-1 Megatron state dict (the vocabulary already padded for `tp`)."""
    check_layout(arch, tp)
    shards: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    for name, t in full.items():
        for shard, piece in zip(shards, split_tensor(name, t, tp)):
            shard[name] = piece.clone()
    return shards


def merge_tp(shards: list[dict[str, Tensor]], arch: Architecture) -> dict[str, Tensor]:
    """The TP-1 Megatron state dict from every rank's (the vocabulary keeps its padding)."""
    return {name: merge_tensors(name, [s[name] for s in shards]) for name in shards[0]
            if not name.endswith("._extra_state")}


def check_layout(arch: Architecture, tp: int, ep: int = 1, etp: int | None = None, pp: int = 1) -> None:
    """Megatron splits whole heads, whole key/value groups and equal MLP slices over TP ranks, whole experts
    over EP ranks and equal expert slices over ETP ranks (default: TP); here an equal number of layers goes to
    each pipeline stage (Megatron's uneven splits are not built)."""
    etp = tp if etp is None else etp
    sizes = [("num_attention_heads", arch.num_attention_heads, "TP", tp),
             ("num_key_value_heads", arch.num_query_groups, "TP", tp),
             ("num_hidden_layers", arch.num_layers, "PP", pp)]
    if arch.moe:
        sizes += [("num_experts", arch.num_experts, "EP", ep), ("moe_intermediate_size", arch.moe_ffn_hidden_size,
                                                                "ETP", etp)]
    else:
        sizes.append(("intermediate_size", arch.ffn_hidden_size, "TP", tp))
    problems = [f"{what} ({n}) is not a multiple of {how} {size}" for what, n, how, size in sizes if n % size]
    if problems:
        raise ValueError("; ".join(problems))
    if ep > 1 and not arch.moe:
        raise ValueError(f"expert parallelism (EP {ep}) needs an MoE model, not {arch.model_type}")


# --- expert parallelism -----------------------------------------------------------------------------------

_EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class Place:
    """A rank's coordinates in Megatron's layout: its slice of the dense weights (TP rank of `tp`), its experts
    (EP rank of `ep`) and their slice (ETP rank of `etp`), its layers (pipeline stage `pp_rank` of `pp`)."""

    tp: int = 1
    tp_rank: int = 0
    ep: int = 1
    ep_rank: int = 0
    etp: int = 1
    etp_rank: int = 0
    pp: int = 1
    pp_rank: int = 0


def expert_index(name: str) -> tuple[str, int, str] | None:
    """(prefix, expert index, suffix) of an expert's parameter name; None for any other parameter."""
    match = _EXPERT.match(name)
    return (match[1], int(match[2]), match[3]) if match else None


def rank_shard(full: dict[str, Tensor], arch: Architecture, place: Place) -> dict[str, Tensor]:
    """The rank at `place`'s slice of the TP-1 Megatron state dict (vocabulary padded for its TP): dense weights
    split over TP, its EP rank's experts renamed to local indices and split over ETP."""
    check_layout(arch, place.tp, place.ep, place.etp)
    per_rank = arch.num_experts // place.ep
    first = place.ep_rank * per_rank
    out = {}
    for name, t in full.items():
        expert = expert_index(name)
        if expert is None:
            out[name] = split_tensor(name, t, place.tp)[place.tp_rank].clone()
        elif first <= expert[1] < first + per_rank:
            prefix, e, suffix = expert
            out[f"{prefix}{e - first}{suffix}"] = split_tensor(name, t, place.etp)[place.etp_rank].clone()
    return out


def merge_ranks(shards: list[dict[str, Tensor]], places: list[Place], arch: Architecture) -> dict[str, Tensor]:
    """The TP-1 Megatron state dict (global expert indices) from the shards of ranks at `places`, which must
    cover every TP rank and every (EP, ETP) rank; of ranks at the same coordinates, the first counts."""
    tp, ep, etp = places[0].tp, places[0].ep, places[0].etp
    by_tp: dict[int, dict] = {}
    by_expert: dict[tuple[int, int], dict] = {}
    for place, shard in zip(places, shards):
        by_tp.setdefault(place.tp_rank, shard)
        by_expert.setdefault((place.ep_rank, place.etp_rank), shard)
    if len(by_tp) != tp or len(by_expert) != ep * etp:
        raise ValueError(f"the shards cover TP ranks {sorted(by_tp)} and (EP, ETP) ranks {sorted(by_expert)}")
    dense = [{k: v for k, v in by_tp[r].items() if expert_index(k) is None} for r in range(tp)]
    out = merge_tp(dense, arch)
    per_rank = arch.num_experts // ep
    for r in range(ep):
        local = merge_tp([{k: v for k, v in by_expert[r, e].items() if expert_index(k)} for e in range(etp)], arch)
        for name, t in local.items():
            prefix, e, suffix = expert_index(name)
            out[f"{prefix}{r * per_rank + e}{suffix}"] = t
    return out


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if rows < t.shape[0]:
        raise ValueError(f"cannot pad {t.shape[0]} vocabulary rows down to {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


# --- pipeline parallelism ---------------------------------------------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def stage_layers(arch: Architecture, pp: int, pp_rank: int) -> range:
    """The global indices of the decoder layers on pipeline stage `pp_rank` (an even split)."""
    per_stage = arch.num_layers // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def stage_shard(shard: dict[str, Tensor], arch: Architecture, place: Place) -> dict[str, Tensor]:
    """A rank's state dict cut to its pipeline stage: its layers, renumbered from 0 as Megatron's stage numbers
    them; the embedding on the first stage; the final norm and output layer on the last, which holds an output
    layer even when tied, if it is not also the first (Megatron keeps the two copies equal by summing their
    gradients)."""
    layers = stage_layers(arch, place.pp, place.pp_rank)
    first, last = place.pp_rank == 0, place.pp_rank == place.pp - 1
    out = {}
    for name, tensor in shard.items():
        if (match := _LAYER.match(name)) is not None:
            if int(match[1]) in layers:
                out[f"decoder.layers.{int(match[1]) - layers.start}.{match[2]}"] = tensor
        elif name.startswith("embedding."):
            if first:
                out[name] = tensor
            if last and not first and arch.tie_word_embeddings:
                out["output_layer.weight"] = tensor
        elif last:
            out[name] = tensor
    return out


def global_layer_names(local: dict[str, Tensor], offset: int) -> dict[str, Tensor]:
    """A stage's decoder-layer names numbered as in the whole model."""
    return {(f"decoder.layers.{int(m[1]) + offset}.{m[2]}" if (m := _LAYER.match(name)) else name): t
            for name, t in local.items()}


# --- a critic (value model) -------------------------------------------------------------------------------


def value_model_shard(hf: dict[str, Tensor], arch: Architecture, place: Place, divisible_by: int = 128) -> dict:
    """A critic's Megatron state dict for the rank at `place` (HF's token-classification model with one label):
    the body as a causal LM's without an output layer, and `score` as the value head (`output_layer`, whole on
    every TP rank of the last stage)."""
    hf = dict(hf)
    head = {"output_layer.weight": hf.pop("score.weight"),
            "output_layer.bias": hf.pop("score.bias", None)}
    no_output = replace(arch, tie_word_embeddings=True)  # the body has no vocabulary projection to convert
    shard = stage_shard(hf_to_mcore_rank(hf, no_output, place, divisible_by),
                        replace(arch, tie_word_embeddings=False), place)  # nor an output layer to tie
    if place.pp_rank == place.pp - 1:
        if head["output_layer.bias"] is None:  # a score layer without a bias: the head's stays zero
            head["output_layer.bias"] = head["output_layer.weight"].new_zeros(1)
        shard.update(head)
    return shard
