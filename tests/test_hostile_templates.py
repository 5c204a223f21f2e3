"""Chat templates as hostile input: every runaway is refused in one line, in bounded time and memory.

A chat template is code from whoever made the model directory. Each template
below tries to spend unbounded time or memory (loops, repetition, padding,
recursion, namespace doubling, comparisons and searches over big strings);
all of them are rendered in one child process under an address-space cap, and
each must end in a one-line TemplateLimitError within a few seconds. Real
templates, including ones that keep state in a namespace, must still render.
"""

import json
import shutil
import sys
import time

import pytest

from elm_mlx.chat_template import TemplateError, render_template
from elm_mlx.tokenizer import load_tokenizer
from hostile import python_code, run_limited

BIG = "{% set s = 'a' * 4000000 %}"  # the largest value a template may build
FOREVER = "{% for i in range(100000) %}{% for j in range(100000) %}"
END = "{% endfor %}{% endfor %}"
REPEATED = "{% for i in range(100000) %}"  # an operation over a big value, again and again

HOSTILE = {
    # loops
    "nested loops": FOREVER + END,
    "nested loops writing": FOREVER + "x" + END,
    "loop over a huge string": BIG + "{% for c in s %}{% endfor %}",
    "recursive for doubling": "{% for m in [1] recursive %}{{ loop([m, m]) }}{% endfor %}",
    "output from a set block": "{% set t %}" + FOREVER + "xy" + END + "{% endset %}",
    # string and list repetition
    "string times a billion": "{{ 'x' * 1000000000 }}",
    "list times a hundred million": "{{ [1] * 100000000 }}",
    "4 MB string built in a loop": REPEATED + "{% set t = 'x' * 4000000 %}{% endfor %}",
    "4 MB slice in a loop": BIG + REPEATED + "{% set t = s[1:] %}{% endfor %}",
    "huge string to a list": "{{ ('ab' * 2000000)|list }}",
    # padding and formatting
    "center filter a billion wide": "{{ 'x'|center(1000000000) }}",
    "center method in a loop": REPEATED + "{% set t = (i|string).center(4000000) %}{% endfor %}",
    "center twice over the cap": "{{ 'x'.center(4000000) ~ 'x'.center(4000000) }}",
    "percent width": "{{ '%1000000000s' % 'x' }}",
    "percent star width": "{{ '%*s' % (1000000000, 'x') }}",
    "format width": "{{ '{:>1000000000}'.format('x') }}",
    "format nested width": "{{ '{:{}}'.format('x', 1000000000) }}",
    "format filter in a loop": REPEATED + "{% set t = '%4000000s'|format(i) %}{% endfor %}",
    "indent many lines": "{{ ('x\\n' * 1000000)|indent(100) }}",
    "tojson indent on deep lists": "{{ " + "[" * 60 + "1" + "]" * 60 + "|tojson(indent=3000000) }}",
    "tojson indent on a 100k-deep list": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l] %}{% endfor %}"
    "{{ ns.l|tojson(indent=4) }}",
    "integer power": "{{ 2 ** 100000 }}",
    "integer tower": "{{ 10 ** (10 ** 10) }}",
    # recursion
    "macro calling itself": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "macro calling itself twice": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "macro doubling its argument": "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('x', 60) }}",
    "caller recursion": "{% macro f() %}{{ caller() }}{% endmacro %}{% macro g() %}{% call f() %}{{ g() }}{% endcall %}{% endmacro %}{{ g() }}",
    "block calling itself": "{% block b %}{{ self.b() }}{% endblock %}",
    # namespace doubling
    "namespace string doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "namespace string doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "namespace list doubling": "{% set ns = namespace(l=[1]) %}{% for i in range(100) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "namespace holding itself": "{% set ns = namespace(a=1) %}{% set ns.me = ns %}{{ ns }}",
    "namespaces made in a loop": FOREVER + "{% set t = namespace(a=i) %}" + END,
    # comparisons and searches over big strings
    "== on 4 MB strings": BIG + REPEATED + "{% set t = s == s ~ '' %}{% endfor %}",
    "!= on 4 MB strings": BIG + REPEATED + "{% set t = s != s ~ '' %}{% endfor %}",
    "< on 4 MB strings": BIG + REPEATED + "{% set t = s < s ~ 'b' %}{% endfor %}",
    "in on a 4 MB string": BIG + REPEATED + "{% set t = 'ab' in s %}{% endfor %}",
    "in on a list of big strings": "{% set l = ['a' * 4000] * 1000 %}" + REPEATED + "{% set t = ('a' * 3999 ~ 'b') in l %}{% endfor %}",
    "== on lists of 4 MB strings": BIG + "{% set l = [s] %}" + REPEATED + "{% set t = l == [s ~ ''] %}{% endfor %}",
    "is eq test": BIG + REPEATED + "{% set t = s is eq(s ~ '') %}{% endfor %}",
    "is in test": BIG + REPEATED + "{% set t = 'ab' is in(s) %}{% endfor %}",
    "select equalto": BIG + "{% set l = [s] %}" + REPEATED + "{% set t = l|select('equalto', s ~ '')|list %}{% endfor %}",
    "count method": BIG + REPEATED + "{% set t = s.count('ab') %}{% endfor %}",
    "find method": BIG + REPEATED + "{% set t = s.find('ab') %}{% endfor %}",
    "split method": BIG + REPEATED + "{% set t = s.split('b') %}{% endfor %}",
    "replace filter": BIG + REPEATED + "{% set t = s|replace('b', 'c') %}{% endfor %}",
    "title filter": BIG + REPEATED + "{% set t = s|title %}{% endfor %}",
    "sort big strings": "{% set l = ['a' * 4000] * 1000 %}" + REPEATED + "{% set t = l|sort %}{% endfor %}",
    "cheap method calls": FOREVER + "{% set t = 'ab'.upper() %}" + END,
    "cheap filters": FOREVER + "{% set t = i|string %}" + END,
    "cheap concatenation": FOREVER + "{% set t = i ~ j %}" + END,
}

