"""Campaign templates: Jinja2 in a sandbox, compiled once, rendered with a size limit.

The subject, the text body and the HTML body are Jinja2 templates. They run in Jinja's immutable sandbox: no
attribute or item whose name starts with `_`, no method that changes a list or dict, `str.format` checked alike,
`range` bounded. The values they see come from recipients' data (CSV attributes are untrusted), so the HTML body is
autoescaped and every undefined variable is an error (StrictUndefined) rather than an empty string in a sent message.
Subject and text are not escaped: they are not HTML.

The templates themselves are the operator's: `check_templates` refuses what cannot work (a syntax error, an include,
a name starting with `_`) before a campaign is saved, but a template can still be written to run slowly; its author's
`cm campaign preview` shows that before a send. Rendering stops once the output passes the message size limit, so a
loop cannot build a huge message, and `*` and `**` refuse results beyond that size.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from jinja2 import StrictUndefined, Template, nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from campaign_manager.errors import InvalidInput

Which = Literal["subject", "text", "html"]

# The largest string or list `*` may make, and the largest integer exponent of `**`: beyond them a template is
# building something no message holds (the size limit catches output, not intermediate values).
MAX_PRODUCT = 10_000_000
MAX_EXPONENT = 1_000
# Node types a template may not use: there is no loader, so these could only fail at send time.
_NO_LOADER = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
_LOOPS = (nodes.For, nodes.Macro, nodes.CallBlock)


class RenderError(Exception):
    """One message could not be rendered for one recipient. `reason` is one line without the recipient's address
    (it reads `<recipient>`): it is stored as the delivery's error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooLarge(Exception):
    """Rendering went past the size budget."""


class RecipientView(NamedTuple):
    """`recipient` in a template."""

    name: str
    email: str
    phone: str
    attributes: Mapping[str, Any]


class CampaignView(NamedTuple):
    """`campaign` in a template."""

    id: int
    title: str


# Attributes the sandbox may hand out without its checks: the fields of cm's own views, plain values all. Its checks
# (abstract-class tests of every value against the mutable collections) were a third of a message's rendering time.
_FIELDS: dict[type, frozenset[str]] = {view: frozenset(view._fields) for view in (RecipientView, CampaignView)}
_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if attribute in _FIELDS.get(kind, ()):
            return getattr(obj, attribute)
        # `attributes.city`: a key of a plain dict that is no dict method (a method would win, as Jinja has it).
        if kind is dict and attribute not in _DICT_ATTRIBUTES and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > MAX_EXPONENT:
                raise SecurityError(f"the exponent {right} is larger than {MAX_EXPONENT}")
        else:
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > MAX_PRODUCT:
                    raise SecurityError(f"`*` would make a value longer than {MAX_PRODUCT:,}")
        return super().call_binop(context, operator, left, right)


def _environment(*, autoescape: bool) -> _Sandbox:
    return _Sandbox(
        undefined=StrictUndefined,
        autoescape=autoescape,
        keep_trailing_newline=True,  # a body ending in a newline keeps it
        auto_reload=False,
        cache_size=0,  # templates are compiled here and kept by their renderer, never looked up by name
    )


_PLAIN = _environment(autoescape=False)  # subject and text
_HTML = _environment(autoescape=True)
# Names of Jinja's globals (range, dict, namespace, ...): recipient attributes never shadow them.
GLOBAL_NAMES = frozenset(_PLAIN.globals)


class Compiled(NamedTuple):
    which: Which
    template: Template
    loops: bool  # it has a loop or a macro: its output's size is not bounded by its size and its data's
    static: str | None  # the output of a template that is only text (a fixed subject): Jinja is not run for it


