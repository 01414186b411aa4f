from __future__ import annotations

from collections.abc import Callable

from conftest import Run


def test_group_roundtrip(cm: Callable[..., Run]) -> None:
    cm("group create news --description Monthly")
    cm("group add-recipients news --email Ada@Example.com --email bob@example.com")
    cm("recipient opt-out bob@example.com --reason asked")
    active = cm("recipient list --active --json").json()
    assert [r["email"] for r in active] == ["Ada@example.com"]
    groups = cm("group list --json").json()
    assert groups[0]["members"] == 2 and groups[0]["active_members"] == 1