# Renders each template in turn, one JSON line per template: its name, the seconds it took, and the error.
CHILD = """
import json, sys, time
from elm_mlx.chat_template import TemplateLimitError, render_template
for name, source in json.loads(sys.stdin.read()).items():
    start = time.perf_counter()
    try:
        render_template(source, messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
        error, kind = None, None
    except TemplateLimitError as e:
        error, kind = str(e), "limit"
    print(json.dumps({"name": name, "seconds": time.perf_counter() - start, "error": error, "kind": kind}), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes():
    outcome = python_code(CHILD, stdin=json.dumps(HOSTILE), timeout=300)
    assert outcome.returncode == 0 and not outcome.stderr.strip(), outcome.stderr[-3000:]  # no MemoryError, no crash
    return {r["name"]: r for r in map(json.loads, outcome.stdout.splitlines())}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_runaway_template_is_refused_in_one_line_and_a_few_seconds(outcomes, name):
    result = outcomes[name]
    assert result["kind"] == "limit", result
    assert "\n" not in result["error"] and len(result["error"]) <= 300 and result["error"].startswith("the chat template ")
    assert result["seconds"] < 4, result


def test_the_command_line_says_it_in_one_line(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "OpenELM-hostile-template"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(HOSTILE["namespace string doubling with ~"])
    outcome = run_limited([sys.executable, "-m", "elm_mlx", "generate", "--model", str(model_dir), "--chat", "-p", "hi"], timeout=120)
    assert outcome.returncode == 1 and outcome.stdout == ""
    assert outcome.error_line() == "error: chat template failed: the chat template builds a string longer than 4,194,304 characters"


# A Llama-3-style template (written for this test) that collects the system prompt and counts turns in a namespace.
NAMESPACE_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system='', turns=0, last_role=none) %}
{%- for message in messages if message['role'] == 'system' %}
    {%- set ns.system = ns.system ~ message['content'] | trim %}
{%- endfor %}
{%- if ns.system %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages if message['role'] != 'system' %}
    {%- if message['role'] == ns.last_role %}
        {{- raise_exception('roles must alternate') }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- set ns.last_role = message['role'] %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{{- '' if ns.turns else raise_exception('no turns') }}"""

CONVERSATION = [
    {"role": "system", "content": " Be brief. "},
    {"role": "user", "content": "Hi!\n"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour."},
]
RENDERED = (
    "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_a_template_with_a_namespace_renders(tmp_path, tiny_sp_model):
    assert render_template(NAMESPACE_TEMPLATE, messages=CONVERSATION, add_generation_prompt=True, bos_token="<s>") == RENDERED
    with pytest.raises(TemplateError, match="^roles must alternate$"):
        render_template(NAMESPACE_TEMPLATE, messages=CONVERSATION[:2] * 2, add_generation_prompt=True, bos_token="<s>")
    # ...and as a model directory's template, behind the tokenizer.
    (tmp_path / "tokenizer.model").write_bytes(tiny_sp_model)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": NAMESPACE_TEMPLATE}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.apply_chat_template(CONVERSATION) == RENDERED
    assert tokenizer.encode_chat(CONVERSATION) == tokenizer.encode(RENDERED)


def test_long_real_conversations_stay_within_the_budget():
    """The charges must not refuse real work: 1 MiB of conversation (the server's body cap), two templates."""
    messages = [{"role": "user" if i % 2 else "assistant", "content": f"line {i} " + "word " * 1000} for i in range(1, 201)]
    from elm_mlx.tokenizer import DEFAULT_CHAT_TEMPLATE

    for template in (NAMESPACE_TEMPLATE, DEFAULT_CHAT_TEMPLATE):
        start = time.perf_counter()
        text = render_template(template, messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
        assert len(text) > 1_000_000 and time.perf_counter() - start < 2
