"""Rendering chat templates from model directories with bounded work, memory and output.

A template is code written by whoever made the model directory. jinja2's
sandbox keeps it from reaching Python internals but not from looping 10^10
times, building a gigabyte string or nesting without end. Here every render
gets a budget, checked by the operations that can grow without bound:

- work: each loop iteration, call, filter, test, comparison and arithmetic
  costs a unit, plus one per element it processes and per stretch of text:
  a unit per KiB where the text is copied or compared (``+``, ``~``, ``==``,
  slices, every value built), a unit per 32 characters where it is scanned
  character by character (``in`` on text, string methods, filters), so the
  budget bounds the time, not just the number of steps;
- size: no single value may exceed MAX_VALUE_CHARS, checked *before* the
  operations that can make one from small inputs (``*``, ``+``, ``%``, ``~``,
  join, replace, format, indent, widths) and after every call and filter;
- output: everything written anywhere (top level, macros, ``set`` blocks)
  counts towards MAX_RENDERED_CHARS;
- only filters and string/list/dict methods that chat templates use are
  there; integers are capped at MAX_INT_BITS bits.

Any breach raises TemplateLimitError, a jinja2 TemplateError, in one line.
"""

import functools
import re
from contextvars import ContextVar
from typing import Any, Iterable, Iterator

from jinja2 import TemplateError, nodes, pass_context
from jinja2.compiler import CodeGenerator, operators
from jinja2.filters import FILTERS
from jinja2.runtime import Context, LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

__all__ = ["TemplateError", "TemplateLimitError", "render_template"]

# Real chat templates are a few KiB (the largest, with tool calling, ~20 KiB).
MAX_TEMPLATE_CHARS = 256 << 10
# A conversation filling a 128k-token context is ~0.5M characters; the server's body cap is 1 MiB.
MAX_RENDERED_CHARS = 4 << 20
MAX_VALUE_CHARS = MAX_RENDERED_CHARS
# A long chat costs a few units per message plus one per KiB of text; this is ~1 s of rendering.
MAX_WORK = 2_000_000
# A unit is a loop step (0.1-0.5 us). Copying or comparing text takes under 1 ns a character,
# scanning it (substring search, case mapping, regexes) up to ~30 ns.
COPY_CHARS_PER_UNIT = 1024
SCAN_CHARS_PER_UNIT = 32
# Fixed costs beyond a step: the sandbox checks every call (~3 us), a filter goes through our checks
# (~1.5 us), a macro call builds a frame, a context and an output buffer (5-15 us).
CALL_UNITS = 8
FILTER_UNITS = 4
MACRO_CALL_UNITS = 20
MAX_INT_BITS = 4096

_COUNTED = "_elm_counted"  # the filter every {% for %} iterable passes through

_FILTERS = (
    "abs attr capitalize center count d default dictsort e escape first float format groupby indent int items "
    "join last length list lower map max min reject rejectattr replace reverse round safe select selectattr sort "
    "string striptags sum title tojson trim truncate unique upper wordcount"
).split()
_CONSTANT_TIME_FILTERS = {"abs", "attr", "count", "d", "default", "first", "float", "int", "length", "round", "safe"}
_METHODS = {
    str: set(
        "capitalize casefold center count endswith find format index isalnum isalpha isdigit islower isnumeric isspace "
        "istitle isupper join ljust lower lstrip partition removeprefix removesuffix replace rfind rindex rjust "
        "rpartition rsplit rstrip split splitlines startswith strip swapcase title upper zfill".split()
    ),
    dict: {"get", "items", "keys", "values"},
    list: {"count", "index"},
    tuple: {"count", "index"},
}


class TemplateLimitError(TemplateError):
    """A template that would take more work, memory or output than any chat needs."""


class _Budget:
    def __init__(self):
        self.work = 0
        self.output = 0

    def charge(self, units: int) -> None:
        self.work += units
        if self.work > MAX_WORK:
            raise TemplateLimitError(f"the chat template does more than {MAX_WORK:,} steps of work (a runaway loop?)")

    def emit(self, chars: int) -> None:
        self.output += chars
        if self.output > MAX_RENDERED_CHARS:
            raise TemplateLimitError(f"the chat template writes more than {MAX_RENDERED_CHARS:,} characters")


_BUDGET: ContextVar = ContextVar("elm_template_budget")


