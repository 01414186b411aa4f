"""cm serve's pages in a real browser (tests/browser.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from browser import Browser, browser_fixture  # noqa: F401  (fixture `browser`: see the module)
from serve_process import ServeProcess


def test_index_page(sqlite_url: str, serve_factory: Callable[..., ServeProcess], browser: Browser) -> None:
    server = serve_factory(sqlite_url)
    browser.open(server.url + "/")
    assert "Sign up" in browser.text()
    assert browser.shots[0].stat().st_size > 1000


PAGE = '<!doctype html><html><head><meta name="viewport" content="width=device-width, initial-scale=1"></head><body>{}'


def test_the_page_check_catches_what_it_is_for(browser: Browser) -> None:
    """The checks every page gets can fail: a page too wide for the phone, one with a script, one without the
    viewport meta tag (a phone would lay it out 980 px wide and shrink it); a plain page passes."""
    browser.open("data:text/html," + PAGE.format("<p>fits</p>"))
    bad = {
        "scrolls sideways": PAGE.format('<div style="width: 600px">wide</div>'),
        "<script>": PAGE.format("<p>x</p><script>1</script>"),
        "no viewport meta tag": "<!doctype html><html><body><p>no viewport</p>",
    }
    for message, html in bad.items():
        with pytest.raises(AssertionError, match=message):
            browser.open("data:text/html," + html)
    assert len(browser.shots) == 4
