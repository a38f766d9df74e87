"""An inference-only forward for Qwen2/Qwen3/Llama-family models over a preallocated KV cache.

transformers' forward is written for every model and every feature; for decoding it rebuilds 4-D masks
and grows the cache with a copy at every token, which dominates the time of small and medium models
on a CPU. This one reads the same parameters (no copy: weight updates to the model are seen), keeps
one K/V tensor per layer written in place, and lets rows join (prefilled apart, then merged) and leave.
On a CPU a decode step runs through fused kernels (`cpu_kernels`) where they are built: a small model's step
is otherwise ~140 eager ops whose dispatch costs more than their arithmetic.

`LeanDecoder.for_model` checks itself against the model's own forward on a small input and returns None
(the engine then uses the transformers forward) when the architecture or a setting is not covered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ascend_rl.data.collate import position_ids_from_mask
from ascend_rl.rollout import cpu_kernels

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
SELF_CHECK_TOLERANCE = 1e-4  # fp32; in 16 bits, SELF_CHECK_ULPS rounding steps at the logits' scale
SELF_CHECK_ULPS = 4  # bf16: both forwards round differently by ~1 step (0.004 at |logit| ~ 2); a wrong one is O(1) off


class LeanDecoder:
    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.has_qk_norm = hasattr(model.model.layers[0].self_attn, "q_norm")
        self.cache_dtype = attention_dtype(model)
        parameter = next(model.parameters())
        self.fused = self.cache_dtype == parameter.dtype and cpu_kernels.usable(parameter)
        self.split_rows = self.fused and cpu_kernels.splits_rows(model.parameters())
        self.layer_weights: list[torch.Tensor | None] = []  # every layer's, flat (`layer_weights`)
        self.cache: KVRows | None = None  # the running rows, `room` free columns after `length`
        self.length = 0  # filled cache columns: every row's last token is in column length - 1

    @classmethod
    def for_model(cls, model) -> LeanDecoder | None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES or getattr(cfg, "use_sliding_window", False):
            return None
        if getattr(model.model.rotary_emb, "rope_type", "default") != "default":
            return None
        decoder = cls(model)
        return decoder if decoder.matches_model() else None

    # --- the forward ------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, KVRows]:
        """Run left-padded prompts [B, P] apart from the running rows; returns the last position's logits
        [B, V] and their cache, to be joined to the running rows by `merge`."""
        hidden, rows = self.prefill_hidden(input_ids, attention_mask)
        return self.logits(hidden[:, -1]), rows

    @torch.no_grad()
    def prefill_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, KVRows]:
        """As `prefill`, but the final hidden states of every position [B, P, H]: `logits` of any of them
        scores the prompt (SGLang's input log-probs) without a second forward."""
        batch, width = input_ids.shape
        dtype, device = self.cache_dtype, input_ids.device
        shape = (batch, self.n_kv_heads, width, self.head_dim)
        key_shape = (batch, self.n_kv_heads, self.head_dim, width)
        layers = len(self.model.model.layers)
        positions = position_ids_from_mask(attention_mask)
        rows = KVRows([torch.empty(key_shape, dtype=dtype, device=device) for _ in range(layers)],
                      [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)],
                      attention_mask.bool(), positions[:, -1] + 1)
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        mask = causal[None, None] & rows.key_mask[:, None, None, :]
        # Rows that are all padding before their first token attend to nothing; let them see themselves.
        mask |= torch.eye(width, dtype=torch.bool, device=device)[None, None]
        return self._forward(input_ids, positions, mask, rows, start=0), rows

    @torch.no_grad()
    def merge(self, keep: torch.Tensor, new: KVRows | None, room: int) -> None:
        """The running cache becomes the running rows `keep` followed by `new`, right-aligned so that every
        row's last token is in the same column, with `room` free columns for the tokens still to come.
        Columns no kept row uses are dropped, so a long-running server's cache does not creep right."""
        parts = []
        if self.cache is not None and len(keep):
            used = self.cache.key_mask[keep, :self.length].any(0)
            first = int(used.float().argmax()) if used.any() else self.length
            parts.append(self.cache.take(keep, first, self.length))
        if new is not None:
            parts.append(new)
        if not parts:
            self.cache, self.length = None, 0
            return
        width = max(p.width for p in parts)
        sample = parts[0].k[0]
        batch = sum(len(p.positions) for p in parts)
        shape = (batch, self.n_kv_heads, width + room, self.head_dim)
        key_shape = (batch, self.n_kv_heads, self.head_dim, width + room)
        # Zeros, not empty: padding columns are masked, but 0 × NaN from stale memory would still be NaN.
        merged = KVRows([sample.new_zeros(key_shape) for _ in parts[0].k],
                        [sample.new_zeros(shape) for _ in parts[0].v],
                        torch.zeros((batch, width + room), dtype=torch.bool, device=sample.device),
                        torch.cat([p.positions for p in parts]))
        row = 0
        for part in parts:
            rows, columns = slice(row, row + len(part.positions)), slice(width - part.width, width)
            for layer in range(len(merged.k)):
                merged.k[layer][rows, :, :, columns] = part.k[layer]
                merged.v[layer][rows, :, columns] = part.v[layer]
            merged.key_mask[rows, columns] = part.key_mask
            row += len(part.positions)
        self.cache, self.length = merged, width
        if self.fused:  # looked up once per batch change, not per step (a weight push copies in place)
            self.layer_weights = [w for layer in self.model.model.layers for w in layer_weights(layer)]

    @torch.no_grad()
    def decode(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row [B]; returns the next logits [B, V]."""
        cache, column = self.cache, self.length
        if column == cache.width:
            raise RuntimeError("KV cache full: merge with enough room for the longest row")
        cache.key_mask.select(1, column).fill_(True)
        self.length += 1
        if self.fused:
            logits = self._decode_fused(next_ids, cache, column)
        else:
            mask = cache.key_mask[:, None, None, :self.length]
            logits = self.logits(self._forward(next_ids[:, None], cache.positions[:, None], mask, cache,
                                               start=column)[:, -1])
        cache.positions.add_(1)  # the cache's own tensor (merge and prefill make new ones)
        return logits

    def _decode_fused(self, ids: torch.Tensor, cache: KVRows, column: int) -> torch.Tensor:
        """One token per row [B] through the CPU kernels, the whole step in one call; the next logits [B, V]."""
        base, head = self.model.model, self.model.lm_head
        rotary = base.rotary_emb
        return cpu_kernels.decode_step(ids, base.embed_tokens.weight, self.layer_weights, cache.k, cache.v,
                                       cache.positions, rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0),
                                       cache.key_mask, column, base.norm.weight, head.weight, head.bias, self.eps,
                                       self.split_rows)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: KVRows,
                 start: int) -> torch.Tensor:
        base = self.model.model
        x = base.embed_tokens(ids)
        cos, sin = self._rotary(positions, x.dtype)
        end = start + ids.shape[1]
        for index, layer in enumerate(base.layers):
            attn = layer.self_attn
            h = self._rms(x, layer.input_layernorm.weight)
            q = attn.q_proj(h).unflatten(-1, (self.n_heads, self.head_dim))
            k = attn.k_proj(h).unflatten(-1, (self.n_kv_heads, self.head_dim))
            v = attn.v_proj(h).unflatten(-1, (self.n_kv_heads, self.head_dim))
            if self.has_qk_norm:
                q, k = self._rms(q, attn.q_norm.weight), self._rms(k, attn.k_norm.weight)
            q = _rotate(q.transpose(1, 2), cos, sin)
            k = _rotate(k.transpose(1, 2), cos, sin)
            cache.k[index][..., start:end] = k.transpose(-1, -2)
            cache.v[index][:, :, start:end] = v.transpose(1, 2)
            out = self._attention(q.to(self.cache_dtype), cache.k[index][..., :end], cache.v[index][:, :, :end], mask)
            x = x + attn.o_proj(out.transpose(1, 2).flatten(-2).to(x.dtype))
            h = self._rms(x, layer.post_attention_layernorm.weight)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self._rms(x, base.norm.weight)

    def _attention(self, q, keys, v, mask):
        """q [B, H, T, D] over keys [B, KVH, D, L] (transposed), v [B, KVH, L, D]; mask [B, 1, T, L] (True = attend)."""
        if q.shape[2] > 1:
            return F.scaled_dot_product_attention(q, keys.transpose(-1, -2), v, attn_mask=mask,
                                                  enable_gqa=self.n_kv_heads != self.n_heads)
        # One new token: grouped heads as a batched matmul, which beats SDPA's masked path on a CPU.
        batch, heads, _, dim = q.shape
        grouped = q.view(batch, self.n_kv_heads, heads // self.n_kv_heads, dim)
        scores = (grouped @ keys) * dim ** -0.5  # [B, KVH, G, L]
        scores = scores.masked_fill(~mask.view(batch, 1, 1, -1), float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # [B, KVH, G, D]
        return out.view(batch, heads, 1, dim)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * weight

    def _rotary(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = self.model.model.rotary_emb
        freqs = positions[..., None].float() * rotary.inv_freq.float()
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D]
        scale = getattr(rotary, "attention_scaling", 1.0)
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)

    # --- self-check -------------------------------------------------------------------------------------

    @torch.no_grad()
    def matches_model(self) -> bool:
        """Logits of a padded prompt batch and of two decode steps equal the model's own forward."""
        generator = torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        device = next(self.model.parameters()).device
        ids = torch.randint(0, vocab, (2, 6), generator=generator).to(device)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        steps = torch.randint(0, vocab, (2, 2), generator=generator).to(device)
        logits, rows = self.prefill(ids, mask)
        self.merge(torch.arange(0), rows, room=2)
        lean = [logits] + [self.decode(steps[:, i]) for i in range(2)]
        self.merge(torch.arange(0), None, room=0)
        full_ids = torch.cat([ids, steps], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(steps)], dim=1)
        positions = position_ids_from_mask(full_mask)
        reference = self.model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
        expected = [reference[:, 5], reference[:, 6], reference[:, 7]]
        return all((a.float() - b.float()).abs().max().item() < self_check_tolerance(b) for a, b in zip(lean, expected))


