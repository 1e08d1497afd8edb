"""The causal-LM loss without full-vocabulary logits for every position.

transformers' ForCausalLMLoss projects every position onto the vocabulary (batch x length x
vocab floats, then as many again for log-softmax and for the gradient). Here only positions
with a label are projected, `chunk_size` rows at a time, and each chunk's logits are recomputed
in backward (torch.utils.checkpoint), so one chunk's logits exist at a time. Same numbers: a
token sum divided by `num_items_in_batch` (or the mean without it), as ForCausalLMLoss.

Integration without patching the model: the engine calls the model's own forward (so FSDP2's
and ZeRO-3's module hooks run) with `logits_to_keep` set to one position and without labels; a
forward hook on the decoder captures its (post-norm) output, and a forward hook on the root,
run before FSDP2's own post-forward hook, computes the loss by calling the output-embedding
module per chunk, so ZeRO-3 gathers its weight and FSDP2 / DDP reduce its gradient as usual.
"""

from __future__ import annotations

import inspect
import weakref

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# models whose model(...).logits were checked once to equal output_embeddings(hidden)
_checked: weakref.WeakSet = weakref.WeakSet()


class _CrossEntropySum(torch.autograd.Function):
    """sum(logsumexp(logits) - logits[target]) whose backward turns the saved logits into their
    gradient in place: one vocabulary-wide buffer per chunk in backward, where F.cross_entropy
    holds the logits, their log-softmax and its gradient at once."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, target, lse)
        return (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        # the logits are this chunk's own (recomputed) tensor, needed by nothing else
        softmax = logits.sub_(lse[:, None]).exp_()
        softmax[torch.arange(len(target), device=target.device), target] -= 1
        return softmax.mul_(grad), None


class _TokenLogProbs(torch.autograd.Function):
    """logits[target] - logsumexp(logits) per row, with the same in-place backward as
    _CrossEntropySum: what DPO sums per sequence."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, target, lse)
        return logits.gather(1, target[:, None]).squeeze(1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        softmax = logits.sub_(lse[:, None]).exp_()
        softmax[torch.arange(len(target), device=target.device), target] -= 1
        return softmax.mul_(-grad[:, None]), None


def _chunk_token_logps(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _TokenLogProbs.apply(head(hidden).float(), target)


def chunk_count(rows: int, chunk_size: int, head: torch.nn.Module) -> int:
    """Chunks of labelled rows to project: at least one (a batch with nothing to train still
    has a graph). Under ZeRO-3 every call of the output embedding gathers its weight, a
    collective: ranks calling it a different number of times would wait on each other
    forever, so the ranks agree on the most (only there: elsewhere a call is local)."""
    count = max(1, -(-rows // chunk_size))
    partitioned = getattr(head.weight, "ds_id", None) is not None  # a ZeRO-3 parameter
    if partitioned and torch.distributed.is_initialized():
        most = torch.tensor([count], device=head.weight.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        count = int(most.item())
    return count


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # float32 cross-entropy, as ForCausalLMLoss upcasts the logits; a copy only when not fp32
    logits = head(hidden).float()
    return _CrossEntropySum.apply(logits, target)


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 512,
    ignore_index: int = IGNORE_INDEX,
    shifted: bool = False,
) -> torch.Tensor:
    """ForCausalLMLoss(head(hidden), labels, ...) computed on labelled positions only, in
    chunks of `chunk_size` rows whose logits are recomputed in backward. `shifted`: labels
    already hold position t's target at t (a sequence-parallel shard's, shifted before
    splitting)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if shifted:
        target = labels.reshape(-1).to(hidden.device)
    else:
        target = _shifted_targets(labels, hidden.device, ignore_index)
    keep = target != ignore_index
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]
    target = target[keep]
    total = None
    # at least one (possibly empty) chunk: a batch with nothing to train still has a graph
    for start in range(0, chunk_count(len(target), chunk_size, head) * chunk_size, chunk_size):
        end = start + chunk_size
        part = checkpoint(
            _chunk_loss, head, rows[start:end], target[start:end], use_reentrant=False
        )
        total = part if total is None else total + part
    if num_items_in_batch is None:
        return total / keep.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _shifted_targets(labels: torch.Tensor, device, ignore_index: int = IGNORE_INDEX):
    # position t predicts label t+1; the last position predicts nothing
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index).reshape(-1).to(device)


def chunked_sequence_logps(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, *, chunk_size: int = 512
) -> torch.Tensor:
    """Per row, the sum of log p(label) over labelled positions (a sequence's log-likelihood
    under the model, as DPO needs it), projecting `chunk_size` labelled rows at a time."""
    target = _shifted_targets(labels, hidden.device)
    keep = target != IGNORE_INDEX
    rows = hidden.reshape(-1, hidden.shape[-1])[keep]
    target = target[keep]
    row_of = torch.arange(labels.shape[0], device=hidden.device).repeat_interleave(labels.shape[-1])
    parts = [
        checkpoint(
            _chunk_token_logps,
            head,
            rows[s : s + chunk_size],
            target[s : s + chunk_size],
            use_reentrant=False,
        )
        for s in range(0, chunk_count(len(target), chunk_size, head) * chunk_size, chunk_size)
    ]
    per_token = torch.cat(parts)
    # summed in float64: a reply's log-likelihood runs to -1e3 and more, where float32 sums of
    # hundreds of terms would lose the 1e-5 that DPO's small log-ratio differences live in
    out = torch.zeros(labels.shape[0], dtype=torch.float64, device=hidden.device)
    return out.index_add(0, row_of[keep], per_token.double()).float()


def sequence_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same sums from full logits (transformers' path, --loss_chunk_size 0)."""
    target = _shifted_targets(labels, logits.device).view(labels.shape)
    keep = target != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).double().sum(-1).float()


def _base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def supports_chunked_loss(model) -> bool:
    """A causal LM whose forward takes `logits_to_keep` and whose hidden states line up with
    its labels (PEFT prompt learning prepends virtual tokens: they do not)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    base = _base_model(model)
    if base.get_output_embeddings() is None:
        return False
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def _last_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.last_hidden_state


def _check_head(model, output, hidden: torch.Tensor, *, head) -> None:
    """Once per model: the model's own logits equal the output embedding applied to the
    captured hidden state; a model that scales or soft-caps its logits would be trained on
    another loss than its own, so refuse it."""
    if model in _checked:
        return
    with torch.no_grad():
        mine = head(hidden[:, -1:]).float()
        theirs = output.logits.float()
        tol = 1e-4 if hidden.dtype == torch.float32 else 2e-2  # bf16 kernels may round apart
        if not torch.allclose(mine, theirs, rtol=tol, atol=tol * theirs.abs().max().item()):
            raise RuntimeError(
                f"{type(_base_model(model)).__name__}: its logits are not its output embedding "
                "applied to the last hidden state (scaled or soft-capped?); train with "
                "--loss_chunk_size 0 (transformers' loss)"
            )
    _checked.add(model)


def forward_with_loss(call, model, chunk_size: int, **batch):
    """`call(**batch)` (the model, or its DDP / DeepSpeed wrapper) returning `.loss` computed
    by chunked_causal_lm_loss. `model` is the unwrapped model; chunk_size 0, a batch without
    labels, or a model that does not support it: transformers' own loss.

    With `return_sequence_logps=True` the output's `loss` is instead, per row, the summed
    log-probabilities of its labels (chunked_sequence_logps): in `loss` because FSDP2 hooks
    its backward (re-gathering the output embedding) only on an output's declared fields.

    `shifted_labels` instead of `labels`: targets already shifted (a sequence-parallel shard,
    recipes/core/sequence_parallel.py); transformers' loss takes them as its shift_labels."""
    shifted = batch.pop("shifted_labels", None)
    if shifted is not None:
        batch["labels"] = shifted
    labels = batch.get("labels")
    want_logps = batch.pop("return_sequence_logps", False)
    if want_logps and shifted is not None:
        raise ValueError("sequence log-probabilities of shifted (split) rows are not supported")
    if chunk_size <= 0 or labels is None or not supports_chunked_loss(model):
        if not want_logps:
            if shifted is not None:
                return call(**batch, shift_labels=shifted)
            return call(**batch)
        labels = batch.pop("labels")
        batch.pop("num_items_in_batch", None)
        output = call(**batch)
        output["loss"] = sequence_logps_from_logits(output.logits, labels)
        return output
    labels = batch.pop("labels")
    num_items = batch.pop("num_items_in_batch", None)
    head = model.get_output_embeddings()
    captured: dict[str, torch.Tensor] = {}

    def grab(_module, _args, output):
        captured["hidden"] = _last_hidden(output)

    def attach(_module, _args, output):
        hidden = captured.pop("hidden")
        _check_head(model, output, hidden, head=head)
        if want_logps:
            output["loss"] = chunked_sequence_logps(hidden, head, labels, chunk_size=chunk_size)
        else:
            output["loss"] = chunked_causal_lm_loss(
                hidden,
                head,
                labels,
                num_items_in_batch=num_items,
                chunk_size=chunk_size,
                shifted=shifted is not None,
            )
        return output

    handles = [
        model.get_decoder().register_forward_hook(grab),
        # prepend: before FSDP2's post-forward hook, so the loss is an output it hooks backward on
        model.register_forward_hook(attach, prepend=True),
    ]
    try:
        last = torch.tensor([labels.shape[-1] - 1], device=labels.device)
        return call(**batch, logits_to_keep=last)  # the model's own logits: one position
    finally:
        for h in handles:
            h.remove()
