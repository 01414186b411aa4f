"""Templates (sending/templates.py, through render.py): the variables a template sees, what is escaped, the
sandbox, and the errors a recipient's data or a template can cause, each one line without an address."""

from __future__ import annotations

import pytest

from campaign_manager.errors import InvalidInput
from campaign_manager.notifiers import Need
from campaign_manager.sections import UnsubscribeSettings
from campaign_manager.sending.render import RenderError, Target, check_templates
from campaign_manager.tables.sending import Campaign
from test_render import ANN, LINE_BREAKS, campaign, renderer

# --- Template variables and escaping ------------------------------------------------------------------------


def test_variables_and_escaping() -> None:
    c = campaign(
        subject="{{ name }} in {{ city }} {{ bio }}",
        text="{{ name }}|{{ email }}|{{ bio }}|{{ recipient.attributes['first name'] }}|{{ campaign.id }}"
        "|{{ campaign.title }}|{{ recipient.phone }}|{{ unsubscribe_url }}",
        html="{{ name }}|{{ bio }}|{{ campaign.title }}|<a href='{{ unsubscribe_url }}'>",
    )
    attributes = {"city": "Oslo", "bio": "<b>bold</b> & 'q'", "first name": "A&B", "name": "attribute"}
    message = renderer(c, unsubscribe=UnsubscribeSettings(url="https://x.example/u?t={token}&a=1")).render(
        Target(1, 2, "ann@example.com", "Ann <A&B>", "+4712345678", attributes)
    )
    token = message.headers[0][1][1:-1].split("t=")[1].split("&")[0]
    url = f"https://x.example/u?t={token}&a=1"
    # Subject and text are not HTML: nothing is escaped. The attribute `name` does not shadow the recipient's name.
    assert message.subject == "Ann <A&B> in Oslo <b>bold</b> & 'q'"
    assert message.text == f"Ann <A&B>|ann@example.com|<b>bold</b> & 'q'|A&B|7|May <news>|+4712345678|{url}"
    # HTML is: every value from data, the campaign's title and the URL (its & as &amp;, right in an attribute).
    assert message.html == (
        "Ann &lt;A&amp;B&gt;|&lt;b&gt;bold&lt;/b&gt; &amp; &#39;q&#39;|May &lt;news&gt;|"
        f"<a href='{url.replace('&', '&amp;')}'>"
    )


def test_attributes_never_shadow_cm_or_jinja_names() -> None:
    attributes = {n: "attribute" for n in ("name", "email", "campaign", "unsubscribe_url", "recipient", "range")}
    c = campaign(text="{{ name }} {{ email }} {{ campaign.id }} {{ range(2)|list }} {{ recipient.attributes.range }}")
    message = renderer(c).render(ANN._replace(attributes=attributes))
    assert message.text == "Ann Lee ann@example.com 7 [0, 1] attribute"


def test_a_set_in_one_template_stays_in_it() -> None:
    c = campaign(subject="{% set name = 'changed' %}{{ name }}", text="{{ name }}")
    message = renderer(c).render(ANN)
    assert (message.subject, message.text) == ("changed", "Ann Lee")


def test_a_missing_name_is_empty_not_none() -> None:
    message = renderer(campaign(text="Hi {{ name or 'there' }}|{{ name }}|")).render(ANN._replace(name=None))
    assert message.text == "Hi there||"


# --- Errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("c", "reason"),
    [
        (campaign(text="a\n{{ city }}\n{{ county }}"), "the text template, line 3: 'county' is undefined"),
        (campaign(subject="{{ nope }}"), "the subject template, line 1: 'nope' is undefined"),
        (campaign(html="{{ recipient.attributes.zip }}"), "the html template, line 1: 'dict object' has no attribute"),
        (campaign(text="{{ 1 / 0 }}"), "the text template, line 1: ZeroDivisionError: division by zero"),
    ],
)
def test_undefined_variables_and_failures_are_render_errors(c: Campaign, reason: str) -> None:
    with pytest.raises(RenderError) as caught:
        renderer(c).render(ANN)
    assert caught.value.reason.startswith(reason)


def test_a_reason_never_names_the_address() -> None:
    for text in ("{{ recipient.attributes[email] }}", "{{ recipient.attributes[email|upper] }}"):
        with pytest.raises(RenderError) as caught:
            renderer(campaign(text=text)).render(ANN)
        assert "<recipient>" in caught.value.reason and "ann@example.com" not in caught.value.reason.lower()


@pytest.mark.parametrize("char", list(LINE_BREAKS))
def test_a_line_break_from_data_never_reaches_a_header(char: str) -> None:
    with pytest.raises(RenderError, match="the recipient's name holds a line break"):
        renderer().render(ANN._replace(name=f"Ann{char}Bcc: x@example.com"))
    with pytest.raises(RenderError, match="the subject holds a line break once rendered"):
        renderer(campaign(subject="News for {{ city }}")).render(ANN._replace(attributes={"city": f"Oslo{char}X: y"}))


