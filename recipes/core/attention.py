"""Which attention implementation transformers runs (`--attn_implementation`).

All go through transformers' attention interface; none is patched. For packed rows
(collate_packed: position_ids restarting per conversation, no attention_mask) transformers'
masking_utils detects the packing from the position ids and builds a document mask for each:

- eager, sdpa: a dense block-diagonal causal mask; every block is computed, the masked ones
  thrown away, so a packed row of width W costs W^2 whatever its conversations' lengths.
- flex_attention: a BlockMask from the same mask function; blocks between conversations are
  skipped. torch compiles it; on CPU torch 2.13 has no flex_attention backward, so it cannot
  train there.
- flash_attention_2: varlen kernels with sequence boundaries from the position ids: no
  cross-conversation work at all. CUDA and the flash_attn package only.

- sdpa_packed (camelid's, registered through transformers' AttentionInterface): sdpa, but a
  packed row runs one causal sdpa call per conversation (boundaries from the position ids, as
  transformers finds them), so it costs sum(n_i^2), not width^2; anything else is plain sdpa.
  What flash_attention_2's varlen path does, on any device, at the price of a loop.

auto: flash_attention_2 where it runs; else for packed rows flex_attention on CUDA,
sdpa_packed on CPU; else sdpa.

With --sequence_parallel_size > 1 the model runs camelid's "ulysses" attention
(recipes/core/sequence_parallel.py), which computes sdpa_packed on the whole row for a share
of the heads; auto, sdpa and sdpa_packed mean that, the others are refused.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from . import sequence_parallel
from .config import ConfigError

PACKED_SDPA = "sdpa_packed"
IMPLEMENTATIONS = ("auto", "sdpa", PACKED_SDPA, "flex_attention", "flash_attention_2", "eager")


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each sequence: a new one wherever the position does not
    follow the previous by one (transformers' find_packed_sequence_indices rule)."""
    new = torch.ones_like(position_ids, dtype=torch.bool)
    new[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    width, rows = position_ids.shape[1], []
    for starts in (torch.nonzero(r).flatten().tolist() for r in new):
        rows.append(list(zip(starts, starts[1:] + [width])))
    return rows


# transformers calls an attention function with (module, query, key, value, mask) positional
def sdpa_packed_attention(  # noqa: PLR0917
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    position_ids=None,
    **kwargs,
):
    """transformers' attention-function signature: query/key/value (batch, heads, length, dim),
    returns (batch, length, heads, dim). Only a mask-free forward over the whole sequence
    (training, prefill) is split by conversation; everything else goes to sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    if attention_mask is not None or position_ids is None or q_len == 1 or key.shape[2] != q_len:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_ids=position_ids,
            **kwargs,
        )
    position_ids = position_ids.expand(query.shape[0], -1)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, spans in enumerate(_segments(position_ids)):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=dropout,
                scale=scaling,
                is_causal=True,
                enable_gqa=gqa,
            )
            for s, e in spans
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def sdpa_packed_mask(*args, attention_mask=None, **kwargs):
    """No mask where there is no padding mask (the attention splits packed rows itself);
    otherwise sdpa's own mask."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `sdpa_packed` a name from_pretrained / from_config accept (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, sdpa_packed_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_packed_mask)


def unavailable(name: str, cuda: bool | None = None) -> str | None:
    """Why `name` cannot train here, or None when it can."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "flash_attention_2":
        if not cuda:
            return "flash_attention_2 needs a CUDA GPU"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attention_2 needs the flash_attn package (pip install flash-attn)"
    if name == "flex_attention" and not cuda:
        return f"flex_attention has no backward on CPU in torch {torch.__version__}"
    return None


def resolve(name: str, packing: bool, cuda: bool | None = None) -> str:
    """The implementation `name` stands for here (auto: the fastest that runs and is exact
    for the batch layout). An explicit name that cannot train here is an error."""
    if name not in IMPLEMENTATIONS:
        raise ConfigError(
            f"attn_implementation {name!r} is not one of {', '.join(IMPLEMENTATIONS)}"
        )
    if name != "auto":
        why = unavailable(name, cuda)
        if why:
            raise ConfigError(f"--attn_implementation {name}: {why}")
        return name
    if unavailable("flash_attention_2", cuda) is None:
        return "flash_attention_2"
    if packing:  # both skip cross-conversation work, which sdpa computes and masks
        return "flex_attention" if unavailable("flex_attention", cuda) is None else PACKED_SDPA
    return "sdpa"


def attention_kwargs(cfg) -> dict:
    """Keyword arguments for `from_pretrained` / `from_config`: splat them into the call."""
    if getattr(cfg, "sequence_parallel_size", 1) > 1:
        # sdpa_packed on the whole row, between Ulysses' all-to-alls (exact for packed rows;
        # sequence_parallel.check allows only the names that mean it)
        sequence_parallel.register(sdpa_packed_attention, sdpa_packed_mask)
        return {"attn_implementation": sequence_parallel.NAME}
    name = resolve(cfg.attn_implementation, cfg.packing)
    if name == PACKED_SDPA:
        register()
    return {"attn_implementation": name}
