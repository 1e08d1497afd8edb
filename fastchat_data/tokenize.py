"""Conversation -> input_ids and labels with assistant-only loss masks, exact by construction.

How: the template renders Segments; text between special tokens is tokenized in one batched
call (the same work as tokenizing the rendered text, which is the floor this is measured
against); the labels come from character offsets: a token is trained when it covers text of a
trainable segment. No token counts are re-derived from substrings (FastChat's `-2`), so no
conversation can be "mismatched".

Special tokens come only from template text. Message text is encoded with the backend's
`encode_special_tokens` set, so a user typing `</s>` or `<|im_end|>` gets the characters, never
the id.
"""

from __future__ import annotations

import gc
import json
import re
import warnings
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from tokenizers import Tokenizer

from .schema import ASSISTANT, USER, Conversation, DataError, Message, SkipRecord, check_count
from .templates import EOS, Segment, get_template, special_tokens

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: str = ""  # "" or what was cut: "source", "target", "max_length" (comma-joined)


def _without_first_prepend(config: dict) -> bool:
    """Turn Metaspace's prepend_scheme "first" into "never", wherever it sits. True if changed."""
    changed = False
    if isinstance(config, dict):
        if config.get("type") == "Metaspace" and config.get("prepend_scheme") == "first":
            config["prepend_scheme"] = "never"
            changed = True
        for v in config.values():
            changed |= _without_first_prepend(v)
    elif isinstance(config, list):
        for v in config:
            changed |= _without_first_prepend(v)
    return changed


@dataclass(slots=True)
class _Piece:
    text: str
    spans: list[tuple[int, int]]  # trainable character ranges within text
    continuation: bool  # follows a special token inside the rendered text
    encoding: object = None  # the backend's Encoding, once tokenized


