"""The batched verifier: one forward of the target per round for every session's draft.

The target's decoder is run here over the weights of a transformers Llama-family model
(gpt-fast style), with our own preallocated KV cache::

    k_cache[layer], v_cache[layer]: [max_sessions, kv_heads, max_len, head_dim]

A session owns one slot (a row of every cache) and a length. Its sequence is the prompt
plus the committed output; every token but the last ("pending") has its K/V in the slot at
its own position. A round feeds ``[pending, d_1 .. d_L]`` of every session:

* the new tokens of all sessions are packed into one token array (vLLM style: projections
  and MLP cost ``sum_k (L_k + 1)`` tokens, no padding);
* their K/V are written straight into each slot at their absolute positions;
* attention pads only the queries to ``[rows, heads, max(L_k + 1), head_dim]`` and reads
  the slots' caches in place (a view of a contiguous slot range) or gathered (when the
  batch's slots are scattered), with a per-row mask ``key position <= query position``;
* rejected drafts are rolled back by length alone: their K/V sit beyond the new length,
  masked, and are overwritten by the next round.

See docs/verifier.md for the layout, masks and the RNG keying.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from edge_controller.verifier.sampling import (
    decided_margin,
    greedy_verify,
    process_logits,
    speculative_verify,
)
from edge_controller.verifier.slots import (
    CapacityError,
    Chunk,
    SlotTable,
    VerifyItem,
    VerifyOutcome,
)

log = logging.getLogger(__name__)

# Decoders that are "Llama with options" (biases, q/k norms, GQA): run by this engine.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class _Rows:
    """Token rows of one forward, packed (N tokens) and padded for attention (R x T)."""

    tokens: Tensor  # [N] int64
    positions: Tensor  # [N] int64: absolute position of each token
    slot: Tensor  # [N] int64: cache slot each token's K/V is written to
    row: Tensor  # [N] int64: attention row of each token
    column: Tensor  # [N] int64: column of each token within its row
    cache_rows: slice | Tensor  # the R cache slots attention reads (view or gather)
    mask: Tensor  # [R, 1, T, C] bool: query may attend key position
    width: int  # T = max tokens in a row


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of K and V that one cached token takes over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_layer = 2 * config.num_key_value_heads * head_dim
    return config.num_hidden_layers * per_layer * torch.empty((), dtype=dtype).element_size()


def _free_bytes(device: torch.device) -> int:
    """Memory the KV cache may take on ``device``: free GPU memory, or available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def sessions_for_budget(config, dtype: torch.dtype, max_len: int, budget_bytes: int) -> int:
    """How many slots of ``max_len`` tokens a KV budget of ``budget_bytes`` holds."""
    return budget_bytes // (kv_bytes_per_token(config, dtype) * max_len)