def compile_template(which: Which, source: str) -> Compiled:
    """The compiled template, or InvalidInput naming the template, the line and what is wrong."""
    env = _HTML if which == "html" else _PLAIN
    try:
        tree = env.parse(source, name=which, filename=_filename(which))
        _check_tree(tree)
        code = env.compile(tree, name=which, filename=_filename(which))
    except TemplateSyntaxError as exc:
        raise InvalidInput(f"the {which} template, line {exc.lineno}: {_one_line(exc.message or str(exc))}") from None
    # Plain-dict globals: Jinja's own ChainMap is merged into every context at a cost (see render_limited).
    template = env.template_class.from_code(env, code, dict(env.globals))
    loops = any(True for _ in tree.find_all(_LOOPS))
    only_text = all(isinstance(node, nodes.Output) for node in tree.body) and all(
        isinstance(node, nodes.TemplateData) for node in tree.find_all(nodes.Expr)
    )
    return Compiled(which, template, loops, template.render() if only_text else None)


def check_templates(subject: str, text: str, html: str | None) -> None:
    """Compile the three templates as a send would; InvalidInput (one line, naming the template) if one fails."""
    compile_template("subject", subject)
    compile_template("text", text)
    if html is not None:
        compile_template("html", html)


def _check_tree(tree: nodes.Template) -> None:
    """What the sandbox would refuse only at send time, refused now (as a syntax error, for its line number)."""
    for statement in tree.find_all(_NO_LOADER):
        keyword = type(statement).__name__.lower().replace("fromimport", "from ... import")
        raise TemplateSyntaxError(f"{{% {keyword} %}} is not available: a campaign is one template", statement.lineno)
    # `x._y` always fails in the sandbox; a string '__y' is how `|attr`, `|map(attribute=...)` and their kind
    # reach for the same (`map` would quietly yield undefined values).
    for node in tree.find_all((nodes.Getattr, nodes.NSRef, nodes.Const)):
        name: object
        if isinstance(node, nodes.Getattr | nodes.NSRef):
            name, prefix = node.attr, "_"
        else:
            name, prefix = getattr(node, "value", None), "__"
        if isinstance(name, str) and name.startswith(prefix):
            raise TemplateSyntaxError(f"{name!r}: names starting with '_' are not available in templates", node.lineno)


def render_limited(compiled: Compiled, variables: dict[str, Any], budget: int) -> str:
    """The template's output, or TooLarge once it passes `budget` characters (every character is at least one byte
    of the message), or RenderError saying what failed where.

    `variables` must hold Jinja's globals too (`template_variables`): it becomes the template's context as it is,
    not copied, which is what `Template.generate` would spend most of its time on (merging the globals each call).
    The three templates of one message share it; a template's `{% set %}` writes its own context, not this dict.
    A template without loops is joined whole (its output is about its size plus its data's, and `*` is bounded);
    one with loops is counted as it goes, so that a loop cannot build a huge message first."""
    template = compiled.template
    if compiled.static is not None:
        if len(compiled.static) > budget:
            raise TooLarge
        return compiled.static
    try:
        chunks = template.root_render_func(template.new_context(variables, shared=True))
        if not compiled.loops:
            output = "".join(chunks)
            if len(output) > budget:
                raise TooLarge
            return output
        pieces: list[str] = []
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > budget:
                raise TooLarge
            pieces.append(chunk)
        return "".join(pieces)
    except TooLarge:
        raise
    except Exception as exc:  # a template can raise anything Python can (TypeError, ZeroDivisionError, ...)
        which = compiled.which
        raise RenderError(f"the {which} template{_line(exc, template, which)}: {_describe(exc)}") from None


def template_variables() -> dict[str, Any]:
    """A fresh dict holding Jinja's globals (range, dict, namespace, ...), to which a message's variables are added."""
    return dict(_PLAIN.globals)


def _filename(which: Which) -> str:
    return f"<{which} template>"


def _line(exc: BaseException, template: Template, which: Which) -> str:
    """', line N' from the frames Jinja rewrites to point into the template, when there is one."""
    try:
        template.environment.handle_exception()  # raises `exc` again, its traceback rewritten into the template's
    except BaseException as rewritten:
        exc = rewritten
    name = _filename(which)
    found = [line for frame, line in traceback.walk_tb(exc.__traceback__) if frame.f_code.co_filename == name]
    return f", line {found[-1]}" if found else ""


def _describe(exc: BaseException) -> str:
    text = _one_line(str(exc))
    return text if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {text}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