def attention_dtype(model) -> torch.dtype:
    """The KV cache's and attention's dtype: the model's, except fp32 for a 16-bit model on a CPU without the
    fused kernels (bf16 ones), where batched matmuls of many tiny bf16 matrices copy their operands (single-token
    attention over 64 rows × 256 tokens: 0.58 s in bf16 against 0.21 s in fp32, benchmarks/bf16.py's long shape);
    projections stay 16-bit."""
    dtype = model.dtype
    parameter = next(model.parameters())
    if dtype in (torch.bfloat16, torch.float16) and parameter.device.type == "cpu" and not cpu_kernels.usable(parameter):
        return torch.float32
    return dtype


def self_check_tolerance(expected: torch.Tensor) -> float:
    if expected.dtype == torch.float32 or not expected.dtype.is_floating_point:
        return SELF_CHECK_TOLERANCE
    scale = max(1.0, expected.float().abs().max().item())
    return SELF_CHECK_ULPS * torch.finfo(expected.dtype).eps * scale


def layer_weights(layer) -> list[torch.Tensor | None]:
    """A decoder layer's parameters in the order `cpu_kernels.decode_step` takes them (None where the model has
    none): input norm, q, k, v projections (weight, bias), q and k norms (Qwen3), o projection, post-attention
    norm, gate, up and down projections."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = [attn.q_norm.weight, attn.k_norm.weight] if hasattr(attn, "q_norm") else [None, None]
    return [layer.input_layernorm.weight, *_linear(attn.q_proj), *_linear(attn.k_proj), *_linear(attn.v_proj),
            *norms, *_linear(attn.o_proj), layer.post_attention_layernorm.weight, *_linear(mlp.gate_proj),
            *_linear(mlp.up_proj), *_linear(mlp.down_proj)]


def _linear(module) -> list[torch.Tensor | None]:
    return [module.weight, module.bias]


@dataclass
class KVRows:
    """The KV cache of some rows: per layer K transposed [rows, KV heads, head dim, columns] (a decode step's
    scores read each dimension's keys contiguously) and V [rows, KV heads, columns, head dim], which columns
    hold real tokens, and each row's next position id."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    key_mask: torch.Tensor  # [rows, columns]
    positions: torch.Tensor  # [rows]

    @property
    def width(self) -> int:
        return self.key_mask.shape[1]

    def take(self, rows: torch.Tensor, first: int, end: int) -> KVRows:
        """A copy of these rows' columns first … end − 1."""
        return KVRows([k[..., first:end].index_select(0, rows) for k in self.k],
                      [v[:, :, first:end].index_select(0, rows) for v in self.v],
                      self.key_mask[:, first:end].index_select(0, rows), self.positions.index_select(0, rows))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