class Verifier(SlotTable):
    """Per-session KV slots and the batched verification of drafts (rule in sampling.py).

    ``dtype``/``device`` default to the model's own; when given, the model is moved and
    cast in place. Use fp32 on CPU, bf16 or fp16 on a GPU.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_sessions: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f"verifier engine runs {', '.join(SUPPORTED_MODEL_TYPES)} decoders, "
                f"not {config.model_type!r}"
            )
        window = getattr(config, "sliding_window", None)
        if window is not None and window < max_len:
            raise NotImplementedError(
                f"sliding-window attention ({window} tokens) is not supported; "
                f"use max_len <= {window}"
            )
        super().__init__(max_sessions=max_sessions, max_len=max_len,
                         vocab_size=model.lm_head.out_features)
        weights = next(model.parameters())
        self.device = torch.device(device) if device is not None else weights.device
        self.dtype = dtype or weights.dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.decoder = model.model
        attn = self.decoder.layers[0].self_attn
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        shape = (max_sessions, self.n_kv_heads, max_len, self.head_dim)
        self.kv_bytes = kv_bytes_per_token(config, self.dtype) * max_sessions * max_len
        too_big = CapacityError(
            f"KV cache of {self.kv_bytes / 2**30:.2f} GiB ({max_sessions} sessions x "
            f"{max_len} tokens) does not fit on {self.device}; lower limits.max_sessions or "
            "limits.max_len"
        )
        if self.kv_bytes > _free_bytes(self.device):
            raise too_big
        try:
            self.k_cache = [self._zeros(shape) for _ in self.decoder.layers]
            self.v_cache = [self._zeros(shape) for _ in self.decoder.layers]
        except (torch.OutOfMemoryError, RuntimeError):  # the CPU allocator raises the latter
            raise too_big from None
        log.info(
            "verifier: %s on %s/%s, %d slots x %d tokens, KV %.1f MiB",
            config.model_type,
            self.device,
            self.dtype,
            max_sessions,
            max_len,
            self.kv_bytes / 2**20,
        )

    def _zeros(self, shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _run(self, items: list[VerifyItem], chunk: Chunk | None) -> list[VerifyOutcome]:
        """One forward: the items' tokens lead the packed rows, the chunk's follow."""
        requests = [self._verify_request(it) for it in items] + ([chunk] if chunk else [])
        rows = self._rows(requests)
        n_verify = sum(len(tokens) for _, tokens, _ in requests[: len(items)])
        with torch.inference_mode():
            logits = self._forward(rows, logits=n_verify)
            return self._decide(items, rows, logits) if items else []

    def target_logits(self, items: list[VerifyItem]) -> list[Tensor]:
        """The target's logits after each of ``[pending, d_1 .. d_L]``, per item as
        ``[L + 1, V]`` float32, committing nothing (for tests and references)."""
        self._check_items(items)
        requests = [self._verify_request(it) for it in items]
        with torch.inference_mode():
            logits = self._forward(self._rows(requests), logits=sum(len(r[1]) for r in requests))
        return list(logits.float().split([len(it.draft_tokens) + 1 for it in items]))

    def _decide(self, items: list[VerifyItem], rows: _Rows, logits: Tensor) -> list[VerifyOutcome]:
        """Acceptance for every item, vectorised over items and positions.

        ``logits``: [N, V], the items' tokens packed in item order (they lead the rows);
        unpacked here to [B, T, V] by item.
        """
        lengths = [len(it.draft_tokens) + 1 for it in items]
        batch, width = len(items), max(lengths)
        item_of_token = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths))
        padded = logits.new_zeros(batch, width, logits.shape[-1])
        padded[item_of_token.to(self.device), rows.column[: logits.shape[0]]] = logits
        draft = torch.zeros(batch, width - 1, dtype=torch.int64)
        for b, item in enumerate(items):
            draft[b, : len(item.draft_tokens)] = torch.tensor(item.draft_tokens, dtype=torch.int64)
        draft = draft.to(self.device)
        draft_len = torch.tensor([len(it.draft_tokens) for it in items], device=self.device)
        top2 = padded.topk(2, dim=-1)
        accepted, next_token = greedy_verify(top2.indices[..., 0], draft, draft_len)

        sampled = [b for b, item in enumerate(items) if not item.sampling.greedy]
        if sampled:
            index = torch.tensor(sampled, device=self.device)
            params = [items[b].sampling for b in sampled for _ in range(width)]
            p_target = process_logits(padded[index].flatten(0, 1), params)
            q_ids, q_probs = self._sparse_q([items[b] for b in sampled], width - 1)
            seed = torch.tensor([items[b].sampling.seed for b in sampled], dtype=torch.int64)
            start = torch.tensor([self.length(items[b].slot) for b in sampled])
            acc, nxt = speculative_verify(
                p_target.view(len(sampled), width, -1),
                draft[index],
                draft_len[index],
                q_ids,
                q_probs,
                seed.to(self.device),
                start.to(self.device),
            )
            accepted[index], next_token[index] = acc, nxt
        margin = decided_margin(top2.values, accepted)
        return [
            VerifyOutcome(a, t, m)
            for a, t, m in zip(accepted.tolist(), next_token.tolist(), margin.tolist(), strict=True)
        ]

    def _sparse_q(self, items: list[VerifyItem], length: int) -> tuple[Tensor, Tensor]:
        """Pad the sparse draft distributions: q_ids [B, L, Kq] int64, q_probs [B, L, Kq]."""
        support = max((len(ids) for it in items for ids in it.q_ids or []), default=1)
        q_ids = torch.zeros(len(items), length, support, dtype=torch.int64)
        counts = torch.zeros(len(items), length, support, dtype=torch.float64)
        for b, item in enumerate(items):
            for i, (ids, cnt) in enumerate(zip(item.q_ids or [], item.q_counts or [],
                                               strict=True)):
                q_ids[b, i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
                counts[b, i, : len(cnt)] = torch.tensor(cnt, dtype=torch.float64)
        total = counts.sum(dim=-1, keepdim=True).clamp(min=1)
        return q_ids.to(self.device), (counts / total).to(self.device)

    # --- the decoder ------------------------------------------------------------------

    def _rows(self, requests: list[tuple[int, list[int], int]]) -> _Rows:
        """Pack ``(slot, tokens, start position)`` requests into one forward's rows.

        Attention rows are the contiguous slot range [lo, hi) when it is at most twice the
        number of requests (cache read as a view; idle slots get masked rows), else the
        requested slots themselves (cache gathered). Example: slots 3 and 5 with 2 and 4
        tokens -> range rows 3, 4, 5 (T = 4); tokens of slot 5 sit in row 2, columns 0..3.
        """
        slots = [slot for slot, _, _ in requests]
        lo, hi = min(slots), max(slots) + 1
        if hi - lo <= 2 * len(requests):
            row_of = {slot: slot - lo for slot in slots}
            cache_rows: slice | Tensor = slice(lo, hi)
            n_rows = hi - lo
        else:
            row_of = {slot: r for r, slot in enumerate(slots)}
            cache_rows = torch.tensor(slots, device=self.device)
            n_rows = len(slots)
        width = max(len(tokens) for _, tokens, _ in requests)
        query_pos = torch.zeros(n_rows, width, dtype=torch.int64)  # padding attends key 0
        tokens, positions, slot_of, row, column = [], [], [], [], []
        for slot, toks, start in requests:
            n = len(toks)
            tokens += toks
            positions += range(start, start + n)
            slot_of += [slot] * n
            row += [row_of[slot]] * n
            column += range(n)
            query_pos[row_of[slot], :n] = torch.arange(start, start + n)
        context = int(query_pos.max()) + 1
        mask = torch.arange(context)[None, None, :] <= query_pos[:, :, None]

        def put(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        return _Rows(
            tokens=put(tokens),
            positions=put(positions),
            slot=put(slot_of),
            row=put(row),
            column=put(column),
            cache_rows=cache_rows,
            mask=mask[:, None].to(self.device),
            width=width,
        )

    def _forward(self, rows: _Rows, *, logits: int | bool) -> Tensor | None:
        """Run the decoder over the packed tokens, writing their K/V; the logits of the
        first ``logits`` tokens ([n, V]; all of them for True, none for False/0)."""
        x = self.decoder.embed_tokens(rows.tokens)  # [N, hidden]
        cos, sin = self.decoder.rotary_emb(x, rows.positions[None])  # [1, N, head_dim]
        for i, layer in enumerate(self.decoder.layers):
            h = layer.input_layernorm(x)
            x = x + self._attention(i, layer.self_attn, h, cos[0], sin[0], rows)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if not logits:
            return None
        if logits is not True:
            x = x[:logits]
        return self.model.lm_head(self.decoder.norm(x))

    def _attention(
        self,
        layer: int,
        attn: nn.Module,
        h: Tensor,  # [N, hidden]
        cos: Tensor,  # [N, head_dim]
        sin: Tensor,  # [N, head_dim]
        rows: _Rows,
    ) -> Tensor:  # [N, hidden]
        n = h.shape[0]
        q = attn.q_proj(h).view(n, self.n_heads, self.head_dim)
        k = attn.k_proj(h).view(n, self.n_kv_heads, self.head_dim)
        v = attn.v_proj(h).view(n, self.n_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        k_cache[rows.slot, :, rows.positions] = k
        v_cache[rows.slot, :, rows.positions] = v
        context = rows.mask.shape[-1]
        keys = k_cache[rows.cache_rows, :, :context]  # [R, kv_heads, C, head_dim]
        values = v_cache[rows.cache_rows, :, :context]
        queries = q.new_zeros(rows.mask.shape[0], rows.width, self.n_heads, self.head_dim)
        queries[rows.row, rows.column] = q
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys,
            values,
            attn_mask=rows.mask,
            scale=attn.scaling,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )  # [R, heads, T, head_dim]
        out = out.transpose(1, 2)[rows.row, rows.column]  # [N, heads, head_dim]
        return attn.o_proj(out.reshape(n, self.n_heads * self.head_dim))
