"""`cm group ...`: named sets of recipients."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from campaign_manager.cli._common import JsonOption, emit, emit_items, info, print_record, print_table, state
from campaign_manager.cli._imports import Delimiter, EmailColumn, Encoding, UpdateExisting, Wait, run_import

app = typer.Typer(
    name="group", help="Create groups and manage their members.\n\nExample: cm group list", no_args_is_help=True
)

COLUMNS = ("id", "name", "description", "public", "members", "active_members")
Ref = Annotated[str, typer.Argument(help="Group id or name", show_default=False)]
Emails = Annotated[list[str] | None, typer.Option("--email", help="Email address (repeatable)")]


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Group name", show_default=False)],
    description: Annotated[str | None, typer.Option(help="What the group is for")] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a group.

    Example: cm group create newsletter --description "Monthly news"
    """
    from campaign_manager.audience import groups

    with state(ctx).session() as session:
        data = groups.describe_groups(session, [groups.create_group(session, name, description=description)])[0]
    emit(data, as_json=as_json, render=print_record)


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List groups with their member and active-member counts, and whether the sign-up form offers them.

    Example: cm group list --json
    """
    from campaign_manager.audience import groups

    with state(ctx).session(write=False) as session:
        rows = groups.describe_all_groups(session)
    emit_items(rows, as_json=as_json, columns=COLUMNS)


@app.command("show")
def show(ctx: typer.Context, ref: Ref, as_json: JsonOption = False) -> None:
    """Show one group.

    Example: cm group show newsletter
    """
    from campaign_manager.audience import groups

    with state(ctx).session(write=False) as session:
        data = groups.describe_groups(session, [groups.get_group(session, ref)])[0]
    emit(data, as_json=as_json, render=print_record)


@app.command("update")
def update(
    ctx: typer.Context,
    ref: Ref,
    name: Annotated[str | None, typer.Option(help="New name")] = None,
    description: Annotated[str | None, typer.Option(help="New description (empty to clear)")] = None,
    public: Annotated[
        bool | None, typer.Option("--public/--no-public", help="Offer the group on cm serve's sign-up form, or stop")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Rename a group, change its description, or offer it on `cm serve`'s sign-up form (--public).

    Example: cm group update newsletter --name news --description "Weekly news"

    Example: cm group update newsletter --public
    """
    from campaign_manager.audience import groups

    with state(ctx).session() as session:
        group = groups.update_group(session, ref, name=name, description=description, public=public)
        data = groups.describe_groups(session, [group])[0]
    emit(data, as_json=as_json, render=print_record)


@app.command("delete")
def delete(ctx: typer.Context, ref: Ref, as_json: JsonOption = False) -> None:
    """Delete a group. Its recipients stay.

    Example: cm group delete trial
    """
    from campaign_manager.audience import groups

    with state(ctx).session() as session:
        data = groups.delete_group(session, ref)
    info(ctx, f"deleted group {data['name']!r} ({data['members']} members kept as recipients)")
    emit(data, as_json=as_json, render=print_record)


def _report(ctx: typer.Context, results: list[dict[str, Any]], as_json: bool, columns: tuple[str, ...]) -> None:
    emit(results, as_json=as_json, render=lambda r: print_table(r, columns))
    tally: dict[str, int] = {}
    for item in results:
        tally[item["outcome"]] = tally.get(item["outcome"], 0) + 1
    info(ctx, ", ".join(f"{n} {outcome.replace('_', ' ')}" for outcome, n in tally.items()) or "nothing to do")


@app.command("add-recipients")
def add_recipients(
    ctx: typer.Context,
    ref: Ref,
    email: Emails = None,
    csv: Annotated[
        str | None, typer.Option("--csv", help="Import a CSV file (- for standard input) as a background job")
    ] = None,
    wait: Wait = False,
    email_column: EmailColumn = None,
    delimiter: Delimiter = None,
    encoding: Encoding = None,
    update_existing: UpdateExisting = False,
    as_json: JsonOption = False,
) -> None:
    """Add recipients to a group, creating the ones that do not exist yet.

    With --email (a handful of addresses) it works at once and reports each address as created, added,
    already_member, duplicate, invalid (with the reason) or suppressed (opted out or forgotten: never added,
    never reactivated); if any address is invalid it exits 2, after applying the valid ones. With --csv it
    queues an import job and prints its id (add --wait to run it here); `cm jobs show ID` then gives the
    counts and `--rejects` the rows it could not take.

    Example: cm group add-recipients newsletter --email ada@example.com --email bob@example.com

    Example: cm group add-recipients newsletter --csv people.csv && cm worker --drain
    """
    from campaign_manager.audience import members
    from campaign_manager.errors import InvalidInput

    if csv is not None:
        if email:
            raise InvalidInput("give --email or --csv, not both")
        from campaign_manager.imports.service import stage_import

        run_import(
            ctx,
            lambda session: stage_import(
                session,
                csv,
                group=ref,
                email_column=email_column,
                delimiter=delimiter,
                encoding=encoding,
                update_existing=update_existing,
            ),
            wait=wait,
            as_json=as_json,
        )
        return
    if not email:
        raise InvalidInput("give at least one --email, or --csv FILE")
    with state(ctx).session() as session:
        results = members.add_recipients(session, ref, email)
    _report(ctx, results, as_json, ("input", "email", "outcome", "reason"))
    invalid = sum(1 for item in results if item["outcome"] == members.MemberOutcome.INVALID)
    if invalid:
        # The valid addresses are in (committed above); the exit code still tells a script that some were not.
        raise InvalidInput(f"{invalid} of {len(results)} addresses were invalid; the others were applied")


@app.command("remove-recipients")
def remove_recipients(ctx: typer.Context, ref: Ref, email: Emails = None, as_json: JsonOption = False) -> None:
    """Take recipients out of a group (they stay in the database).

    Example: cm group remove-recipients newsletter --email bob@example.com
    """
    from campaign_manager.audience import members
    from campaign_manager.errors import InvalidInput

    if not email:
        raise InvalidInput("give at least one --email")
    with state(ctx).session() as session:
        results = members.remove_recipients(session, ref, email)
    _report(ctx, results, as_json, ("input", "outcome"))


@app.command("recipients")
def recipients(
    ctx: typer.Context,
    ref: Ref,
    active: Annotated[bool, typer.Option("--active", help="Only active members")] = False,
    as_json: JsonOption = False,
) -> None:
    """List a group's members.

    Example: cm group recipients newsletter --active
    """
    from campaign_manager.audience import listing
    from campaign_manager.cli.recipient import show_recipients

    with state(ctx).session(write=False) as session:
        selection = listing.group_recipients(session, ref, active_only=active)
        show_recipients(ctx, session, selection, as_json=as_json)
