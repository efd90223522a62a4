"""The Jinja environment chat templates are rendered in is the one Hugging Face templates expect."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import pytest

import cyllama_cffi
from cyllama_cffi._jinja import render


def test_block_whitespace_loop_controls_tojson_and_the_variables():
    template = ("{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}|"
                "{{ m | tojson(indent=1) | length > 20 }}|\n{% endfor %}{{ bos_token }}{{ eos_token }}"
                "{{ add_generation_prompt }}")
    text = render(template, [{"role": "user", "content": "<é>"}, {"role": "x", "content": "y"}], True, "<s>", "</s>")
    # trim/lstrip_blocks drop the block lines' whitespace; tojson keeps non-ASCII and <, > (Jinja's
    # own would escape them for HTML); {% break %} ends the loop.
    assert text == '{"role": "user", "content": "<é>"}|True|\n<s></s>True'
    assert render("{{ messages | tojson(indent=2, sort_keys=True) }}", [{"b": 1, "a": 2}], False, "", "") == \
        '[\n  {\n    "a": 2,\n    "b": 1\n  }\n]'


def test_strftime_now_is_the_local_time():
    before = datetime.now().strftime("%Y-%m-%d")
    text = render("{{ strftime_now('%Y-%m-%d') }}", [], True, "", "")
    assert text in (before, datetime.now().strftime("%Y-%m-%d"))


def test_raise_exception_is_a_template_error_with_the_templates_message():
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok"
    with pytest.raises(jinja2.TemplateError, match="^System role not supported$"):
        render(template, [{"role": "system", "content": "x"}], True, "", "")
    assert render(template, [{"role": "user", "content": "x"}], True, "", "") == "ok"


def test_the_sandbox_cannot_change_the_messages_or_reach_python():
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ messages.append(1) }}", messages, True, "", "")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ messages[0].update({'role': 'system'}) }}", messages, True, "", "")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", messages, True, "", "")
    assert messages == [{"role": "user", "content": "x"}]


def test_jinja2_is_imported_on_the_first_render_not_with_the_package():
    code = ("import sys, cyllama_cffi, cyllama_cffi._jinja as j; assert 'jinja2' not in sys.modules; "
            "j.render('{{ 1 }}', [], True, '', ''); assert 'jinja2' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(cyllama_cffi.__file__).parents[1]))
