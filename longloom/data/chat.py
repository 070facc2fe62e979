"""Chat conversations -> token ids and an assistant-token mask, rendered by the tokenizer's own chat template.

Input records (one JSON object per JSONL line), either style:
- OpenAI: `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`
- ShareGPT: `{"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}`, mapped to
  system / user / assistant (the names "user" and "assistant" are accepted there too).

The conversation is rendered with the tokenizer's chat template (transformers `apply_chat_template`), so
the ids are exactly what the model sees at inference. Only assistant tokens are trained on: the mask is
True on the tokens an assistant turn produced (its content and the template's end-of-turn marker) and
False on system and user turns and on the template's role headers, which become -100 labels.

Finding the assistant tokens, two ways:
- the template marks them with `{% generation %}` ... `{% endgeneration %}`: transformers computes the
  mask itself (`return_assistant_tokens_mask=True`); the template author said what to train on.
- otherwise (most templates): render the conversation up to each assistant turn with the generation
  prompt, and up to the end of that turn; the text between the two is the turn's answer. The text
  spans are mapped to tokens through the fast tokenizer's character offsets of ONE tokenization of the
  whole conversation, so token merges across a turn boundary cannot shift the mask (rendering prefixes
  and diffing separately tokenized ids would). Templates whose earlier text changes when a turn is
  added (some drop reasoning of earlier turns) are refused with the reason: their prefixes are not
  what the model sees in the full conversation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longloom.data.tokenize import HFTokenizer

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def conversation_messages(record: Any, where: str) -> list[dict[str, str]]:
    """The [{role, content}] messages of one record (OpenAI or ShareGPT style); ValueError naming `where`."""
    if not isinstance(record, dict):
        raise ValueError(  # noqa: TRY004 - a user's data, reported like every other error
            f"{where} is a JSON {type(record).__name__}, not an object with 'messages' (OpenAI style) or "
            "'conversations' (ShareGPT style): one conversation per line"
        )
    if "messages" in record:
        turns, role_key, content_key, roles = record["messages"], "role", "content", {r: r for r in ROLES}
        field = "messages"
    elif "conversations" in record:
        turns, role_key, content_key, roles = record["conversations"], "from", "value", SHAREGPT_ROLES
        field = "conversations"
    else:
        keys = ", ".join(map(repr, record)) or "none"
        raise ValueError(
            f"{where} has neither 'messages' (OpenAI style: [{{role, content}}]) nor 'conversations' (ShareGPT "
            f"style: [{{from, value}}]); its keys: {keys}. Convert the line to one of them"
        )
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of turns, got {turns!r:.80}")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise ValueError(
                f"{where}: {field}[{number}] = {turn!r:.80} must be an object with {role_key!r} and "
                f"{content_key!r}"
            )
        role, content = turn[role_key], turn[content_key]
        if role not in roles:
            raise ValueError(
                f"{where}: {field}[{number}] has {role_key} {role!r}, not one of {', '.join(map(repr, roles))}: "
                "rename the role (tool calls and other roles are not supported)"
            )
        if not isinstance(content, str):
            raise ValueError(  # noqa: TRY004 - a user's data, reported like every other error
                f"{where}: {field}[{number}].{content_key} is {type(content).__name__}, not text: "
                "multi-part contents must be joined into one string"
            )
        messages.append({"role": roles[role], "content": content})
    return messages


@dataclass
class RenderedConversation:
    ids: np.ndarray  # int32 [n]
    assistant_mask: np.ndarray  # bool [n]: True on tokens an assistant turn produced


class ChatRenderer:
    """Renders conversations with the chat template of a local Hugging Face tokenizer folder."""

    def __init__(self, tokenizer: str | Path):
        self.tokenizer = HFTokenizer(tokenizer) if str(tokenizer) != "bytes" else None
        if self.tokenizer is None:
            raise ValueError(
                "--format chat needs a Hugging Face tokenizer with a chat template: pass --tokenizer "
                "<local tokenizer folder> (the byte tokenizer has no chat template)"
            )
        # The transformers tokenizer behind HFTokenizer (loaded with its no-custom-code rules).
        self.hf = hf = self.tokenizer._tokenizer
        template = hf.chat_template
        if not template:
            raise ValueError(
                f"tokenizer {self.tokenizer.name!r} has no chat template (no chat_template in "
                "tokenizer_config.json, no chat_template.jinja): use the tokenizer of a chat/instruct model, "
                "or add the template to its folder"
            )
        if not isinstance(template, str):
            raise ValueError(  # noqa: TRY004 - a user's data, reported like every other error
                f"tokenizer {self.tokenizer.name!r} has several named chat templates "
                f"({', '.join(sorted(template))}): keep the one to train with as its 'default'"
            )
        if not hf.is_fast:
            raise ValueError(
                f"tokenizer {self.tokenizer.name!r} is a slow (Python) tokenizer: assistant masks need token "
                "offsets; use a folder with a tokenizer.json (a fast tokenizer)"
            )
        self.uses_generation_tags = GENERATION_TAG.search(template) is not None
        self.name, self.eos_id, self.vocab_size = (
            self.tokenizer.name,
            self.tokenizer.eos_id,
            self.tokenizer.vocab_size,
        )

    def render(self, messages: list[dict[str, str]], where: str) -> RenderedConversation:
        """Token ids of the whole conversation and its assistant mask (see the module docstring)."""
        if self.uses_generation_tags:
            encoded = self._apply_template(
                messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = np.asarray(encoded["input_ids"], dtype=np.int32)
            return RenderedConversation(ids, np.asarray(encoded["assistant_masks"], dtype=bool))
        text = self._render_text(messages, add_generation_prompt=False, where=where)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render_text(messages[:index], add_generation_prompt=True, where=where)
            through = self._render_text(messages[: index + 1], add_generation_prompt=False, where=where)
            for prefix in (before, through):
                if not text.startswith(prefix):
                    raise ValueError(
                        f"{where}: the chat template of {self.name!r} renders the conversation up to turn {index} "
                        "differently from the same turns inside the whole conversation (it rewrites earlier turns), "
                        "so assistant tokens cannot be located: add {% generation %} ... {% endgeneration %} "
                        "around the assistant content in the template"
                    )
            spans.append((len(before), len(through)))
        encoded = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for start, stop in spans:
            mask |= (starts >= start) & (starts < stop)
        return RenderedConversation(ids, mask)

    def _render_text(self, messages: list[dict[str, str]], add_generation_prompt: bool, where: str) -> str:
        return self._apply_template(
            messages, where, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _apply_template(self, messages: list[dict[str, str]], where: str, **options: Any) -> Any:
        try:
            return self.hf.apply_chat_template(messages, **options)
        except Exception as error:  # noqa: BLE001 - jinja raises its own kinds (TemplateError, TypeError)
            raise ValueError(
                f"{where}: the chat template of {self.name!r} refused the conversation "
                f"({type(error).__name__}: {error}); fix the conversation (e.g. the order of roles the template "
                "expects) or the template"
            ) from None
