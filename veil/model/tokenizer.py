"""Text ↔ token ids, and the chat template of instruct models (a thin layer over HF tokenizers)."""

from __future__ import annotations

from pathlib import Path

from veil.errors import CheckpointError, InputError


class Tokenizer:
    """The HF tokenizer saved beside a checkpoint."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer  # local: loading transformers costs ~1 s

        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: cannot load the tokenizer ({exc})") from None

    @staticmethod
    def present(folder: Path) -> bool:
        return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def chat(self, user_message: str, system: str | None = None) -> list[int]:
        """Token ids of a one-turn conversation, ending where the assistant's reply begins."""
        if not self.has_chat_template:
            raise InputError("this model has no chat template; generate without --chat")
        messages = ([{"role": "system", "content": system}] if system else [])
        messages.append({"role": "user", "content": user_message})
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
