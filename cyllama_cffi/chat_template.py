"""Chat messages to prompt text, the way cyllama renders them.

Three ways, tried in this order (:func:`apply_chat_template`):

1. The model's own template (``tokenizer.chat_template``) rendered with Jinja, in the
   environment Hugging Face templates are written for (:mod:`cyllama_cffi._jinja`). This is
   the text the model was trained on, default system prompt and all.
2. llama.cpp's template engine (``llama_chat_apply_template``), which knows the common
   template families by name or by their markers, without Jinja. Used when the Jinja render
   fails (the template's ``raise_exception``, e.g. Gemma's "System role not supported", or an
   error in it), and when a ``template`` is asked for: a template stored in the model under
   ``tokenizer.chat_template.<name>``, a built-in name (``"chatml"``, ``"llama3"``, ``"gemma"``
   ... see :func:`builtin_templates`), or a template text. A Jinja text llama.cpp does not
   recognise is rendered with Jinja instead (cyllama raises there).
3. A model without any template gets plain ``"User: ...\\n\\nAssistant:"`` text.

The text holds the template's special tokens as text (``<|im_start|>``...): ``LLM.chat``
tokenizes it with ``parse_special=True`` so they become tokens again.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ._ffi import ffi, lib
from .errors import ChatTemplateError
from .lowlevel.model import LlamaModel

__all__ = ["apply_chat_template", "get_chat_template", "builtin_templates", "format_messages_simple"]

Message = Mapping[str, Any]

_log = logging.getLogger("cyllama_cffi")

# What a Jinja render may fail with and still be worth llama.cpp's try (cyllama's list): a
# TemplateError (raise_exception, syntax, undefined names, the sandbox), and the errors of a
# template meeting data it did not expect. Anything else is a bug to see, not to hide.
_RENDER_ERRORS = (TypeError, KeyError, AttributeError)


def apply_chat_template(model: LlamaModel, messages: Sequence[Message], template: Optional[str] = None,
                        add_generation_prompt: bool = True) -> str:
    """``messages`` (dicts with ``role`` and ``content``) as the prompt text of ``model``'s chat format.

    ``template``: None for the model's own template; else a template stored in the model by
    name, a llama.cpp built-in name, or a template text (see the module docstring for the
    order). ``add_generation_prompt`` ends the text with the assistant's turn opener.

    A message that is not a dict, or has no ``role`` or ``content``, raises ``TypeError`` /
    ``ValueError`` naming its index; a template nothing can render raises
    :class:`~cyllama_cffi.errors.ChatTemplateError`.
    """
    checked = _checked(messages)
    if template is not None and not isinstance(template, str):
        raise TypeError(f"template must be a str or None, got {type(template).__name__}")
    if template:  # "" is the model's own, as in cyllama
        return _asked_for(model, template, checked, add_generation_prompt)
    own = model.chat_template()
    if own is None:
        return format_messages_simple(checked, add_generation_prompt)
    try:
        return _render_jinja(model, own, checked, add_generation_prompt)
    except Exception as error:
        if not _renders_elsewhere(error):
            raise
        text = _render_llama_cpp(own, checked, add_generation_prompt)
        if text is None:
            raise ChatTemplateError(f"the model's chat template could not render these messages ({error}), "
                                    "and llama.cpp's template engine does not know it") from error
        _log.warning("the model's chat template could not render these messages (%s); "
                     "using llama.cpp's rendering of it", error)
        return text


def text_after_answer(model: LlamaModel, template: Optional[str] = None) -> str:
    """What the chat format puts between an assistant's answer and the next user message's text
    (ChatML: ``"<|im_end|>\n<|im_start|>user\n"``); "" when it cannot tell.

    Read off a rendering of a probe conversation: a template that renders an answer differently
    (trims, reformats, refuses the probe) gives "" rather than a guess.
    """
    answer, question = "zqxAnswer7", "zqxQuestion9"
    probe = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": answer},
             {"role": "user", "content": question}]
    try:
        text = apply_chat_template(model, probe, template, add_generation_prompt=False)
    except Exception:  # a template that cannot render the probe: nothing to read off
        return ""
    start, end = text.find(answer), text.find(question)
    if start < 0 or end < 0 or text.count(answer) != 1 or end < start + len(answer):
        return ""
    return text[start + len(answer):end]


def get_chat_template(model: LlamaModel, template_name: Optional[str] = None) -> str:
    """The template text stored in ``model`` (``tokenizer.chat_template[.<name>]``), "" when none."""
    return model.chat_template(template_name or None) or ""


def builtin_templates() -> List[str]:
    """The template names llama.cpp's engine knows (``"chatml"``, ``"llama3"``, ``"gemma"``...)."""
    count = lib.llama_chat_builtin_templates(ffi.NULL, 0)
    names = ffi.new("char *[]", count)
    lib.llama_chat_builtin_templates(names, count)
    return [ffi.string(name).decode("utf-8") for name in names]


