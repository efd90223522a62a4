"""The exception hierarchy is the one its module docstring draws, and catches what it promises."""

from __future__ import annotations

import inspect
import pickle

import pytest

import cyllama_cffi
from cyllama_cffi import errors

CLASSES = [getattr(errors, name) for name in errors.__all__]


def drawn_tree() -> dict:
    """class name -> parent name, read from the tree in ``errors.__doc__`` (4 columns a level)."""
    lines = errors.__doc__.split("The hierarchy::", 1)[1].strip("\n").splitlines()
    root_at = len(lines[0]) - len(lines[0].lstrip())
    root, base = lines[0].split()
    parents = {root: base.strip("()")}
    stack = [root]  # stack[d]: the latest class drawn at depth d
    for line in lines[1:]:
        if not line.strip():
            break
        name_at = next(i for i, char in enumerate(line) if char.isalpha())
        depth = (name_at - root_at) // 4
        name = line[name_at:].split()[0]
        del stack[depth:]
        parents[name] = stack[-1]
        stack.append(name)
    return parents


def test_all_lists_every_exception_class_of_the_module():
    defined = {name for name, value in vars(errors).items()
               if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == errors.__name__}
    assert set(errors.__all__) == defined
    assert len(errors.__all__) == len(set(errors.__all__))


def test_the_docstring_tree_is_the_real_hierarchy():
    parents = drawn_tree()
    assert parents["LlamaError"] == "RuntimeError" and parents["InvalidGGUFError"] == "ModelLoadError"
    assert set(parents) == set(errors.__all__)
    for cls in CLASSES:
        assert cls.__bases__[0].__name__ == parents[cls.__name__], cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_is_a_llama_error_and_a_runtime_error(cls):
    assert issubclass(cls, errors.LlamaError) and issubclass(cls, RuntimeError)
    assert getattr(cyllama_cffi, cls.__name__) is cls  # exported from the package root as well


def test_invalid_gguf_is_a_load_error_and_a_value_error():
    error = errors.InvalidGGUFError("m.gguf: not a GGUF file")
    assert isinstance(error, errors.ModelLoadError) and isinstance(error, ValueError)
    for handler in (ValueError, errors.ModelLoadError, errors.LlamaError, RuntimeError):
        with pytest.raises(handler, match="not a GGUF file"):
            raise error
    assert not issubclass(errors.ModelLoadError, ValueError)  # only the file check is an argument error


def test_decode_errors_carry_their_code():
    error = errors.DecodeError("llama_decode returned -3", -3)
    assert error.code == -3 and str(error) == "llama_decode returned -3"
    full = errors.ContextFullError("no KV slot", 1)
    assert full.code == 1 and isinstance(full, errors.DecodeError)
    with pytest.raises(TypeError):
        errors.DecodeError("no code")  # type: ignore[call-arg]


def test_decode_aborted_has_code_2_and_the_positions_kept():
    error = errors.DecodeAborted("aborted", n_past=17)
    assert error.code == 2 and error.n_past == 17 and str(error) == "aborted"
    assert isinstance(error, errors.DecodeError) and not isinstance(error, errors.ContextFullError)
    with pytest.raises(errors.DecodeError) as raised:
        raise error
    assert raised.value.n_past == 17


def test_llm_busy_is_a_context_busy_error():
    assert issubclass(errors.LLMBusyError, errors.ContextBusyError)
    with pytest.raises(errors.ContextBusyError):
        raise errors.LLMBusyError("another thread is generating")
    assert not issubclass(errors.ContextBusyError, errors.LLMBusyError)


def test_siblings_do_not_catch_each_other():
    assert not issubclass(errors.LoadCancelled, errors.ModelLoadError)
    assert not issubclass(errors.ModelFetchError, errors.ModelLoadError)
    assert not issubclass(errors.ClosedError, errors.ContextBusyError)
    assert not issubclass(errors.ContextBusyError, errors.DecodeError)


@pytest.mark.parametrize("cls", [c for c in CLASSES if c.__init__ is BaseException.__init__ or
                                 c.__init__ is errors.LlamaError.__init__], ids=lambda cls: cls.__name__)
def test_plain_errors_survive_pickling(cls):
    """Errors cross process boundaries (multiprocessing, concurrent.futures) intact."""
    copy = pickle.loads(pickle.dumps(cls("message")))
    assert type(copy) is cls and str(copy) == "message"
