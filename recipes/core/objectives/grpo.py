"""GRPO and RLOO: for each prompt, sample `num_generations` completions with the current
weights, score them with reward functions, and push up the log-probability of the better ones.

The loss is TRL GRPOTrainer's (its option names too), one optimizer step per generation batch
(TRL's num_iterations=1): per completion token t of completion i,

    ratio  = exp(logp_t - logp_t.detach())          (1 in value; TRL's old policy is the current)
    loss_t = -min(ratio * A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A_i)
             + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)

with log-probs of temperature-scaled logits, and the reference the frozen starting model
(scored once per batch, only when beta > 0). Advantages per group of one prompt's completions:
grpo (r - mean) / (std + 1e-4) (std unbiased; --scale_rewards none: no division) or rloo,
r_i - mean of the others. loss_type grpo averages tokens per completion, then completions;
dr_grpo divides the token sum by completions x max_completion_length.

Sampling is reproducible without saving any generator: the completions of prompt p at step s
are drawn from a generator seeded by (seed, s, p), so a resumed run (its step is in the
checkpoint, and step s always trains the same prompts: recipes/core/data.py) samples exactly
what the uninterrupted run sampled, and so do 1 process and N ranks (each prompt is sampled on
its own, whichever rank holds it). Generation calls the engine's module with HF `generate`
under every strategy: single process, DDP, ZeRO-2 (every rank holds the whole model), FSDP2
and ZeRO-3 (each decoding step gathers the layers one by one through the engine's own hooks,
and `synced_gpus` keeps a rank whose completions stopped stepping with the others; see
GRPO.generate for why not a whole-model gather). The reference (beta > 0): under ZeRO-3 a
partitioned copy in a DeepSpeed engine of its own, otherwise a whole copy on every rank
(engine.frozen_copy).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fastchat_data.options import option

from ..config import ConfigError, data_paths
from ..data import pad_token_id
from .base import Units, refuse_other_peft

ADVANTAGES = ("grpo", "rloo")
LOSS_TYPES = ("grpo", "dr_grpo")


@dataclass
class GRPOArgs:
    """GRPO / RLOO"""

    reward_funcs: str | None = option(
        None,
        "reward functions, module:function, comma-separated (summed; see "
        "recipes/core/rewards/__init__.py), e.g. recipes.core.rewards.arithmetic:correct",
    )
    num_generations: int = option(8, "completions sampled per prompt (a group)")
    max_completion_length: int = option(256, "tokens per completion at most")
    temperature: float = option(1.0, "sampling temperature (log-probs are of the scaled logits)")
    beta: float = option(0.0, "weight of the KL to the frozen starting policy (0: no reference)")
    epsilon: float = option(0.2, "the ratio's lower clip: 1 - epsilon")
    epsilon_high: float | None = option(
        None, "the ratio's upper clip: 1 + epsilon_high (none: epsilon)"
    )
    advantage: Literal["grpo", "rloo"] = option(
        "grpo", "grpo: group-normalised rewards; rloo: reward minus the mean of the others"
    )
    scale_rewards: Literal["group", "none"] = option(
        "group", "grpo advantages: divide by the group's std (group) or not (none)"
    )
    loss_type: Literal["grpo", "dr_grpo"] = option(
        "grpo", "grpo: per-completion token mean; dr_grpo: tokens / max_completion_length"
    )

    @staticmethod
    def check(cfg) -> None:
        if cfg.num_generations < 2:
            raise ConfigError(
                f"num_generations must be at least 2 (a group compares completions), "
                f"got {cfg.num_generations}"
            )
        if cfg.max_completion_length < 1:
            raise ConfigError(
                f"max_completion_length must be at least 1, got {cfg.max_completion_length}"
            )
        if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {cfg.temperature}")
        for name in ("beta", "epsilon", "epsilon_high"):
            value = getattr(cfg, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")


# ---------------------------------------------------------------------------- the maths


def group_advantages(
    rewards: torch.Tensor, group: int, kind: str = "grpo", *, scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of rewards laid out as consecutive groups of `group`, and each group's std
    (unbiased, repeated per completion). grpo: r - mean (/ (std + 1e-4) when `scale`), TRL's
    GRPOTrainer; rloo: r_i - mean of the group's other rewards, TRL's RLOOTrainer."""
    grouped = rewards.view(-1, group)
    std = grouped.std(dim=1).repeat_interleave(group)
    if kind == "grpo":
        advantages = rewards - grouped.mean(dim=1).repeat_interleave(group)
        if scale:
            advantages = advantages / (std + 1e-4)
    elif kind == "rloo":
        others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group - 1)
        advantages = rewards - others.view(-1)
    else:
        raise ValueError(f"advantage {kind!r} is not one of {', '.join(ADVANTAGES)}")
    return advantages, std


