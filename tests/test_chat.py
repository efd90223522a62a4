"""Chat templates as cyllama renders them, and chat generation.

Tiny models carry real templates (ChatML, Llama 3, Gemma, one llama.cpp has no name for, none
at all): the Jinja rendering is compared with llama.cpp's ``llama_chat_apply_template`` where
llama.cpp knows the template, and the fallbacks are checked one by one. The default model
(SmolLM2, ChatML) answers through ``LLM.chat``, streamed, cancelled, and through the one-shot
helpers of ``cyllama_cffi.api``.
"""

from __future__ import annotations

import logging

import jinja2
import pytest

import cyllama_cffi
from cyllama_cffi import LLM, ChatTemplateError, api
from cyllama_cffi.chat_template import builtin_templates
from cyllama_cffi.lowlevel.model import LlamaModel
from tiny_gguf import TinySpec, write_tiny_llama

# Real templates, as their models' tokenizer_config.json hold them.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # OpenHermes-2.5
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")  # Meta-Llama-3-8B-Instruct
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")  # gemma-7b-it
# Markers llama.cpp has no name for, with what new templates use: a namespace, break, tojson.
UNKNOWN = ("{{ bos_token }}{%- set ns = namespace(system='') -%}{%- for m in messages -%}{%- if m.role == 'system' -%}"
           "{{ raise_exception('System role not supported') }}{%- endif -%}{%- endfor -%}"
           "{% for m in messages %}<|turn|>{{ m.role }}\n{{ m.content }}<|/turn|>\n{% if m.role == 'stop' %}{% break %}"
           "{% endif %}{% endfor %}{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
           "{% if tools is defined %}{{ tools | tojson }}{% endif %}")

CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "  hi there  "}, {"role": "user", "content": "again"}]
USER_FIRST = CONVERSATION[1:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> path of a tiny model holding that template (and its special tokens)."""
    folder = tmp_path_factory.mktemp("chat")
    specs = {
        "chatml": TinySpec(specials=("<|im_start|>", "<|im_end|>"), eos="<|im_end|>", chat_template=CHATML),
        "llama3": TinySpec(specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), eos="<|eot_id|>",
                           chat_template=LLAMA3),
        "gemma": TinySpec(specials=("<start_of_turn>", "<end_of_turn>"), eos="<end_of_turn>", chat_template=GEMMA),
        "unknown": TinySpec(specials=("<|turn|>", "<|/turn|>"), eos="<|/turn|>", chat_template=UNKNOWN),
        "none": TinySpec(),
    }
    paths = {name: write_tiny_llama(folder / f"{name}.gguf", spec) for name, spec in specs.items()}
    paths["stored"] = write_tiny_llama(folder / "stored.gguf", specs["llama3"],
                                       extra=lambda w: w.add_string("tokenizer.chat_template.tool_use", CHATML))
    return paths


@pytest.fixture(scope="module")
def models(tiny):
    loaded = {name: LlamaModel(path, vocab_only=True) for name, path in tiny.items()}
    yield loaded
    for model in loaded.values():
        model.close()


def llama_cpp(messages, template, add_generation_prompt=True):
    """llama.cpp's own rendering (``template`` as a name or text), from its C function."""
    from cyllama_cffi.chat_template import _checked, _render_llama_cpp

    return _render_llama_cpp(template, _checked(messages), add_generation_prompt)


def render(model, messages, template=None, add_generation_prompt=True):
    from cyllama_cffi.chat_template import apply_chat_template

    return apply_chat_template(model, messages, template, add_generation_prompt)


# -- Jinja against llama.cpp ---------------------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_renders_as_llama_cpp_does(models, add_generation_prompt):
    text = render(models["chatml"], CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert text == llama_cpp(CONVERSATION, "chatml", add_generation_prompt)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_llama3_renders_as_llama_cpp_does_plus_the_bos_the_template_writes(models):
    """Meta's template writes bos_token (the model's BOS text) and trims contents; llama.cpp
    trims the same way and leaves BOS to the tokenizer."""
    text = render(models["llama3"], CONVERSATION)
    assert text == "<s>" + llama_cpp(CONVERSATION, "llama3")
    assert "<|end_header_id|>\n\nhi there<|eot_id|>" in text


def test_gemma_renders_as_llama_cpp_does_when_the_template_accepts_the_messages(models):
    text = render(models["gemma"], USER_FIRST)
    assert text == "<s>" + llama_cpp(USER_FIRST, "gemma")
    assert "<start_of_turn>model\nhi there<end_of_turn>" in text


@pytest.mark.parametrize("messages,refusal", [
    (CONVERSATION, "System role not supported"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "Conversation roles must alternate"),
])
def test_a_template_refusal_falls_back_to_llama_cpp_as_cyllama_does(models, caplog, messages, refusal):
    """Gemma's raise_exception: cyllama renders with llama.cpp's engine instead, which folds the
    system message into the first user turn. The refusal is logged, not swallowed."""
    with caplog.at_level(logging.WARNING, logger="cyllama_cffi"):
        text = render(models["gemma"], messages)
    assert text == llama_cpp(messages, "gemma")
    assert refusal in caplog.text
    if messages is CONVERSATION:
        assert text.startswith("<start_of_turn>user\nYou are terse.\n\nhello<end_of_turn>")


def test_a_refusal_llama_cpp_cannot_take_over_is_a_clear_exception(models):
    with pytest.raises(ChatTemplateError, match="System role not supported") as caught:
        render(models["unknown"], CONVERSATION)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value.__cause__, jinja2.TemplateError)
    assert render(models["unknown"], USER_FIRST) == (
        "<s><|turn|>user\nhello<|/turn|>\n<|turn|>assistant\n  hi there  <|/turn|>\n<|turn|>user\nagain<|/turn|>\n"
        "<|turn|>assistant\n")


def test_the_default_models_template_renders_as_llama_cpp_does_and_adds_its_system_prompt(model):
    """SmolLM2's template is ChatML plus a default system prompt, which llama.cpp's engine
    leaves out: with a system message both agree; without one, only Jinja has the model's."""
    assert render(model, CONVERSATION) == llama_cpp(CONVERSATION, model.chat_template())
    own = render(model, USER_FIRST)
    assert own.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert own.endswith(llama_cpp(USER_FIRST, "chatml"))


# -- template= and the fallbacks ---------------------------------------------------------------------

def test_a_template_stored_by_name_a_builtin_name_or_a_text(models):
    stored = models["stored"]
    assert render(stored, USER_FIRST, template="tool_use") == llama_cpp(USER_FIRST, "chatml")
    assert render(stored, USER_FIRST, template="chatml") == llama_cpp(USER_FIRST, "chatml")
    assert render(models["chatml"], USER_FIRST, template="gemma") == llama_cpp(USER_FIRST, "gemma")
    assert render(models["chatml"], USER_FIRST, template=LLAMA3) == llama_cpp(USER_FIRST, "llama3")
    # A Jinja text llama.cpp does not know is rendered with Jinja (cyllama would raise).
    assert render(models["chatml"], USER_FIRST[:1], template="{{ messages[0].content | upper }}!") == "HELLO!"
    assert "chatml" in builtin_templates() and "llama3" in builtin_templates()
    assert render(stored, USER_FIRST, template="") == render(stored, USER_FIRST)  # "": the model's own
    with pytest.raises(TypeError, match="template must be a str"):
        render(stored, USER_FIRST, template=b"chatml")
    with pytest.raises(ChatTemplateError, match="unknown chat template 'no-such-template'.*chatml"):
        render(stored, USER_FIRST, template="no-such-template")


def test_get_chat_template(models):
    assert models["stored"].chat_template() == LLAMA3
    from cyllama_cffi.chat_template import get_chat_template

    assert get_chat_template(models["stored"]) == LLAMA3
    assert get_chat_template(models["stored"], "tool_use") == CHATML
    assert get_chat_template(models["stored"], "missing") == ""
    assert get_chat_template(models["none"]) == ""


def test_a_model_without_a_template_gets_cyllamas_plain_format(models):
    messages = CONVERSATION + [{"role": "tool", "content": "42"}]
    expected = "System: You are terse.\n\nUser: hello\n\nAssistant:   hi there  \n\nUser: again\n\nTool: 42"
    assert render(models["none"], messages) == expected + "\n\nAssistant:"
    assert render(models["none"], messages, add_generation_prompt=False) == expected


@pytest.mark.parametrize("messages,error,match", [
    ("hello", TypeError, "messages must be a list"),
    ([{"role": "user", "content": "a"}, ("user", "b")], TypeError, "Message at index 1 must be a dict, got tuple"),
    ([{"content": "a"}], ValueError, "Message at index 0 missing or invalid 'role'"),
    ([{"role": 3, "content": "a"}], ValueError, "Message at index 0 missing or invalid 'role'"),
    ([{"role": "user"}], ValueError, "Message at index 0 missing 'content' key"),
])
def test_bad_messages_name_their_index(models, messages, error, match):
    for name in ("chatml", "none"):
        with pytest.raises(error, match=match):
            render(models[name], messages)


def test_a_nul_character_cannot_reach_llama_cpps_engine(models):
    with pytest.raises(ValueError, match="Message at index 0 contains a NUL"):
        render(models["chatml"], [{"role": "user", "content": "a\0b"}], template="chatml")
    assert "a\0b" in render(models["chatml"], [{"role": "user", "content": "a\0b"}])  # Jinja has no C strings


def test_chat_tokens_have_one_bos_whoever_wrote_it(tiny):
    """Llama 3's template writes BOS itself; tokenizing the text with the model's add_bos would
    add a second. The chat tokens are the same as llama.cpp's rendering plus the model's BOS."""
    with LLM(tiny["llama3"], temperature=0.0, max_tokens=2) as llm:
        jinja_tokens = llm._chat_tokens(llm.format_chat(USER_FIRST), llm.config)
        c_tokens = llm._chat_tokens(llm.format_chat(USER_FIRST, template="llama3"), llm.config)
        assert jinja_tokens == c_tokens
        assert jinja_tokens[0] == llm.vocab.bos and jinja_tokens[1] != llm.vocab.bos
        header = llm.tokenize("<|start_header_id|>", add_special=False)
        assert len(header) == 1 and jinja_tokens[1] == header[0]
        response = llm.chat(USER_FIRST)
        assert response.stats.prompt_tokens == len(jinja_tokens)
        no_bos = llm.config.replace(add_bos=False)
        assert llm._chat_tokens(llm.format_chat(USER_FIRST, template="llama3"), no_bos) == c_tokens[1:]


# -- chat on the default model ---------------------------------------------------------------------

QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, temperature=0.0, max_tokens=24) as instance:
        yield instance


