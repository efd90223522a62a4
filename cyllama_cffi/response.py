"""``Response`` and ``GenerationStats``: the result of a non-streaming call.

A ``Response`` behaves like its text for ``str()``, ``==``, ``len``, ``in``
and ``+``, so code that expected a plain string keeps working, while the
measured statistics and the finish reason travel with it.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:
    from ._logprobs import TokenLogprob

__all__ = ["FinishReason", "GenerationStats", "Response"]


class FinishReason(str, enum.Enum):
    """Why a generation ended. A ``str``, so ``reason == "stop"`` holds as well."""

    STOP = "stop"            # the model's end-of-generation token, or a stop sequence
    LENGTH = "length"        # max_tokens reached, or the context is full
    CANCELLED = "cancelled"  # cancel(), Ctrl-C, the stream closed or abandoned
    ERROR = "error"          # an exception ended it (it propagated to the consumer)

    def __str__(self) -> str:
        return self.value


@dataclass
class GenerationStats:
    """Counts and timings of one generation (all measured, none estimated).

    The positional order is cyllama's: ``GenerationStats(prompt_tokens, generated_tokens,
    total_time, tokens_per_second, prompt_time=0.0, generation_time=0.0)``. Times are seconds;
    ``tokens_per_second`` counts the generated tokens over ``generation_time``.
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    total_time: float = 0.0
    tokens_per_second: float = 0.0
    prompt_time: float = 0.0
    generation_time: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Response:
    """Generated text plus ``stats``, ``finish_reason`` (a :class:`FinishReason`) and ``model``.

    ``Response(text, stats=None, finish_reason="stop", model="", logprobs=None)``: ``stats``
    stays None when not given (the LLM always gives them); ``model`` is the model path as given
    to the LLM. ``logprobs`` is a list with a :class:`~cyllama_cffi.TokenLogprob` per generated
    token when the config asked for them (``GenerationConfig(logprobs=n)``), else None.
    """

    __slots__ = ("text", "stats", "finish_reason", "model", "logprobs")

    def __init__(self, text: str, stats: Optional[GenerationStats] = None,
                 finish_reason: str = "stop", model: str = "",
                 logprobs: Optional[List["TokenLogprob"]] = None) -> None:
        self.text = text
        self.stats = stats
        self.finish_reason = finish_reason
        self.model = model
        self.logprobs = logprobs

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        preview = self.text[:50] + "..." if len(self.text) > 50 else self.text
        return f"Response(text={preview!r}, finish_reason={str(self.finish_reason)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Response):
            return self.text == other.text
        if isinstance(other, str):
            return self.text == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.text)

    def __len__(self) -> int:
        return len(self.text)

    def __contains__(self, item: str) -> bool:
        return item in self.text

    def __add__(self, other: object) -> str:
        if isinstance(other, (str, Response)):
            return self.text + str(other)
        return NotImplemented

    def __radd__(self, other: object) -> str:
        if isinstance(other, str):
            return other + self.text
        return NotImplemented

    def __iter__(self):
        return iter(self.text)

    def __getitem__(self, index):
        return self.text[index]

    def to_dict(self) -> Dict[str, Any]:
        """``text``, ``finish_reason`` (a plain str) and ``model``; ``stats`` and ``logprobs`` when there are some.

        ``logprobs`` is a list of dicts in the shape of OpenAI's chat ``logprobs.content``
        (see :meth:`TokenLogprob.to_dict <cyllama_cffi.TokenLogprob.to_dict>`).
        """
        data: Dict[str, Any] = {"text": self.text, "finish_reason": str(self.finish_reason), "model": self.model}
        if self.stats is not None:
            data["stats"] = self.stats.to_dict()
        if self.logprobs is not None:
            data["logprobs"] = [entry.to_dict() for entry in self.logprobs]
        return data

    def to_json(self, indent: Optional[int] = None, **kwargs: Any) -> str:
        """``to_dict()`` as JSON; ``indent`` and other keywords go to ``json.dumps``."""
        import json  # here, not at the top: it adds to every import of the package

        return json.dumps(self.to_dict(), indent=indent, **kwargs)
