"""The OpenAI API's response bodies: each choice's text as it grows, its logprobs, and the
JSON of completions, chat completions and their streamed chunks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


class TextStream:
    """A choice's text, handed out in pieces as its tokens arrive.

    The text is always the decode of all tokens so far (so streamed pieces add up to what the
    non-streaming answer says). A piece holds back what may still change: a trailing
    U+FFFD (a character whose UTF-8 bytes are split across tokens) and an end of the text
    that could begin a stop string (the runtime cuts the text before a stop string it finds)."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.sent = ""  # text handed out so far

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def piece(self, token_ids: list[int]) -> str:
        """The new text that is safe to hand out, given all of the choice's tokens so far."""
        text = self._decode(token_ids)
        if not text.startswith(self.sent):  # a tokenizer whose text is not prefix-stable: wait for the end
            return ""
        end = len(text)
        while end > len(self.sent) and text[end - 1] == "\ufffd":
            end -= 1
        for stop in self.stop:
            for k in range(min(len(stop) - 1, end - len(self.sent)), 0, -1):
                if text[end - k:end] == stop[:k]:
                    end -= k
                    break
        piece, self.sent = text[len(self.sent):end], text[:end]
        return piece

    def last_piece(self, token_ids: list[int], final_text: str | None) -> str:
        """The rest of the text once the choice is done (`final_text`: where a stop string cut it)."""
        text = final_text if final_text is not None else self._decode(token_ids)
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return piece


@dataclass
class Choice:
    """One choice as the handler collects it."""

    index: int
    text: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None

    def add(self, token_ids: list[int], logprobs: list[float] | None, top: list[dict[int, float]] | None) -> None:
        self.token_ids += token_ids
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + logprobs
            self.top_logprobs = (self.top_logprobs or []) + (top or [])


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[float], top: list[dict[int, float]],
                        offset: int) -> dict:
    """The completions API's `logprobs` object; `offset`: text length before these tokens."""
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
            "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in alternatives.items()} for alternatives in top]}


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[float], top: list[dict[int, float]]) -> dict:
    """The chat API's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    def entry(token_id: int, logprob: float) -> dict:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alternatives.items()]}
                        for t, lp, alternatives in zip(token_ids, logprobs, top)]}


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


class Formatter:
    """Makes one response's JSON: the whole answer, or its stream's chunks (`chat` picks the
    chat completions shape over the completions one)."""

    def __init__(self, model: str, chat: bool, tokenizer, return_token_ids: bool):
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.chat = chat
        self.tokenizer = tokenizer
        self.return_token_ids = return_token_ids

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, choice: Choice, token_ids: list[int], logprobs: list[float] | None,
                  top: list[dict[int, float]] | None, offset: int) -> dict | None:
        if logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, token_ids, logprobs, top or [])
        return completion_logprobs(self.tokenizer, token_ids, logprobs, top or [], offset)

    def response(self, choices: list[Choice], num_prompt_tokens: int) -> dict:
        out = []
        for choice in choices:
            entry = {"index": choice.index, "finish_reason": choice.finish_reason,
                     "logprobs": self._logprobs(choice, choice.token_ids, choice.logprobs, choice.top_logprobs, 0)}
            if self.chat:
                entry["message"] = {"role": "assistant", "content": choice.text.sent}
            else:
                entry["text"] = choice.text.sent
            if self.return_token_ids:
                entry["token_ids"] = choice.token_ids
            out.append(entry)
        body = self._envelope(out, chunk=False)
        body["usage"] = usage(num_prompt_tokens, sum(len(c.token_ids) for c in choices))
        return body

    def chunk(self, choice: Choice, piece: str, token_ids: list[int], logprobs: list[float] | None,
              top: list[dict[int, float]] | None, offset: int, finish_reason: str | None) -> dict:
        """One streamed chunk of one choice: its new text (`offset`: the text's length before it)."""
        entry = {"index": choice.index, "finish_reason": finish_reason,
                 "logprobs": self._logprobs(choice, token_ids, logprobs, top, offset)}
        if self.chat:
            entry["delta"] = {"content": piece} if piece or finish_reason is None else {}
        else:
            entry["text"] = piece
        if self.return_token_ids:
            entry["token_ids"] = token_ids
        return self._envelope([entry], chunk=True)

    def role_chunk(self, index: int) -> dict:
        """The chat stream's first chunk of a choice: the assistant's role."""
        return self._envelope([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}], chunk=True)

    def usage_chunk(self, num_prompt_tokens: int, num_completion_tokens: int) -> dict:
        body = self._envelope([], chunk=True)
        body["usage"] = usage(num_prompt_tokens, num_completion_tokens)
        return body