def test_chat_ends_at_the_end_of_turn_token(llm):
    response = llm.chat(QUESTION)
    assert response.finish_reason == "stop" and "Paris" in response
    assert "<|im_end|>" not in response.text and "<|im_start|>" not in response.text
    prompt = llm.format_chat(QUESTION)
    assert response.stats.prompt_tokens == len(llm.tokenize(prompt, add_special=False, parse_special=True))
    # The markers are tokens even when the config would read prompt text literally.
    literal = llm.chat(QUESTION, config=llm.config.replace(parse_special=False))
    assert literal == response and literal.stats.prompt_tokens == response.stats.prompt_tokens


def test_chat_streams_the_same_text(llm):
    stream = llm.chat(QUESTION, stream=True)
    assert isinstance(stream, cyllama_cffi.Stream)
    assert "".join(stream) == llm.chat(QUESTION).text
    assert stream.finish_reason == "stop"


def test_chat_template_argument_reaches_the_prompt(llm):
    own = llm.chat(QUESTION[1:], config=llm.config.replace(max_tokens=1))
    named = llm.chat(QUESTION[1:], config=llm.config.replace(max_tokens=1), template="chatml")
    assert own.stats.prompt_tokens > named.stats.prompt_tokens  # the model's template adds its system prompt


def test_cancelling_a_chat_stream_keeps_the_llm_usable(llm):
    stream = llm.chat(QUESTION, stream=True, config=llm.config.replace(max_tokens=200))
    first = next(stream)
    llm.cancel()
    rest = "".join(stream)
    assert stream.finish_reason == "cancelled"
    assert len(stream.generated) < 200
    assert llm.chat(QUESTION).text.startswith(first + rest)


