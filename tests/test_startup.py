"""Start-up: a command imports what it uses and nothing more, checked in the installed `cm` run as a real process
(PYTHONPROFILEIMPORTTIME makes Python list every module the process imports, on stderr). What this keeps out is what
`make bench` measures as start-up (bench/startup.py); a module that comes back slows every such command again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from campaign_manager import db
from conftest import run_cm_process

# Never needed to show help or to list what is in the database.
NOT_FOR_LISTING = (
    "email_validator",  # validating addresses: creates, imports, opt-outs (campaign_manager.audience.addresses)
    "huey",
    "redis",
    "alembic",
    "mako",
    "jinja2",
    "aiosmtplib",
    "psycopg",  # a SQLite database
    "campaign_manager.audience.addresses",
    "campaign_manager.audience.members",
    "campaign_manager.audience.recipients",
    "campaign_manager.imports",
    "campaign_manager.jobs",
    "campaign_manager.notifiers",
    "campaign_manager.sending",
    "campaign_manager.api",
    "campaign_manager.models",  # every table: a listing loads the audience's (tables.audience)
    "campaign_manager.tables.jobs",
    "campaign_manager.tables.sending",
    "typer._adapters",  # Typer's pydantic coercion of option values (cli/_params.py)
)
# Nor to show help: nothing of the database.
NOT_FOR_HELP = (
    *NOT_FOR_LISTING,
    "sqlalchemy",
    "sqlmodel",
    "pydantic",
    "campaign_manager.tables",
    "campaign_manager.db",
    "importlib.metadata",
    "rich",
)
LIGHT = {
    "cm --help": (["--help"], NOT_FOR_HELP),
    "cm --version": (["--version"], NOT_FOR_HELP),
    "cm group --help": (["group", "--help"], NOT_FOR_HELP),
    "cm recipient list --help": (["recipient", "list", "--help"], NOT_FOR_HELP),
    "cm group list": (["group", "list"], NOT_FOR_LISTING),
    "cm group list --json": (["group", "list", "--json"], NOT_FOR_LISTING),
    "cm recipient list": (["recipient", "list", "--limit", "10", "--offset", "0"], NOT_FOR_LISTING),
    "cm recipient list --group": (["recipient", "list", "--group", "news", "--active"], NOT_FOR_LISTING),
    "cm group recipients": (["group", "recipients", "news"], NOT_FOR_LISTING),
}
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.MULTILINE)


def imported(args: list[str], *, env: dict[str, str], cwd: Path) -> set[str]:
    """Every module `cm ARGS` imported, in a real process; the command must succeed."""
    done = run_cm_process(args, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(_IMPORT_LINE.findall(done.stderr))


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """The names (packages count with their submodules) of which `modules` holds any."""
    return [name for name in names if any(m == name or m.startswith(name + ".") for m in modules)]


@pytest.fixture(scope="module")
def house(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    """A database with a group of two, one of them opted out, for every command below to read."""
    home = tmp_path_factory.mktemp("startup")
    env = {
        "CM_DATABASE_URL": str(home / "cm.db"),
        "XDG_DATA_HOME": str(home / "xdg-data"),
        "XDG_CONFIG_HOME": str(home / "xdg-config"),
    }
    db.upgrade(env["CM_DATABASE_URL"])
    for args in (
        ["group", "create", "news"],
        ["group", "add-recipients", "news", "--email", "ada@example.com", "--email", "bob@example.com"],
        ["recipient", "opt-out", "bob@example.com"],
    ):
        done = run_cm_process(args, env=env, cwd=home)
        assert done.returncode == 0, done.stderr
    return env, home


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_a_light_command_imports_nothing_it_does_not_use(house: tuple[dict[str, str], Path], name: str) -> None:
    env, home = house
    args, forbidden = LIGHT[name]
    modules = imported(args, env=env, cwd=home)
    assert "campaign_manager.cli" in modules  # the list is real: it holds what the command did import
    assert loaded(modules, forbidden) == []


def test_the_check_sees_what_a_command_imports(house: tuple[dict[str, str], Path]) -> None:
    """The check can fail: a command that validates an address imports email-validator, and it is seen."""
    env, home = house
    modules = imported(["recipient", "show", "ada@example.com"], env=env, cwd=home)
    assert loaded(modules, NOT_FOR_LISTING) == [
        "email_validator",
        "campaign_manager.audience.addresses",
        "campaign_manager.audience.recipients",
        "campaign_manager.imports",  # recipients -> imports.scrub, for `forget`
        "campaign_manager.tables.jobs",  # an export lists the person's rejected import rows ...
        "campaign_manager.tables.sending",  # ... and the campaigns that name them
    ]
