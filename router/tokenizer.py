"""Text <-> token ids with the model's `tokenizer.json`, and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

import tokenizers

_REPLACEMENT = "\ufffd"  # what decoding gives for bytes that are not (yet) valid UTF-8


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` loaded from a model folder."""

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        self._inner = inner

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        """The tokenizer in `model_dir/tokenizer.json`, or None when the folder has none."""
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            return None
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added by a post-processor."""
        return self._inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._inner.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into text pieces for streaming.

    Text is released only once it no longer ends in an incomplete UTF-8 character: a multi-byte
    character split over several byte tokens appears whole, in the chunk of its last byte. Each
    decode covers the ids since the last released text plus the ones before it, so tokenizers
    whose decoders depend on context (leading spaces) produce the same text as decoding at once.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context decoded before the new ids
        self._read_offset = 0  # ids before this have been released as text

    def push(self, new_ids: list[int]) -> str:
        """Adds generated ids; returns the text now complete (may be empty)."""
        self._ids.extend(new_ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Text still held back at the end of the generation (incomplete characters included)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) and not final:
            return ""
        if text.endswith(_REPLACEMENT) and not final:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix) :]