def test_llm_get_chat_template(llm):
    assert llm.get_chat_template() == llm.model.chat_template()
    assert llm.get_chat_template("no_such_name") == ""


# -- the one-shot helpers -------------------------------------------------------------------------

def test_root_exports_the_helpers_not_a_module():
    from cyllama_cffi import chat, complete, simple

    assert chat is api.chat and complete is api.complete and simple is api.simple
    assert callable(cyllama_cffi.chat)


def test_complete_and_chat(model_path):
    response = api.complete("The capital of France is", model_path, temperature=0.0, max_tokens=4)
    with LLM(model_path, temperature=0.0, max_tokens=4) as llm:
        assert response == llm("The capital of France is") and response.finish_reason == "length"
        assert api.chat(QUESTION, model_path, temperature=0.0, max_tokens=4) == llm.chat(QUESTION)
        assert api.chat(QUESTION[1:], model_path, template="chatml", temperature=0.0, max_tokens=4) == \
            llm.chat(QUESTION[1:], template="chatml")
    with pytest.raises(TypeError, match="no_such_field"):
        api.complete("x", model_path, no_such_field=1)


def test_a_one_shot_stream_keeps_its_model_until_it_ends(model_path):
    stream = api.complete("The capital of France is", model_path, stream=True, temperature=0.0, max_tokens=3)
    owner = stream._on_finish.__self__  # the LLM the helper made
    assert isinstance(stream, cyllama_cffi.Stream) and not owner.model.closed
    assert len("".join(stream)) > 0 and stream.finish_reason == "length"
    assert owner.model.closed  # freed when the stream ended, not by the garbage collector

    stream = api.chat(QUESTION, model_path, stream=True, temperature=0.0, max_tokens=50)
    owner = stream._on_finish.__self__
    next(stream)
    stream.close()
    assert stream.finish_reason == "cancelled" and owner.model.closed


def test_a_helper_that_fails_frees_its_model(model_path, monkeypatch):
    made = []
    monkeypatch.setattr(api, "LLM", lambda *a, **k: made.append(LLM(*a, **k)) or made[-1])
    with pytest.raises(ValueError, match="prompt is empty"):
        api.complete("", model_path, stream=True)
    assert made[0].model.closed


def test_apply_chat_template_and_get_chat_template(model_path, model, tiny):
    assert api.apply_chat_template(QUESTION, model_path) == render(model, QUESTION)
    assert api.apply_chat_template(QUESTION, model_path, template="llama3", add_generation_prompt=False) == \
        llama_cpp(QUESTION, "llama3", False)
    assert api.get_chat_template(model_path) == model.chat_template()
    assert api.get_chat_template(tiny["stored"], "tool_use") == CHATML
    assert api.get_chat_template(tiny["none"]) == ""
    assert api.apply_chat_template(USER_FIRST[:1], tiny["none"]) == "User: hello\n\nAssistant:"


def test_simple_prints_a_greedy_generation(model_path, capsys):
    assert api.simple(model_path, "The capital of France is", n_predict=4) is True
    out = capsys.readouterr().out
    with LLM(model_path, temperature=0.0, max_tokens=4) as llm:
        expected = llm("The capital of France is").text
    assert out.startswith("The capital of France is" + expected + "\n")
    assert "decoded 4 tokens in" in out and "t/s" in out


@pytest.mark.parametrize("template, expected", [
    (None, "<|im_end|>\n<|im_start|>user\n"),  # the default model's own (ChatML)
    ("llama3", "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"),
    ("gemma", "<end_of_turn>\n<start_of_turn>user\n"),
    ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}", "[user]"),
    ("{% for m in messages %}{{ m.role }};{% endfor %}", ""),  # no content rendered: no guess
    ("{{ raise_exception('no probes here') }}", ""),
])
def test_text_after_answer_reads_the_templates_turn_change(model, template, expected):
    from cyllama_cffi.chat_template import text_after_answer

    assert text_after_answer(model, template) == expected
