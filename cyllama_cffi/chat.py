"""Chat messages to prompt text, with the chat template stored in the model."""

from __future__ import annotations

from typing import Mapping, Sequence

from ._ffi import ffi, lib
from .lowlevel.model import LlamaModel

__all__ = ["format_chat"]


def format_chat(model: LlamaModel, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render ``messages`` (dicts with ``role`` and ``content``) with the model's chat template.

    Uses llama.cpp's template engine (``llama_chat_apply_template``), which recognises the
    common template families. The text holds the template's special tokens as text: generate
    from it with ``parse_special=True`` (the default) so they become tokens again.
    """
    template = model.chat_template()
    if template is None:
        raise ValueError("this model has no built-in chat template")
    roles, contents = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise TypeError(f"message {index} must be a dict with str 'role' and 'content'")
        roles.append(ffi.new("char[]", message["role"].encode("utf-8")))
        contents.append(ffi.new("char[]", message["content"].encode("utf-8")))
    array = ffi.new("struct llama_chat_message[]", len(roles))
    for index, (role, content) in enumerate(zip(roles, contents)):
        array[index].role = role
        array[index].content = content
    encoded_template = template.encode("utf-8")
    size = 256 + 2 * sum(len(role) + len(content) for role, content in zip(roles, contents))
    while True:
        buffer = ffi.new("char[]", size)
        length = lib.llama_chat_apply_template(encoded_template, array, len(roles), add_generation_prompt,
                                               buffer, size)
        if length < 0:
            raise ValueError("llama.cpp does not support this model's chat template")
        if length <= size:
            return ffi.buffer(buffer, length)[:].decode("utf-8", "replace")
        size = length