def test_max_message_bytes() -> None:
    loop = campaign(text="{% for i in range(100000) %}0123456789{% endfor %}")
    with pytest.raises(RenderError, match=r"^message larger than 10,000 bytes$"):
        renderer(loop, max_message_bytes=10_000).render(ANN)
    big = campaign(text="{{ blob }}")
    for size in (9_700, 20_000):  # the text fits, the headers push it over; the text alone is too large
        with pytest.raises(RenderError, match="message larger than 10,000 bytes"):
            renderer(big, max_message_bytes=10_000).render(ANN._replace(attributes={"blob": "x" * size}))
    small = renderer(big, max_message_bytes=10_000).render(ANN._replace(attributes={"blob": "x" * 5_000}))
    assert len(small.data) <= 10_000


def test_need_phone() -> None:
    r = renderer(need=Need.PHONE)
    assert r.render(ANN._replace(phone="+4712345678")).to == "+4712345678"
    with pytest.raises(RenderError, match=r"^no phone$"):
        r.render(ANN)
    assert renderer().render(ANN._replace(phone="+4712345678")).to == "ann@example.com"


# --- The sandbox ----------------------------------------------------------------------------------------------

# Caught before any campaign is saved (check_templates) ...
REFUSED_AT_CHECK = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ ''|attr('__class__') }}",
    "{{ [1]|map(attribute='__class__')|list }}",
    "{{ recipient._asdict() }}",
    "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ self.__init__ }}",
    "{% set ns = namespace() %}{% set ns.__x = 1 %}",
    "{% include 'x' %}",
    "{% extends 'base' %}",
    "{% import 'macros' as m %}",
    "{{ name ",
    "{% for %}",
]
# ... or refused by the sandbox when the message is rendered.
REFUSED_AT_RENDER = [
    "{{ '{0.__class__}'.format(1) }}",
    "{{ '{0.__class__}'.format_map({}) }}",
    "{{ recipient['_asdict'] }}",
    "{{ recipient.attributes.update({'x': 1}) }}",
    "{{ recipient.attributes.pop('city') }}",
    "{{ 'x' * 100000000 }}",
    "{{ 2 ** 100000 }}",
    "{{ range(10 ** 9)|list }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
]


@pytest.mark.parametrize("source", REFUSED_AT_CHECK)
@pytest.mark.parametrize("which", ["subject", "text", "html"])
def test_check_templates_refuses(source: str, which: str) -> None:
    templates = {"subject": "s", "text": "t", "html": None, which: source}
    with pytest.raises(InvalidInput, match=f"^the {which} template, line 1: ") as caught:
        check_templates(templates["subject"] or "", templates["text"] or "", templates["html"])
    assert "\n" not in caught.value.message
    with pytest.raises(InvalidInput):  # a Renderer compiles the same way
        renderer(campaign(**{which: source}))


@pytest.mark.parametrize("source", REFUSED_AT_RENDER)
def test_the_sandbox_refuses_at_render(source: str) -> None:
    check_templates(source, source, source)
    with pytest.raises(RenderError) as caught:
        renderer(campaign(text=source)).render(ANN)
    assert caught.value.reason.startswith("the text template, line 1: ") and "\n" not in caught.value.reason


def test_check_templates_names_the_line() -> None:
    check_templates("Hi {{ name }}", "Hello\n{{ name }}\n", "<p>{{ name }}</p>")
    check_templates("Hi", "Hello", None)
    with pytest.raises(InvalidInput, match=r"^the html template, line 3: unexpected '\)'$"):
        check_templates("s", "t", "<p>\n{{ name }}\n{{ name ) }}")


def test_a_lone_surrogate_is_a_render_error() -> None:
    with pytest.raises(RenderError, match="not valid Unicode"):
        renderer(campaign(text="{{ city }}")).render(ANN._replace(attributes={"city": "\ud800"}))


def test_dict_keys_by_dot_and_by_index() -> None:
    """`attributes.x` is the key x, unless x is a dict method (`items`, `get`): then the method, as in Jinja."""
    c = campaign(
        text="{{ recipient.attributes.city }}|{{ recipient.attributes['items'] }}|"
        "{% for k, v in recipient.attributes.items() %}{{ k }}={{ v }};{% endfor %}|"
        "{{ recipient.attributes.get('x', 0) }}"
    )
    message = renderer(c).render(ANN._replace(attributes={"city": "Oslo", "items": "3"}))
    assert message.text == "Oslo|3|city=Oslo;items=3;|0"
    with pytest.raises(RenderError, match="has no attribute 'zip'"):
        renderer(campaign(text="{{ recipient.attributes.zip }}")).render(ANN)


def test_defaults_for_data_a_recipient_may_lack() -> None:
    """What docs/templates.md tells a template author to write for an attribute not every recipient has."""
    c = campaign(
        text="{{ city|default('there') }}|{% if zip is defined %}{{ zip }}{% else %}none{% endif %}"
        "|{{ recipient.attributes.get('zip', '-') }}"
    )
    assert renderer(c).render(ANN._replace(attributes={})).text == "there|none|-"
    assert renderer(c).render(ANN._replace(attributes={"city": "Oslo", "zip": "0150"})).text == "Oslo|0150|0150"
