"""A checkpoint's tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, and the
chat template from ``tokenizer_config.json`` rendered with a sandboxed Jinja environment
(as Hugging Face does). Special token ids are looked up by their text, never hard-coded.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

BOS_TEXT = "<|startoftext|>"
EOT_TEXT = "<|eot_id|>"


class Tokenizer:
    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.path = directory / "tokenizer.json"
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: missing (the checkpoint has no tokenizer.json)")
        self._tok = _HFTokenizer.from_file(str(self.path))
        cfg_path = directory / "tokenizer_config.json"
        self.config: dict = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    @cached_property
    def special_texts(self) -> tuple[str, ...]:
        """The text of every special token (``<|mdm_mask|>``, ``<|endoftext|>`` ...): ``encode``
        reads such text as the token itself, wherever it stands in a string."""
        added = self._tok.get_added_tokens_decoder().values()
        return tuple(sorted({t.content for t in added if t.special}, key=lambda t: (-len(t), t)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def bos_id(self) -> int | None:
        return self.token_id(self._special("bos_token") or BOS_TEXT)

    @cached_property
    def eot_id(self) -> int | None:
        return self.token_id(EOT_TEXT)

    def _special(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = self.config.get("chat_template")
        if not template:
            raise ValueError(f"{self.path.parent}/tokenizer_config.json has no chat_template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._special("bos_token") or "", eos_token=self._special("eos_token") or "")