def _charge(units: int = 1) -> None:
    _BUDGET.get().charge(units)


def _work(value: Any, chars_per_unit: int = COPY_CHARS_PER_UNIT) -> int:
    """Work units for one pass over a value: its elements, or its text at the given rate."""
    if isinstance(value, str):
        return 1 + len(value) // chars_per_unit
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return 1 + len(value)
    return 1


def _deep_work(value: Any, chars_per_unit: int = COPY_CHARS_PER_UNIT) -> int:
    """Work units for a pass over a value and everything in it (a comparison, a sort)."""
    return 1 + _size(value) // chars_per_unit


def _operand_work(value: Any, searched: bool) -> int:
    """A comparison operand: compared at memcmp speed, or searched character by character (text after ``in``)."""
    if isinstance(value, str):
        return _work(value, SCAN_CHARS_PER_UNIT if searched else COPY_CHARS_PER_UNIT)
    if isinstance(value, (int, float, type(None))):
        return 1
    return _deep_work(value)


def _size(value: Any) -> int:
    """Characters a value can turn into, counted deeply, stopping once past MAX_VALUE_CHARS (charged as work)."""
    total, stack = 0, [value]
    while stack and total <= MAX_VALUE_CHARS:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
            continue
        if isinstance(item, Namespace):  # {% set ns = namespace(...) %}; jinja2 keeps this one attribute reachable
            item = item._Namespace__attrs
        if isinstance(item, dict):
            item = [*item.keys(), *item.values()]
        if isinstance(item, (list, tuple, set, frozenset)):
            _charge(len(item) + 1)
            total += 2 + 2 * len(item)  # brackets, separators
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += max(1, item.bit_length() // 3)
        else:
            total += 8
    return total


def _limit(size: int, what: str) -> None:
    if size > MAX_VALUE_CHARS:
        raise TemplateLimitError(f"the chat template builds {what} longer than {MAX_VALUE_CHARS:,} characters")


def _checked(value: Any, what: str = "a value") -> Any:
    """A value an operation just made: refused past the limits, else charged for its size (building it took that)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise TemplateLimitError(f"the chat template builds an integer of more than {MAX_INT_BITS} bits")
    size = _size(value)
    _limit(size, what)
    _charge(size // COPY_CHARS_PER_UNIT)
    return value


def _counted(iterable: Iterable) -> Iterator:
    """Iterate, charging one unit per item."""
    budget = _BUDGET.get()
    for item in iterable:
        budget.charge(1)
        yield item


def _check_ints(args: Iterable) -> None:
    """Widths and counts beyond any sensible size (center(10**9), indent(10**9)) are refused outright."""
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_VALUE_CHARS:
            raise TemplateLimitError(f"the chat template uses the number {arg}, beyond {MAX_VALUE_CHARS:,}")


def _materialized(value: Any) -> Any:
    return value if isinstance(value, (str, list, tuple, dict, set, frozenset)) else list(_counted(value))


def _replace_size(text: str, old: str, new: str) -> int:
    hits = text.count(old) if old else len(text) + 1
    return len(text) + hits * (len(new) - len(old))


def _format_size(fmt: str, args: Iterable) -> int:
    """An upper bound on the length of fmt % args or fmt.format(*args): every number in fmt may be a width."""
    args = list(args)
    widths = sum(int(n) for n in re.findall(r"\d+", fmt)) if len(re.findall(r"\d+", fmt)) < 10_000 else MAX_VALUE_CHARS + 1
    star_widths = sum(abs(a) for a in args if isinstance(a, int) and not isinstance(a, bool)) if "*" in fmt or "{" in fmt else 0
    return len(fmt) + widths + star_widths + sum(_size(a) for a in args)


def _indentation(value: Any, indent: int) -> int:
    """Characters json.dumps(indent=...) adds: a line per element (and per closing bracket), indented by its depth."""
    if indent <= 0:
        return 0
    total, stack = 0, [(value, 1)]
    while stack and total <= MAX_VALUE_CHARS:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, (list, tuple)) and item:
            _charge(len(item) + 1)
            total += (len(item) * depth + depth - 1) * indent + len(item) + 1
            stack.extend((x, depth + 1) for x in item)
    return total


def _join_size(sep: str, items: Any) -> int:
    return sum(_size(i) for i in items) + len(sep) * max(len(items) - 1, 0)


def _text_args(value, args, kwargs):
    return [value, *args, *kwargs.values()]


def _bounded_filter(name: str, func):
    """A filter that charges its work and checks its result; the growing ones are bounded before they run."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def bounded(*args, **kwargs):
        value, rest = (args[skip], args[skip + 1 :]) if len(args) > skip else (None, ())
        _check_ints([*rest, *kwargs.values()])
        _charge(FILTER_UNITS + (0 if name in _CONSTANT_TIME_FILTERS else sum(_deep_work(a, SCAN_CHARS_PER_UNIT) for a in args[skip:])))
        if name == "join":
            value = _materialized(value)
            args = (*args[:skip], value, *rest)
            _limit(_join_size(str(rest[0]) if rest else str(kwargs.get("d", "")), value), "a joined string")
        elif name == "replace" and len(rest) >= 2 and all(isinstance(x, str) for x in (value, *rest[:2])):
            _limit(_replace_size(value, rest[0], rest[1]), "a string")
        elif name == "indent" and isinstance(value, str):
            width = rest[0] if rest else kwargs.get("width", 4)
            _limit(len(value) + (value.count("\n") + 1) * (len(width) if isinstance(width, str) else width), "a string")
        elif name == "format" and isinstance(value, str):
            _limit(_format_size(value, [*rest, *kwargs.values()]), "a formatted string")
        elif name in ("string", "tojson", "list", "sum", "sort", "unique", "dictsort", "groupby"):
            _limit(_size(value), "a value")
        if name == "tojson":
            indent = kwargs.get("indent", rest[0] if rest else None)
            if not isinstance(indent, (int, type(None))):
                raise TemplateLimitError("tojson's indent must be a number")
            _limit(_size(value) + _indentation(value, indent or 0), "a JSON text")
        return _checked(func(*args, **kwargs), f"a value (filter {name})")

    return bounded


def _bounded_test(name: str, func):
    """A test (``is eq``, ``is in``, also in select/reject) charged as the comparison it makes."""

    @functools.wraps(func)
    def bounded(*args, **kwargs):
        values = [a for a in (*args, *kwargs.values()) if not isinstance(a, Context)]
        _charge(sum(_operand_work(v, searched=name == "in" and i > 0) for i, v in enumerate(values)))
        return func(*args, **kwargs)

    return bounded


def _method_owner(obj: Any):
    """(owner, name) of a built-in method (also behind the sandbox's str.format wrapper), else (None, None)."""
    bound = getattr(obj, "__wrapped__", obj)
    owner = getattr(bound, "__self__", None)
    for kind in _METHODS:
        if isinstance(owner, kind) and callable(bound) and type(bound).__name__ == "builtin_function_or_method":
            return owner, kind, bound.__name__
    return None, None, None


class _BoundedCodeGenerator(CodeGenerator):
    """jinja2's code generator with hooks: loop iterables are counted, output and ``~`` are bounded,
    comparison operands are charged."""

    def visit_Template(self, node: nodes.Template, frame=None) -> None:
        # Rewritten before jinja2 collects the filters a template uses.
        for loop in node.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _COUNTED, [], [], None, None, lineno=loop.iter.lineno)
        super().visit_Template(node, frame)

    def visit_Output(self, node: nodes.Output, frame) -> None:
        literal = sum(len(child.data) for child in node.nodes if isinstance(child, nodes.TemplateData))
        if literal:
            self.writeline(f"environment.elm_emit({literal})")
        super().visit_Output(node, frame)

    def visit_Compare(self, node: nodes.Compare, frame) -> None:
        # Each operand is charged as it is evaluated, so chained comparisons keep Python's short-circuiting.
        self.write("(environment.elm_operand(")
        self.visit(node.expr, frame)
        self.write(", False)")
        for op in node.ops:
            self.write(f" {operators[op.op]} environment.elm_operand(")
            self.visit(op.expr, frame)
            self.write(f", {op.op in ('in', 'notin')})")
        self.write(")")

    def visit_Getitem(self, node: nodes.Getitem, frame) -> None:
        if not isinstance(node.arg, nodes.Slice):  # the rest go through the sandbox's getitem
            return super().visit_Getitem(node, frame)
        self.write("environment.elm_sliced(")  # a slice copies: charged for what it makes
        super().visit_Getitem(node, frame)
        self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame) -> None:
        self.write("environment.elm_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


@pass_context
def _finalize(context, value: Any) -> Any:
    """Every {{ expression }}, wherever it is written: counted as output."""
    _BUDGET.get().emit(_size(value))
    return value


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=_finalize)
        self.filters = {name: _bounded_filter(name, FILTERS[name]) for name in _FILTERS}
        self.filters[_COUNTED] = _counted
        self.tests = {name: _bounded_test(name, test) for name, test in self.tests.items()}
        del self.globals["lipsum"]
        self.globals["raise_exception"] = _raise_exception

    def elm_emit(self, chars: int) -> None:
        _BUDGET.get().emit(chars)

    def elm_concat(self, parts: tuple) -> str:
        size = sum(_size(p) for p in parts)
        _limit(size, "a string")
        _charge(2 * len(parts) + size // COPY_CHARS_PER_UNIT)
        return "".join(str(p) for p in parts)

    def elm_operand(self, value: Any, searched: bool) -> Any:
        _charge(_operand_work(value, searched))
        return value

    def elm_sliced(self, value: Any) -> Any:
        return _checked(value, "a slice")

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        rate = SCAN_CHARS_PER_UNIT if operator == "%" else COPY_CHARS_PER_UNIT  # % parses its format string
        _charge(_work(left, rate) + _work(right))
        ints = [x for x in (left, right) if isinstance(x, int) and not isinstance(x, bool)]
        if operator == "*" and len(ints) == 1 and isinstance(left if ints[0] is right else right, (str, list, tuple)):
            sequence = left if ints[0] is right else right
            _limit(_size(sequence) * max(ints[0], 0), "a repeated sequence")
        elif operator == "*" and len(ints) == 2 and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise TemplateLimitError(f"the chat template builds an integer of more than {MAX_INT_BITS} bits")
        elif operator == "**" and len(ints) == 2 and abs(left) > 1 and right > 0 and left.bit_length() * right > MAX_INT_BITS:
            raise TemplateLimitError(f"the chat template builds an integer of more than {MAX_INT_BITS} bits")
        elif operator == "+" and isinstance(left, (str, list, tuple)):
            _limit(_size(left) + _size(right), "a string or list")
        elif operator == "%" and isinstance(left, str):
            _limit(_format_size(left, right if isinstance(right, tuple) else [right]), "a formatted string")
        return _checked(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own signature)
        owner, kind, name = _method_owner(__obj)
        if kind is not None and name not in _METHODS[kind]:
            raise TemplateLimitError(f"chat templates may not call {kind.__name__}.{name}")
        _check_ints([*args, *kwargs.values()])
        _charge(CALL_UNITS + _work(owner, SCAN_CHARS_PER_UNIT) + sum(_work(a, SCAN_CHARS_PER_UNIT) for a in args))
        if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
            _limit(_replace_size(owner, args[0], args[1]), "a string")
        elif name == "join" and args:
            args = (_materialized(args[0]), *args[1:])
            _limit(_join_size(owner, args[0]), "a joined string")
        elif name == "format":
            _limit(_format_size(owner, [*args, *kwargs.values()]), "a formatted string")
        elif isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive for: count those items too
            args = (_counted(args[0]), *args[1:])
        elif isinstance(__obj, Macro):
            _charge(MACRO_CALL_UNITS)
        return _checked(ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))


def _raise_exception(message: str):
    raise TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    return _environment().from_string(source)


@functools.lru_cache(maxsize=1)
def _environment() -> _BoundedSandbox:
    return _BoundedSandbox()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def render_template(source: str, **variables) -> str:
    """Render a chat template within the budget; every failure is a one-line TemplateError."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateLimitError(f"the chat template is {len(source):,} characters, more than {MAX_TEMPLATE_CHARS:,}")
    token = _BUDGET.set(_Budget())
    try:
        return "".join(_compiled(source).generate(**variables))
    except TemplateError as e:
        raise type(e)(_one_line(e)) from None
    except RecursionError:
        raise TemplateLimitError("the chat template nests or recurses too deeply") from None
    except Exception as e:  # the template's own errors: 1/0, 'a' + 1, a missing key, ...
        raise TemplateError(f"{type(e).__name__}: {_one_line(e)}") from None
    finally:
        _BUDGET.reset(token)
