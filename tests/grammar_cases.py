"""Grammar cases that would end the process if the binding let them through to llama.cpp.

Run in a ``crashproof`` worker child by tests/test_grammar.py: each function asserts, in the
child, the exact exception it expects, so a crash or a wrong outcome is a failed case, not a
dead test run.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict

from cyllama_cffi import LLM, GenerationConfig, Grammar, GrammarDeadEnd, LlamaSampler
from cyllama_cffi.grammar import _check_rules, _Parser

CASES: Dict[str, Callable[[str], Any]] = {}


def case(function: Callable[[str], Any]) -> Callable[[str], Any]:
    CASES[function.__name__] = function
    return function


# Each of these makes llama.cpp abort, overflow its stack or never return when let through.
BAD_GRAMMARS = {
    "left recursion": 'root ::= root "a"',
    "indirect left recursion": 'root ::= a\na ::= b "x"\nb ::= | root',
    "undefined rule": "root ::= missing",
    "empty": "",
    "unbalanced (": 'root ::= ("a"',
    "unbalanced )": 'root ::= "a")',
    "unbalanced [": "root ::= [a-",
    "huge repetition": 'root ::= "a"{1000000}',
    "huge repetition of a group": 'root ::= ("a" "b"?){1500}',
    "repetition count beyond 64 bits": 'root ::= "a"{99999999999999999999999}',
    "nesting 100000 deep": "root ::= " + "(" * 100000 + '"a"' + ")" * 100000,
    "rule chain 100000 long": "\n".join(["root ::= r0"] + [f"r{i} ::= r{i + 1}" for i in range(100000)]
                                        + ['r100000 ::= "a"']),
    "exponential left-recursion check": "\n".join(["root ::= r0"] + [f"r{i} ::= r{i + 1} | r{i + 1}"
                                                                     for i in range(60)] + ['r60 ::= "a"']),
    "NUL in the text": 'root ::= "a"\x00 | "b"',
    "no root": 'start ::= "a"',
}


@case
def bad_grammars_raise(model_path: str) -> str:
    """Every bad grammar raises ValueError from Grammar, GenerationConfig and add_grammar alike."""
    llm = LLM(model_path, max_tokens=4, temperature=0.0, n_threads=1)
    try:
        for name, text in BAD_GRAMMARS.items():
            for make in (Grammar.from_string, lambda t: GenerationConfig(grammar=t),
                         lambda t: LlamaSampler().add_grammar(llm.vocab, t)):
                try:
                    make(text)
                except ValueError as error:
                    assert "grammar" in str(error), (name, str(error))
                else:
                    raise AssertionError(f"{name}: no ValueError")
        assert llm("hi").finish_reason == "length"  # and the process and the LLM are fine
    finally:
        llm.close()
    return "ok"


@case
def dead_ends_raise_grammar_dead_end(model_path: str) -> str:
    """A grammar no token can satisfy ends the generation with GrammarDeadEnd, not an abort."""
    llm = LLM(model_path, max_tokens=8, n_threads=1)
    try:
        for text in ('root ::= "\\x00"', 'root ::= "a" [\\x00]', "root ::= [^\\x00-\\U0010FFFF]"):
            for temperature in (0.0, 0.8):
                config = llm.config.replace(grammar=text, temperature=temperature, seed=1)
                try:
                    llm("Say a:", config)
                except GrammarDeadEnd as error:
                    assert "allows no token" in str(error)
                else:
                    raise AssertionError(f"{text!r}: no GrammarDeadEnd")
                assert llm.last_finish_reason == "error"
        with llm.stream("Say a:", llm.config.replace(grammar='root ::= "\\x00"')) as stream:
            try:
                next(stream)
            except GrammarDeadEnd:
                pass
            else:
                raise AssertionError("no GrammarDeadEnd from the stream")
            assert stream.finish_reason == "error"
        assert llm("hi", llm.config.replace(temperature=0.0)).finish_reason in ("length", "stop")
        # A token id outside the vocabulary is refused before llama.cpp sees the grammar.
        try:
            LlamaSampler().add_grammar(llm.vocab, "root ::= <[70000]>")
        except ValueError as error:
            assert "outside the vocabulary" in str(error)
        else:
            raise AssertionError("no ValueError for <[70000]>")
        # Low level: accept() of a token the grammar rejects, and of an end-of-generation token
        # before the grammar is complete, would abort in llama.cpp.
        sampler = LlamaSampler().add_grammar(llm.vocab, 'root ::= "yes"').add_greedy()
        for token in (llm.vocab.eos, llm.tokenize("no", add_special=False)[0]):
            try:
                sampler.accept(token)
            except GrammarDeadEnd:
                pass
            else:
                raise AssertionError(f"accept({token}) did not raise")
            sampler.reset()
        sampler.accept(llm.tokenize("yes", add_special=False)[0])  # allowed: no error
        sampler.close()
    finally:
        llm.close()
    return "ok"


@case
def llama_cpp_agrees_with_the_checker(texts: str) -> str:
    """For each text: our checker and llama.cpp's parser accept or refuse it alike.

    Only texts our checker finds safe (no deep nesting and so on) reach llama.cpp here, and
    those are all the texts of the generator in tests/test_grammar.py.
    """
    from cyllama_cffi import ffi, lib

    disagreements = []
    for text in json.loads(texts):
        try:
            _check_rules(_Parser(text).parse(), "root")  # our check alone, without llama.cpp's
            ours = True
        except ValueError:
            ours = False
        pointer = lib.llama_sampler_init_grammar(ffi.NULL, text.encode("utf-8"), b"root")
        theirs = pointer != ffi.NULL
        if theirs:
            lib.llama_sampler_free(pointer)
        if ours != theirs:
            disagreements.append((text, ours, theirs))
    assert not disagreements, disagreements[:5]
    return f"{len(json.loads(texts))} texts"



@case
def unchecked_parse(name: str) -> str:
    """BAD_GRAMMARS[name] handed straight to llama.cpp's parser, without our check.

    Only for proving that a check is needed: the grammars it is run on end the process.
    """
    from cyllama_cffi import ffi, lib

    text = BAD_GRAMMARS[name]
    pointer = lib.llama_sampler_init_grammar(ffi.NULL, text.encode("utf-8"), b"root")
    if pointer != ffi.NULL:
        lib.llama_sampler_free(pointer)
    return "parsed" if pointer != ffi.NULL else "refused"


@case
def unguarded_dead_end(model_path: str) -> str:
    """A dead-end grammar in a plain llama.cpp chain (no guard stage): llama.cpp aborts at accept."""
    from cyllama_cffi import ffi, lib

    llm = LLM(model_path, max_tokens=1, temperature=0.0, n_threads=1)
    llm("hi")  # leaves logits to sample from
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_grammar(llm.vocab.ptr, b'root ::= "\\x00"', b"root"))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    token = lib.llama_sampler_sample(chain, llm._seq.ctx.ptr, -1)
    lib.llama_sampler_free(chain)
    llm.close()
    return f"sampled {token}"
