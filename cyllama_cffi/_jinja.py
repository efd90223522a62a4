"""The Jinja environment a model's chat template is rendered in.

Chat templates stored in GGUF files are Hugging Face ``tokenizer_config.json`` templates, written
for ``transformers``' ``apply_chat_template``: they expect its environment, not Jinja's defaults.
So this is that environment: a sandbox that cannot change the messages it is given
(``ImmutableSandboxedEnvironment``), ``trim_blocks``/``lstrip_blocks``, the loop controls
extension (``{% break %}``), the globals ``raise_exception(message)`` and ``strftime_now(format)``,
and a ``tojson`` filter taking Hugging Face's arguments (``ensure_ascii=False``, ``indent``...)
in place of Jinja's HTML-escaping one.

jinja2 is imported on the first render, so ``import cyllama_cffi`` does not pay for it.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Optional, Sequence, Tuple

__all__ = ["render"]


def render(template: str, messages: Sequence[Any], add_generation_prompt: bool, bos_token: str,
           eos_token: str) -> str:
    """``template`` rendered with the variables Hugging Face templates read.

    Raises what Jinja raises: ``jinja2.TemplateError`` subclasses for a template that does not
    parse, an undefined name used, a sandbox violation, and for ``raise_exception(message)``
    (a plain ``jinja2.TemplateError`` carrying the template's message, as ``transformers`` does).
    """
    return _compiled(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                      bos_token=bos_token, eos_token=eos_token)


@functools.lru_cache(maxsize=32)
def _compiled(template: str) -> Any:
    # A model's template is rendered once per chat call: compile it once.
    return _environment().from_string(template)


@functools.lru_cache(maxsize=None)
def _environment() -> Any:
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.filters["tojson"] = _tojson
    return environment


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Optional[Tuple[str, str]] = None, sort_keys: bool = False) -> str:
    # Not Jinja's own tojson, which escapes <, >, & and ' for HTML and takes only ``indent``.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