def format_messages_simple(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """cyllama's text for a model without a chat template: ``"User: hi\\n\\nAssistant:"``.

    Each message as ``Role: content`` (System, User, Assistant, other roles capitalised),
    separated by a blank line; ``add_generation_prompt`` appends ``"\\n\\nAssistant:"``.
    """
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    parts = [f"{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    text = "\n\n".join(parts)
    return text + "\n\nAssistant:" if add_generation_prompt else text


# -- the three renderers ----------------------------------------------------------------------

def _asked_for(model: LlamaModel, template: str, messages: List[Dict[str, Any]], add_generation_prompt: bool) -> str:
    """The rendering for an explicit ``template``: stored name, built-in name or text."""
    # tokenizer.chat_template.<template>; a NUL would cut the key short in C
    text = model.chat_template(template) if "\0" not in template else None
    text = text if text is not None else template
    rendered = _render_llama_cpp(text, messages, add_generation_prompt)
    if rendered is not None:
        return rendered
    if "{{" in text or "{%" in text:
        try:
            return _render_jinja(model, text, messages, add_generation_prompt)
        except Exception as error:
            if not _renders_elsewhere(error):
                raise
            raise ChatTemplateError(f"the chat template could not render these messages: {error}") from error
    raise ChatTemplateError(f"unknown chat template {template!r}: not a template stored in the model, not a Jinja "
                            f"template, nor one of llama.cpp's: {', '.join(builtin_templates())}")


def _render_jinja(model: LlamaModel, template: str, messages: List[Dict[str, Any]], add_generation_prompt: bool) -> str:
    from ._jinja import render

    vocab = model.vocab
    return render(template, messages, add_generation_prompt, _token_text(vocab, vocab.bos), _token_text(vocab, vocab.eos))


def _render_llama_cpp(template: str, messages: List[Dict[str, Any]], add_generation_prompt: bool) -> Optional[str]:
    """llama.cpp's rendering, or None when its engine does not know ``template``."""
    keep = []  # the C strings, alive until the call returns
    array = ffi.new("struct llama_chat_message[]", len(messages))
    for index, message in enumerate(messages):
        role, content = message["role"], str(message["content"])
        if "\0" in role or "\0" in content:  # a C string would end there, silently
            raise ValueError(f"Message at index {index} contains a NUL character, which llama.cpp's "
                             "template engine cannot take")
        keep += [ffi.new("char[]", role.encode("utf-8")), ffi.new("char[]", content.encode("utf-8"))]
        array[index].role, array[index].content = keep[-2], keep[-1]
    if "\0" in template:
        raise ValueError("the chat template contains a NUL character")
    encoded = template.encode("utf-8")
    size = 256 + 2 * sum(len(message["role"]) + len(str(message["content"])) for message in messages)
    while True:
        buffer = ffi.new("char[]", size)
        length = lib.llama_chat_apply_template(encoded, array, len(messages), add_generation_prompt, buffer, size)
        if length < 0:
            return None
        if length <= size:
            return ffi.buffer(buffer, length)[:].decode("utf-8", "replace")
        size = length


# -- helpers ----------------------------------------------------------------------------------

def _checked(messages: Sequence[Message]) -> List[Dict[str, Any]]:
    """The messages as plain dicts, each with a str ``role`` and a ``content``; else cyllama's errors."""
    if isinstance(messages, (str, bytes, Mapping)) or not hasattr(messages, "__iter__"):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"Message at index {index} must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not role or not isinstance(role, str):
            raise ValueError(f"Message at index {index} missing or invalid 'role': {message!r}")
        if message.get("content") is None:
            raise ValueError(f"Message at index {index} missing 'content' key")
        checked.append(dict(message))  # templates may read other keys (tool_calls, name...)
    return checked


def _renders_elsewhere(error: Exception) -> bool:
    """Whether a Jinja render's ``error`` leaves the other renderers a chance (see ``_RENDER_ERRORS``)."""
    import jinja2

    return isinstance(error, (jinja2.TemplateError,) + _RENDER_ERRORS)


def _token_text(vocab: Any, token: int) -> str:
    """The text a template writes for a special token (``bos_token``, ``eos_token``); "" for none."""
    if not 0 <= token < vocab.n_tokens:
        return ""
    return vocab.token_to_bytes(token, special=True).decode("utf-8", "replace")
