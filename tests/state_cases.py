"""Run in a ``crashproof`` worker child: load corrupted saved states into one LLM.

Each state must be refused with :class:`StateError` and leave the LLM's record and cache as
they were, or (a resealed mutant whose change llama.cpp cannot see, such as a flipped bit in
a K/V value) be accepted; either way the process must live. Returns "refused accepted".
"""

from __future__ import annotations

from cyllama_cffi import LLM, StateError


def load_corrupted_states(model_path: str, listing: str) -> str:
    with LLM(model_path, temperature=0.0, max_tokens=24, n_threads=2) as llm:
        llm("The quick brown fox")
        original = llm.save_state()
        before = list(llm._seq.tokens)
        refused = accepted = 0
        for path in open(listing).read().split("\n"):
            try:
                llm.load_state(path)
            except StateError:
                refused += 1
                seq = llm._seq
                assert seq.tokens == before, path
                assert seq.ctx.memory_seq_pos_max(0) == len(before) - 1, path
                continue
            accepted += 1
            llm.load_state(original)
            assert llm._seq.tokens == before
        return f"{refused} {accepted}"