def policy_loss_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    *,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    epsilon: float,
    epsilon_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses (completions x tokens, unmasked), per-token KL (zeros when beta is 0)
    and which tokens were clipped (TRL's clip regions: ratio below 1 - epsilon with a negative
    advantage, above 1 + epsilon_high with a positive one)."""
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    if beta:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logps)
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    return per_token, kl.detach(), clipped & mask.bool()


def summed_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, *, max_completion_length: int
) -> torch.Tensor:
    """The batch's loss times its number of completions: divided by the global number of
    completions, micro-batches and ranks add up to TRL's loss of the whole batch."""
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / max_completion_length
    raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def completion_mask(completions: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first stop token of each row (TRL's completion mask)."""
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device))
    first = torch.where(
        is_stop.any(-1),
        is_stop.int().argmax(-1),
        torch.full_like(is_stop[:, 0], is_stop.shape[1], dtype=torch.long),
    )
    return (torch.arange(completions.shape[1], device=completions.device) <= first[:, None]).long()


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(target) under softmax(logits / temperature), in float32."""
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------- data


class PromptData:
    """Prompts as training units: each rendered with the training template as a user turn
    with the assistant's reply open; the file's other columns go to the reward functions."""

    def __init__(self, records: list[dict], ids: list[list[int]], pad_id: int):
        self.records, self.ids, self.pad_id = records, ids, pad_id
        self.ds = records  # what the loop counts
        self.packing = False
        self.lengths = np.array([len(i) for i in ids], dtype=np.int64)
        self.trained = self.lengths  # unused by GRPO's loss; the batch plan wants a count
        self.units = [np.array([i]) for i in range(len(ids))]

    def batch(self, unit_ids) -> dict[str, torch.Tensor]:
        """The prompts left-padded (what the loop counts), and which units they are."""
        rows = [self.ids[int(u)] for u in unit_ids]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.as_tensor(r)
        return {"input_ids": ids, "unit_ids": torch.as_tensor([int(u) for u in unit_ids])}


def read_prompts(paths: list[str]) -> list[dict]:
    from fastchat_data.options import InputError

    records = []
    for path in paths:
        text = Path(path).read_text()
        try:
            if path.endswith(".jsonl"):
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"data_path: {path}: not JSON ({e})") from None
        bad = [
            i
            for i, r in enumerate(rows)
            if not (isinstance(r, dict) and isinstance(r.get("prompt"), str))
        ]
        if not isinstance(rows, list) or bad:
            raise InputError(
                f'data_path: {path}: GRPO reads a list of records with a "prompt" string '
                f"(record {bad[0] if bad else 0} has none); `python -m "
                "recipes.core.rewards.arithmetic --out prompts.json` writes one"
            )
        records += rows
    return records


# ---------------------------------------------------------------------------- the objective


def sample_seed(seed: int, step: int, unit: int) -> int:
    return int(np.random.SeedSequence([seed, step, unit]).generate_state(1)[0])


class GRPO:
    name = "grpo"
    section = GRPOArgs
    units = Units("prompts")  # each sampled num_generations times: no packing

    def check(self, cfg) -> None:
        # virtual tokens would shift the prompt and completion positions the loss reads
        refuse_other_peft(cfg, "the grpo recipe trains the full model or a LoRA / QLoRA adapter")
        if cfg.model_max_length <= cfg.max_completion_length:
            raise ConfigError(
                f"model_max_length ({cfg.model_max_length}) must exceed max_completion_length "
                f"({cfg.max_completion_length}): prompt and completion share it"
            )
        from ..rewards import load_reward_funcs

        if cfg.reward_funcs:  # required to train (data() says so), not to print a config
            load_reward_funcs(cfg.reward_funcs)  # a bad name: now, before anything loads

    def data(self, cfg, tokenizer, world) -> PromptData:
        from fastchat_data.schema import USER, Conversation, Message
        from fastchat_data.tokenize import ConversationTokenizer

        from ..rewards import load_reward_funcs

        self.reward_funcs = load_reward_funcs(cfg.reward_funcs)
        records = read_prompts(data_paths(cfg.data_path))
        encoder = ConversationTokenizer(tokenizer, cfg.template)
        ids = [
            encoder.encode_prompt(Conversation(str(i), [Message(USER, r["prompt"])]))
            for i, r in enumerate(records)
        ]
        room = cfg.model_max_length - cfg.max_completion_length
        long = [i for i, x in enumerate(ids) if len(x) > room]
        if long:
            raise ConfigError(
                f"data_path: {len(long)} prompt(s) (the first: record {long[0]}, "
                f"{len(ids[long[0]])} tokens) leave no room for a completion of "
                f"{cfg.max_completion_length} tokens "
                f"in model_max_length {cfg.model_max_length}; raise model_max_length"
            )
        from ..generate import stop_ids

        self.stop_ids, _ = stop_ids(encoder.template, tokenizer)
        self.tokenizer = tokenizer
        if world.main:
            print(f"training set: {len(records):,} prompts", flush=True)
        return PromptData(records, ids, pad_token_id(tokenizer))

    def before_resume(self, run) -> None:
        """The frozen starting policy, when the KL term needs it (loaded from the same folder:
        the starting weights, even when the run resumes), held as the engine holds models."""
        self.reference = run.engine.frozen_copy(run.model_path) if run.cfg.beta else None

    @torch.no_grad()
    def generate(self, run, prompt: list[int], seed: int) -> torch.Tensor:
        """`num_generations` completions of one prompt (right-padded), from the current weights.

        Sharded parameters (FSDP2, ZeRO-3) are gathered one layer at a time, by the hooks the
        engine already has on the module, for every decoding step. TRL gathers the whole
        ZeRO-3 model once per generation batch instead (ds3_gather_for_generation): fewer
        collectives, faster decoding, but every rank then holds the whole model, which is what
        ZeRO-3 is chosen to avoid, and DeepSpeed's hooks must be taken off the model and put
        back around it (TRL's remove_hooks / add_hooks reach into DeepSpeed's internals). The
        per-layer gather fits wherever training fits and uses no internals; it costs an
        all-gather per layer per decoding step."""
        cfg, module = run.cfg, run.engine.module
        device = run.world.device
        modes = {m: m.training for m in module.modules()}
        module.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    out = module.generate(
                        torch.tensor([prompt] * cfg.num_generations, device=device),
                        attention_mask=torch.ones(
                            cfg.num_generations, len(prompt), dtype=torch.long, device=device
                        ),
                        do_sample=True,
                        temperature=cfg.temperature,
                        top_k=0,
                        top_p=1.0,
                        max_new_tokens=cfg.max_completion_length,
                        eos_token_id=self.stop_ids,
                        pad_token_id=run.data.pad_id,
                        use_cache=True,
                        # sharded parameters (FSDP2, ZeRO-3): every rank gathers each layer
                        # together, so a rank whose completions stopped keeps stepping until all
                        # ranks have stopped
                        synced_gpus=run.world.strategy.shards_params and run.world.distributed,
                    )
        finally:
            for m, mode in modes.items():
                m.train(mode)
        return out[:, len(prompt) :]

    def rewards(self, prompts: list[str], completions: list[str], columns: dict) -> torch.Tensor:
        """Each reward function's scores (completions x functions)."""
        scores = []
        for name, func in self.reward_funcs:
            values = func(prompts=prompts, completions=completions, **columns)
            if len(values) != len(completions):
                raise ConfigError(
                    f"reward function {name} returned {len(values)} scores for "
                    f"{len(completions)} completions"
                )
            scores.append(torch.tensor([float(v) for v in values], dtype=torch.float32))
        return torch.stack(scores, 1)

    def loss(self, run, batch: dict):
        cfg, world, data = run.cfg, run.world, run.data
        G = cfg.num_generations
        units = [int(u) for u in batch["unit_ids"]]
        started = time.perf_counter()
        groups = [
            self.generate(run, data.ids[u], sample_seed(cfg.seed, run.step, u)) for u in units
        ]
        generated = time.perf_counter() - started
        # one row per completion: left-padded prompt, then the completion right-padded
        width_p = max(len(data.ids[u]) for u in units)
        width_c = max(g.shape[1] for g in groups)
        rows, masks = [], []
        for u, g in zip(units, groups):
            prompt = torch.tensor(data.ids[u], device=world.device)
            pad_p = torch.full((width_p - len(prompt),), data.pad_id, device=world.device)
            comp = torch.cat(
                [g, torch.full((G, width_c - g.shape[1]), data.pad_id, device=world.device)], 1
            )
            mask_c = completion_mask(comp, self.stop_ids)
            rows.append(torch.cat([pad_p.expand(G, -1), prompt.expand(G, -1), comp], 1))
            masks.append(
                torch.cat(
                    [
                        torch.zeros(G, len(pad_p), dtype=torch.long, device=world.device),
                        torch.ones(G, len(prompt), dtype=torch.long, device=world.device),
                        mask_c,
                    ],
                    1,
                )
            )
        input_ids, attention_mask = torch.cat(rows), torch.cat(masks)
        mask = attention_mask[:, width_p:]
        completions_ids = input_ids[:, width_p:]
        # rewards, on the decoded completions (up to their stop token)
        texts = [
            self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
            for ids, m in zip(completions_ids.cpu(), mask.cpu())
        ]
        prompts = [data.records[u]["prompt"] for u in units for _ in range(G)]
        columns = {
            k: [data.records[u].get(k) for u in units for _ in range(G)]
            for k in data.records[units[0]]
            if k != "prompt"
        }
        per_func = self.rewards(prompts, texts, columns)
        rewards = per_func.sum(1).to(world.device)
        advantages, std = group_advantages(
            rewards, G, cfg.advantage, scale=cfg.scale_rewards == "group"
        )
        # the policy's (and the reference's) log-probs of the completion tokens
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        keep = width_c + 1
        forward = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        out = run.engine.forward(**forward, logits_to_keep=keep, use_cache=False)
        logps = token_logps(out.logits[:, :-1], completions_ids, cfg.temperature)
        ref_logps = None
        if self.reference is not None:
            with (
                torch.no_grad(),
                torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=cfg.bf16),
            ):
                ref = self.reference(**forward, logits_to_keep=keep, use_cache=False).logits
            ref_logps = token_logps(ref[:, :-1], completions_ids, cfg.temperature)
        per_token, kl, clipped = policy_loss_terms(
            logps,
            logps.detach(),
            ref_logps,
            advantages=advantages,
            mask=mask,
            beta=cfg.beta,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
        )
        n = run.plan.global_size * G  # completions in the global batch
        loss = (
            summed_loss(
                per_token, mask, cfg.loss_type, max_completion_length=cfg.max_completion_length
            )
            / n
        )
        m = mask.float()
        tokens = m.sum(-1).clamp(min=1)
        stats = {
            "reward": rewards.sum() / n,
            "reward_std": std.sum() / n,  # TRL's reward_std: the mean of the groups' std
            "completion_length": m.sum() / n,
            "kl": ((kl * m).sum(-1) / tokens).sum() / n,
            "clip_fraction": (clipped.float().sum(-1) / tokens).sum() / n,
            "time/generate_s": torch.tensor(generated / world.size),
        }
        for (name, _), column in zip(self.reward_funcs, per_func.T):
            stats[f"rewards/{name}"] = column.sum() / n
        return loss, {k: float(v) for k, v in stats.items()}

    def step_times(self, run, seconds: float, stats: dict) -> dict:
        """The update's seconds: the step's (this rank's micro-batches, backward and optimizer
        step) less generation, so that time/generate_s + time/update_s is the step's compute,
        generation and update being what an RL step costs (bench/rl_bench.py reads both)."""
        return {"time/update_s": seconds / run.world.size - stats.get("time/generate_s", 0.0)}

    def describe(self, cfg) -> str:
        kl = f", beta {cfg.beta}" if cfg.beta else ""
        return f"{cfg.advantage.upper()} ({cfg.num_generations} completions per prompt{kl}), "


OBJECTIVE = GRPO()
