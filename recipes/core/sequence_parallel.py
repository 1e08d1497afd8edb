"""Ulysses sequence parallelism (`--sequence_parallel_size sp`): each row is split into sp
contiguous shards over the sp ranks of one group; attention runs on the whole row for H/sp
heads between two all-to-alls (DeepSpeed-Ulysses, Jacobs et al. 2023).

    shard_batch        a rank's shard of a micro-batch: padded to a multiple of sp, labels
                       shifted *before* splitting (each label is predicted on exactly one rank),
                       global position ids (RoPE sees a token's place in the whole row)
    ulysses_attention  a transformers attention function (registered as "ulysses"): q, k, v of
                       the local tokens for all heads -> the whole row for H/sp heads (one
                       all-to-all), per-conversation causal attention (packing's segments from
                       the whole row's position ids), -> local tokens for all heads (a second)
    check              the settings it trains with (a recipe-level config check): a
                       multi-process strategy, sdpa-based attention, the full model uncompiled,
                       sp dividing the attention and key/value heads

Everything outside attention (embeddings, norms, MLP, the loss) is per token and runs on the
local shard unchanged. Ranks of one group see the same batch (dealt by dp_rank); each rank's
loss is its shard's token-loss sum over the global batch's trained tokens, so the loop's sums
over ranks stay the global mean, and the engines' gradient reduction (over all ranks) adds
the shards' gradients up. The group is consecutive ranks (ParallelDims.sp_rank).

Why camelid's own and not DeepSpeed 0.19's `runtime.sequence_parallel.ulysses_sp`: that one
talks through `deepspeed.comm` and its own global group state (parallel_state_sp), which the
torch engines (FSDP2, DDP) never initialise; and over sdpa it drops the attention mask, so
packed conversations would attend to each other. accelerate's ParallelismConfig drives its own
Accelerator loop (engines.py says why camelid does not). Here: ~100 lines over transformers'
AttentionInterface and torch.distributed, the same code under every engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastchat_data.tokenize import IGNORE_INDEX

from . import parallel
from .config import ConfigError, read_structured

NAME = "ulysses"

# The sp group of this process (set once by the loop, use_group, before the model runs) and
# the attention computed on the whole row (set by register). Module-level settings because
# transformers calls attention functions by name, with no room for either.
_group = None
_whole_row_attention = None

# --attn_implementation values that mean the whole-row attention attention.py registers here
# (sdpa_packed: one causal sdpa per conversation, exact for packed and unpacked rows alike)
ATTENTION_OK = ("auto", "sdpa", "sdpa_packed")


def use_group(group) -> None:
    global _group
    _group = group


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with equal splits over dim 0: block i goes to rank i. Its adjoint is
    the same exchange (block j of rank i came from block i of rank j), so backward sends the
    gradient back the way the input came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)  # of the contiguous input: the collective writes row-major
    dist.all_to_all_single(out, x, group=group)
    return out


def _heads_to_ranks(x: torch.Tensor, sp: int) -> torch.Tensor:
    """(b, H, s/sp, d) -> (sp, b, H/sp, s/sp, d): block j holds the heads rank j attends with."""
    b, h, s, d = x.shape
    return x.reshape(b, sp, h // sp, s, d).transpose(0, 1)


def scatter_heads(q, k, v, *, group):
    """Local tokens of all heads -> the whole row for this rank's H/sp (and KV/sp) heads. q, k
    and v go in one exchange (one collective per layer, not three)."""
    sp = dist.get_world_size(group)
    hq, hk = q.shape[1] // sp, k.shape[1] // sp
    blocks = torch.cat([_heads_to_ranks(t, sp) for t in (q, k, v)], dim=2)
    got = _AllToAll.apply(blocks, group)  # block i: sequence shard i, my heads
    n, b, h, s, d = got.shape
    whole = got.permute(1, 2, 0, 3, 4).reshape(b, h, n * s, d)  # shards in row order
    return whole.split([hq, hk, hk], dim=1)


def gather_heads(out: torch.Tensor, group) -> torch.Tensor:
    """(b, s, H/sp, d) for the whole row -> (b, s/sp, H, d) for the local tokens."""
    sp = dist.get_world_size(group)
    b, s, h, d = out.shape
    blocks = out.reshape(b, sp, s // sp, h, d).transpose(0, 1)  # block j: rank j's tokens
    got = _AllToAll.apply(blocks, group)  # block i: my tokens, rank i's heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, s // sp, sp * h, d)


_positions: tuple[torch.Tensor, torch.Tensor] | None = None  # (local, whole row): per forward


def whole_positions(local: torch.Tensor, group) -> torch.Tensor:
    """The whole row's position ids (every layer gets the same local tensor: gathered once)."""
    global _positions
    if _positions is not None and _positions[0] is local:
        return _positions[1]
    sp = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(sp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    _positions = (local, torch.cat(parts, dim=-1))
    return _positions[1]


# transformers calls an attention function with (module, query, key, value, mask) positional
def ulysses_attention(  # noqa: PLR0917
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """transformers' attention-function signature: (b, heads, local tokens, dim) in,
    (b, local tokens, heads, dim) out. The attention itself is register's `whole_row` (camelid
    registers sdpa_packed's: one causal sdpa per conversation of the whole row, found from the
    whole row's position ids)."""
    if attention_mask is not None:  # shard_batch never gives one: padding is causal-safe
        raise RuntimeError("sequence parallelism takes no attention mask (see shard_batch)")
    positions = whole_positions(kwargs.pop("position_ids"), _group).expand(query.shape[0], -1)
    q, k, v = scatter_heads(query, key, value, group=_group)
    out, _ = _whole_row_attention(
        module, q, k, v, None, dropout=dropout, scaling=scaling, position_ids=positions, **kwargs
    )
    return gather_heads(out, _group), None


def register(whole_row, mask) -> None:
    """Make "ulysses" an attn_implementation transformers accepts (idempotent): `whole_row`, an
    attention function that separates packed conversations by their position ids, runs on
    the whole row; `mask`, the mask function it goes with (none without a padding mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    global _whole_row_attention
    _whole_row_attention = whole_row
    AttentionInterface.register(NAME, ulysses_attention)
    AttentionMaskInterface.register(NAME, mask)


def shard_batch(batch: dict, sp: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s contiguous 1/sp of each row. Rows are padded at the end to a multiple of
    sp (untrained tokens that come after every real one, so causal attention never reaches
    them; the same holds for collate's right padding, so the padding mask can go). Labels are
    shifted here, before splitting: the token that predicts the first label of a shard sits
    at the end of the previous shard."""
    ids, labels = batch["input_ids"], batch["labels"]
    rows, width = ids.shape
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(width, device=ids.device).expand(rows, -1)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    pad = -width % sp
    if pad:
        ids = F.pad(ids, (0, pad), value=0)
        targets = F.pad(targets, (0, pad), value=IGNORE_INDEX)
        more = positions[:, -1:] + torch.arange(1, pad + 1, device=ids.device)
        positions = torch.cat([positions, more], dim=1)
    n = (width + pad) // sp
    part = slice(rank * n, (rank + 1) * n)
    return {
        "input_ids": ids[:, part].contiguous(),
        "position_ids": positions[:, part].contiguous(),
        "shifted_labels": targets[:, part].contiguous(),
    }


def check_heads(model_config: dict, sp: int, where: str = "the model") -> None:
    """sp must divide the attention heads and the key/value heads (GQA): each rank attends
    with 1/sp of them. One line naming the numbers."""
    heads = model_config.get("num_attention_heads")
    kv = model_config.get("num_key_value_heads") or heads
    for what, count in (("attention heads", heads), ("key/value heads", kv)):
        if isinstance(count, int) and count % sp:
            raise ConfigError(
                f"--sequence_parallel_size {sp} does not divide the {count} {what} of {where} "
                f"(each rank attends with 1/{sp} of them); use a divisor of {count}"
            )


def check(cfg) -> None:
    """What --sequence_parallel_size > 1 trains with: a config check of every recipe."""
    sp = cfg.sequence_parallel_size
    if sp <= 1:
        return
    if cfg.strategy != "auto" and not parallel.get(cfg.strategy).multi_process:
        raise ConfigError(
            f"--sequence_parallel_size {sp} shares rows between processes; strategy "
            f"{cfg.strategy} runs one (use fsdp, zero3 or ddp)"
        )
    if cfg.attn_implementation not in ATTENTION_OK:
        raise ConfigError(
            f"--attn_implementation {cfg.attn_implementation} with --sequence_parallel_size "
            f"{sp}: sequence parallelism runs its own attention over sdpa; use "
            f"{', '.join(ATTENTION_OK)}"
        )
    if cfg.peft_method != "none" or cfg.compile:
        what = f"--peft_method {cfg.peft_method}" if cfg.peft_method != "none" else "--compile"
        raise ConfigError(
            f"--sequence_parallel_size {sp} trains the full model uncompiled; drop {what}"
        )
    if cfg.model_name_or_path:  # checked by ModelArgs: a folder with a readable config.json
        config = read_structured(Path(cfg.model_name_or_path) / "config.json", json.loads, "JSON")
        check_heads(config, sp, str(cfg.model_name_or_path))