class ConversationTokenizer:
    """Tokenizes conversations for training: `encode_batch(convs)` -> [Encoded | SkipRecord]."""

    def __init__(
        self,
        tokenizer,
        template: str | object,
        max_length: int | None = None,
        *,
        train_on_inputs: bool = False,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
    ):
        limits = {
            "--max_length": max_length,
            "--max_source_length": max_source_length,
            "--max_target_length": max_target_length,
        }
        for flag, value in limits.items():
            check_count(flag, value, allow_none=True)
        self.tokenizer = tokenizer
        self.template = (
            get_template(template, tokenizer) if isinstance(template, str | dict) else template
        )
        sep2 = getattr(self.template, "sep2", "")
        if EOS in sep2 and not tokenizer.eos_token:
            raise DataError(
                f"template {self.template.name}",
                "sep2",
                f"ends each reply with the tokenizer's end token ({EOS}), but this tokenizer "
                "has none: give the tokenizer an eos_token, or use a template file whose sep2 "
                "has no {eos}",
            )
        self.max_length = max_length
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.train_on_inputs = train_on_inputs
        self.eos = tokenizer.eos_token
        names = special_tokens(tokenizer)
        self._special_re = (
            re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        )
        self._special_id = {n: tokenizer.convert_tokens_to_ids(n) for n in names}
        self._splits: dict[str, tuple[str, ...]] = {}
        config = json.loads(tokenizer.backend_tokenizer.to_str())
        self._first = self._backend(config)
        # Text after a special token is not the start of the text: a Metaspace "first" tokenizer
        # (Llama, legacy=False) prepends no "▁" there when it tokenizes the whole string.
        _without_first_prepend(config)
        self._cont = self._backend(config)
        self._prefix = (
            self._leading_special_ids() if getattr(self.template, "add_bos", False) else []
        )
        self.boundary_splits = 0  # pieces re-tokenized because a token straddled a mask boundary
        self._tag_tokens = self._assistant_tag_tokens() if max_source_length else 0
        self.matches_tokenizer = self._self_check()
        if max_length is not None:
            self.check_budget(max_length)
        if not self.matches_tokenizer:
            warnings.warn(
                f"{type(tokenizer).__name__}: tokenizing text piece by piece differs from "
                "tokenizing "
                "the rendered string whole; masks stay exact, ids may differ from tokenizer(text)",
                stacklevel=2,
            )

    @staticmethod
    def _backend(config: dict) -> Tokenizer:
        backend = Tokenizer.from_str(json.dumps(config))
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True
        return backend

    @property
    def prefix_ids(self) -> list[int]:
        """The special tokens put first (the BOS a template with add_bos asks for)."""
        return self._prefix

    def _leading_special_ids(self) -> list[int]:
        full = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        bare = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        n = len(full) - len(bare)
        return list(full[:n]) if n > 0 and full[n:] == bare else []

    def prompt_tokens(self) -> int | None:
        """The fewest tokens the template puts before a first reply: a one-word exchange with
        the template's own system prompt or a one-letter one of the data's (which replaces it).
        No conversation can train on anything within a budget this small."""
        counts = []
        for system in ("", "x"):
            probe = Conversation("probe", [Message(USER, "x"), Message(ASSISTANT, "x")], system)
            try:
                segments = self.template.render(probe, self.eos)
            except SkipRecord:  # a chat template that refuses the probe: nothing to measure
                continue
            _, labels = self._encode_segments([segments])[0]
            counts += [
                next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
            ]
        return min(counts, default=None)

    def check_budget(self, max_length: int, flag: str = "max_length") -> None:
        """A DataError when `max_length` leaves no room for any reply after the prompt."""
        before = self.prompt_tokens()
        if before is not None and max_length <= before:
            name = getattr(self.template, "name", "custom")
            raise DataError(
                f"{flag} {max_length}",
                f"template {name}",
                f"too small: the template puts at least {before} tokens before the first reply, "
                "so nothing would be trained",
            )

    def _self_check(self) -> bool:
        text = "Hi there" + (self.eos or "") + "USER: again \n and  more"
        ids, _ = self._encode_segments([[Segment(text, literal=True)]])[0]
        return ids == list(self.tokenizer(text, add_special_tokens=bool(self._prefix))["input_ids"])

    def _assistant_tag_tokens(self) -> int:
        """Tokens the template puts between the last user message and the reply
        ("ASSISTANT:", "<|im_start|>assistant\n"): source truncation keeps them."""
        probe = Conversation(id="probe", system="", messages=[Message(USER, "x")])
        with_tag = self._encode_segments([self.template.generation_prompt(probe, self.eos)])[0][0]
        without = self._encode_segments([self.template.render(probe, self.eos)])[0][0]
        return max(len(with_tag) - len(without), 0)

    def _truncate_turns(self, ids: list[int], labels: list[int]) -> tuple[list, list, list]:
        """Per-turn limits, as QLoRA recipes set them: every run of untrained tokens (a prompt:
        template, system, user message) keeps at most max_source_length tokens, its head and
        the assistant tag that ends it; every run of trained tokens (a reply) keeps its first
        max_target_length tokens. Returns ids, labels and what was cut."""
        out_ids, out_labels, cut = [], [], []
        start = 0
        while start < len(ids):
            trained = labels[start] != IGNORE_INDEX
            end = start
            while end < len(ids) and (labels[end] != IGNORE_INDEX) == trained:
                end += 1
            limit = self.max_target_length if trained else self.max_source_length
            keep = list(range(start, end))
            if limit is not None and end - start > limit:
                if trained:
                    keep = keep[:limit]
                else:
                    tail = min(self._tag_tokens, limit) if end < len(ids) else 0
                    keep = keep[: limit - tail] + (keep[len(keep) - tail :] if tail else [])
                cut.append("target" if trained else "source")
            out_ids += [ids[i] for i in keep]
            out_labels += [labels[i] for i in keep]
            start = end
        return out_ids, out_labels, cut

    # -- segments -> pieces -> ids ---------------------------------------------------------
    def _split_specials(self, text: str) -> tuple[str, ...]:
        """Template text split around special tokens (odd items). Template texts repeat in
        every conversation, so the splits are memoized."""
        chunks = self._splits.get(text)
        if chunks is None:
            chunks = tuple(self._special_re.split(text)) if self._special_re else (text,)
            if len(self._splits) < 10_000:
                self._splits[text] = chunks
        return chunks

    def _plan(self, segments: list[Segment]) -> list:
        """Flatten segments into items: ([ids], trainable) for special tokens, _Piece for text."""
        items, parts, spans, pos, continuation = [], [], [], 0, False

        def close():
            nonlocal parts, spans, pos
            if parts:
                items.append(_Piece("".join(parts), spans, continuation))
            parts, spans, pos = [], [], 0

        for seg in segments:
            chunks = self._split_specials(seg.text) if seg.literal else (seg.text,)
            for k, chunk in enumerate(chunks):
                if k % 2:  # a special token
                    close()
                    items.append(([self._special_id[chunk]], seg.trainable))
                    continuation = True
                elif chunk:
                    if seg.trainable:
                        if spans and spans[-1][1] == pos:
                            spans[-1] = (spans[-1][0], pos + len(chunk))
                        else:
                            spans.append((pos, pos + len(chunk)))
                    parts.append(chunk)
                    pos += len(chunk)
        close()
        return items

    def _encode_segments(self, batch: list[list[Segment]]) -> list[tuple[list[int], list[int]]]:
        plans = [self._plan(segs) for segs in batch]
        pieces = [it for plan in plans for it in plan if isinstance(it, _Piece)]
        first = [p for p in pieces if not p.continuation]
        cont = [p for p in pieces if p.continuation]
        for group, backend in ((first, self._first), (cont, self._cont)):
            if group:
                encodings = backend.encode_batch([p.text for p in group], add_special_tokens=False)
                for p, enc in zip(group, encodings):
                    p.encoding = enc
        results = []
        for plan in plans:
            ids, labels = list(self._prefix), [IGNORE_INDEX] * len(self._prefix)
            for it in plan:
                if isinstance(it, _Piece):
                    pids, plabels = self._label_piece(it, it.encoding)
                    ids += pids
                    labels += plabels
                else:
                    tok_ids, trainable = it
                    ids += tok_ids
                    labels += (
                        tok_ids
                        if (trainable or self.train_on_inputs)
                        else [IGNORE_INDEX] * len(tok_ids)
                    )
            results.append((ids, labels))
        return results

    def _label_piece(self, piece: _Piece, encoding) -> tuple[list[int], list[int]]:
        ids = encoding.ids
        if self.train_on_inputs:
            return ids, list(ids)
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in piece.spans:
            bounds = self._token_range(encoding, s, e, n=len(ids))
            if bounds is None:
                return self._split_at_boundaries(piece)
            i0, i1 = bounds
            labels[i0:i1] = ids[i0:i1]
        return ids, labels

    @staticmethod
    def _token_range(encoding, s: int, e: int, *, n: int) -> tuple[int, int] | None:
        """Tokens covering characters [s, e), or None if a token straddles s or e.

        Asks the Rust encoding about the two boundary characters only: converting every
        token's offsets to Python would cost more than the tokenization itself."""
        i0, last = encoding.char_to_token(s), encoding.char_to_token(e - 1)
        if i0 is None or last is None:  # a boundary character no token covers: use all offsets
            offsets = encoding.offsets
            i0 = bisect_right(offsets, s, key=lambda o: o[1])  # first token ending after s
            i1 = bisect_left(offsets, e, key=lambda o: o[0])  # first token starting at/after e
        else:
            i1 = last + 1
            while (
                i1 < n and encoding.token_to_chars(i1)[0] < e
            ):  # byte-fallback tokens share a char
                i1 += 1
        if i0 < i1 and (
            encoding.token_to_chars(i0)[0] < s or encoding.token_to_chars(i1 - 1)[1] > e
        ):
            return None
        return i0, i1

    def _split_at_boundaries(self, piece: _Piece) -> tuple[list[int], list[int]]:
        """A token straddles a mask boundary (rare: e.g. "\\n" + "\\n\\nreply" merging into one
        whitespace token). Tokenize the parts separately so the boundary is a token boundary."""
        self.boundary_splits += 1
        cuts = sorted({0, len(piece.text), *(c for span in piece.spans for c in span)})
        ids, labels = [], []
        for a, b in zip(cuts, cuts[1:]):
            backend = self._cont if (a > 0 or piece.continuation) else self._first
            part = backend.encode(piece.text[a:b], add_special_tokens=False).ids
            trainable = any(s <= a and b <= e for s, e in piece.spans)
            ids += part
            labels += part if trainable else [IGNORE_INDEX] * len(part)
        return ids, labels

    # -- public ----------------------------------------------------------------------------
    def encode_batch(self, convs: list[Conversation]) -> list[Encoded | SkipRecord]:
        # Many small objects and no cycles: the cyclic GC would only rescan them (~30% here).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._encode_batch(convs)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _encode_batch(self, convs: list[Conversation]) -> list[Encoded | SkipRecord]:
        rendered: list[list[Segment] | SkipRecord] = []
        for conv in convs:
            try:
                rendered.append(self.template.render(conv, self.eos))
            except SkipRecord as e:
                rendered.append(e)
        ok = [r for r in rendered if not isinstance(r, SkipRecord)]
        it = iter(self._encode_segments(ok))
        out: list[Encoded | SkipRecord] = []
        for r in rendered:
            if isinstance(r, SkipRecord):
                out.append(r)
                continue
            ids, labels = next(it)
            cut = []
            if self.max_source_length or self.max_target_length:
                ids, labels, cut = self._truncate_turns(ids, labels)
            if self.max_length is not None and len(ids) > self.max_length:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                cut.append("max_length")
            truncated = ",".join(sorted(set(cut)))
            if labels.count(IGNORE_INDEX) == len(labels):
                why = "no_trainable_tokens_after_truncation" if truncated else "no_trainable_tokens"
                out.append(SkipRecord(why, f"{len(ids)} tokens, none of them an assistant reply"))
                continue
            out.append(Encoded(ids, labels, truncated))
        return out

    def encode(self, conv: Conversation) -> Encoded:
        (result,) = self.encode_batch([conv])
        if isinstance(result, SkipRecord):
            raise result
        return result

    def encode_prompt(self, conv: Conversation) -> list[int]:
        """Ids that ask the model for the next assistant reply (for chat and evaluation)."""
        ((ids, _),) = self._encode_segments([self.template.generation_prompt(conv, self.eos)])
        return ids

    def render_text(self, conv: Conversation) -> str:
        return "".join(s.text for s in self.template.render(conv, self.eos))
