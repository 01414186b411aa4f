"""`cm recipient ...`: the people you mail."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from campaign_manager.cli._common import JsonOption, emit, info, parse_attrs, print_record, state

if TYPE_CHECKING:
    from sqlmodel import Session

    from campaign_manager.audience.listing import Selection

app = typer.Typer(
    name="recipient",
    help="Create, list, update, opt out and forget recipients.\n\nExample: cm recipient list --active",
    no_args_is_help=True,
)

COLUMNS = ("id", "email", "name", "status", "groups")
# Rows a table shows on a terminal when no --limit is given; the rest is one --offset, --json or pipe away.
TERMINAL_ROWS = 1_000
Ref = Annotated[str, typer.Argument(help="Recipient id or email", show_default=False)]
Attrs = Annotated[list[str] | None, typer.Option("--attr", help="KEY=VALUE, repeatable; an empty VALUE removes KEY")]


@app.command("create")
def create(
    ctx: typer.Context,
    email: Annotated[str, typer.Argument(help="Email address", show_default=False)],
    name: Annotated[str | None, typer.Option(help="Display name")] = None,
    phone: Annotated[str | None, typer.Option(help="Phone number")] = None,
    attr: Attrs = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="Add to this group (repeatable)")] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a recipient.

    Example: cm recipient create ada@example.com --name "Ada Lovelace" --attr city=London --group newsletter
    """
    from campaign_manager.audience import recipients

    attributes = parse_attrs(attr)
    with state(ctx).session() as session:
        person = recipients.create_recipient(
            session, email, name=name, phone=phone, attributes=attributes, groups=group or ()
        )
        data = recipients.describe_many(session, [person])[0]
    emit(data, as_json=as_json, render=print_record)


def _list(
    ctx: typer.Context,
    *,
    status: str | None,
    group: str | None,
    search: str | None,
    limit: int | None,
    offset: int,
    as_json: bool,
) -> None:
    from campaign_manager.audience import listing

    with state(ctx).session(write=False) as session:
        selection = listing.select_recipients(
            session, status=status, group=group, search=search, limit=limit, offset=offset
        )
        show_recipients(ctx, session, selection, as_json=as_json)


def show_recipients(ctx: typer.Context, session: Session, selection: Selection, *, as_json: bool) -> None:
    """A listing of recipients, streamed as it is read: --json and the table alike hold one page at a time. A
    table on a terminal with no --limit stops after TERMINAL_ROWS rows and says on stderr how to see the rest."""
    from dataclasses import replace
    from itertools import islice

    from campaign_manager.audience import listing
    from campaign_manager.cli._common import print_json_items, print_table, stdout_is_terminal

    if as_json:
        print_json_items(listing.iter_recipients(session, selection))
        return
    if selection.limit is not None or not stdout_is_terminal():
        print_table(listing.iter_recipients(session, selection), COLUMNS)
        return
    # One row more than is shown: whether there is a rest to mention.
    rows = listing.iter_recipients(session, replace(selection, limit=TERMINAL_ROWS + 1))
    shown = print_table(islice(rows, TERMINAL_ROWS), COLUMNS)
    if next(rows, None) is not None:
        total = listing.count_recipients(session, selection) - selection.offset
        start = f" from --offset {selection.offset:,}" if selection.offset else ""
        info(
            ctx,
            f"showed the first {shown:,} of {total:,} recipients{start}; see the rest with --limit and --offset, "
            "or all of them with --json or through a pipe (cm ... | less)",
        )


@app.command("list")
def list_(
    ctx: typer.Context,
    active: Annotated[bool, typer.Option("--active", help="Only active recipients")] = False,
    opted_out: Annotated[bool, typer.Option("--opted-out", help="Only opted-out recipients")] = False,
    bounced: Annotated[bool, typer.Option("--bounced", help="Only recipients whose address hard-bounced")] = False,
    pending: Annotated[
        bool, typer.Option("--pending", help="Only sign-ups on cm serve's form not confirmed yet (never mailed)")
    ] = False,
    group: Annotated[str | None, typer.Option(help="Only members of this group (id or name)")] = None,
    search: Annotated[str | None, typer.Option(help="Text to find in the email or name")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many")] = None,
    offset: Annotated[int, typer.Option(help="Skip this many first")] = 0,
    as_json: JsonOption = False,
) -> None:
    """List recipients.

    Example: cm recipient list --active --group newsletter --search example.com --limit 20 --json
    """
    from campaign_manager.errors import InvalidInput
    from campaign_manager.states import RecipientStatus

    chosen = [
        s
        for s, on in (
            (RecipientStatus.ACTIVE, active),
            (RecipientStatus.OPTED_OUT, opted_out),
            (RecipientStatus.BOUNCED, bounced),
            (RecipientStatus.PENDING, pending),
        )
        if on
    ]
    if len(chosen) > 1:
        raise InvalidInput("--active, --opted-out, --bounced and --pending exclude each other")
    status = chosen[0] if chosen else None
    _list(ctx, status=status, group=group, search=search, limit=limit, offset=offset, as_json=as_json)


@app.command("active")
def active(
    ctx: typer.Context,
    group: Annotated[str | None, typer.Option(help="Only members of this group (id or name)")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many")] = None,
    offset: Annotated[int, typer.Option(help="Skip this many first")] = 0,
    as_json: JsonOption = False,
) -> None:
    """List the active recipients (the same as `list --active`).

    Example: cm recipient active --json
    """
    from campaign_manager.states import RecipientStatus

    _list(ctx, status=RecipientStatus.ACTIVE, group=group, search=None, limit=limit, offset=offset, as_json=as_json)


@app.command("show")
def show(ctx: typer.Context, ref: Ref, as_json: JsonOption = False) -> None:
    """Show one recipient.

    Example: cm recipient show ada@example.com
    """
    from campaign_manager.audience import recipients

    with state(ctx).session(write=False) as session:
        data = recipients.describe_many(session, [recipients.get_recipient(session, ref)])[0]
    emit(data, as_json=as_json, render=print_record)


@app.command("update")
def update(
    ctx: typer.Context,
    ref: Ref,
    name: Annotated[str | None, typer.Option(help="New name (empty to clear)")] = None,
    phone: Annotated[str | None, typer.Option(help="New phone (empty to clear)")] = None,
    attr: Attrs = None,
    add_group: Annotated[list[str] | None, typer.Option("--add-group", help="Add to group (repeatable)")] = None,
    remove_group: Annotated[
        list[str] | None, typer.Option("--remove-group", help="Remove from group (repeatable)")
    ] = None,
    clear_bounce: Annotated[
        bool, typer.Option("--clear-bounce", help="Mail this hard-bounced address again (it was fixed)")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Change a recipient's name, phone, attributes or groups (not their consent: see opt-out/opt-in), or clear a
    hard bounce.

    Example: cm recipient update ada@example.com --attr plan=pro --add-group vip --remove-group trial
    """
    from campaign_manager.audience import recipients

    attributes = parse_attrs(attr)
    with state(ctx).session() as session:
        person = recipients.update_recipient(
            session,
            ref,
            name=name,
            phone=phone,
            attributes=attributes,
            add_groups=add_group or (),
            remove_groups=remove_group or (),
            clear_bounce=clear_bounce,
        )
        data = recipients.describe_many(session, [person])[0]
    emit(data, as_json=as_json, render=print_record)


@app.command("opt-out")
def opt_out(
    ctx: typer.Context,
    email: Annotated[
        str | None, typer.Argument(help="Email address (need not be in the database yet)", show_default=False)
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why, for the consent log")] = None,
    token: Annotated[
        str | None, typer.Option(help="An unsubscribe token from a message (the mailto: link's subject)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Opt an address out: it is never mailed again until an explicit opt-in.

    Example: cm recipient opt-out bob@example.com --reason "asked by phone"
    """
    from campaign_manager.audience import recipients
    from campaign_manager.errors import InvalidInput

    if (email is None) == (token is None):
        raise InvalidInput("give an email address or --token, not both")
    with state(ctx).session() as session:
        if token is not None:
            from campaign_manager.sending.unsubscribe import opt_out_by_token

            found = opt_out_by_token(session, state(ctx).settings, token, reason=reason)
            if found is None:
                info(ctx, "a test token, or a person since forgotten: nothing to do")
                return
            person, changed = found
        else:
            person, changed = recipients.opt_out_address(
                session, email or "", reason=reason, source="cm recipient opt-out"
            )
        data = recipients.describe_many(session, [person])[0]
    # People are named by id on stderr: a terminal's scrollback and a log outlive `forget`.
    info(ctx, f"recipient {data['id']} {'opted out' if changed else 'was already opted out'}")
    emit(data, as_json=as_json, render=print_record)


@app.command("opt-in")
def opt_in(
    ctx: typer.Context,
    ref: Ref,
    reason: Annotated[str | None, typer.Option(help="Why, for the consent log")] = None,
    as_json: JsonOption = False,
) -> None:
    """Make an opted-out (or forgotten) address active again: the only way back.

    Example: cm recipient opt-in bob@example.com --reason "re-subscribed on the website"
    """
    from campaign_manager.audience import recipients

    with state(ctx).session() as session:
        person, changed = recipients.opt_in_address(session, ref, reason=reason, source="cm recipient opt-in")
        data = recipients.describe_many(session, [person])[0]
    info(ctx, f"recipient {data['id']} {'opted in' if changed else 'was already active'}")
    emit(data, as_json=as_json, render=print_record)


@app.command("export")
def export(ctx: typer.Context, ref: Ref) -> None:
    """Print everything held about a person, consent history included, as JSON (a GDPR access request).

    Example: cm recipient export ada@example.com > ada.json
    """
    from campaign_manager.audience import recipients
    from campaign_manager.cli._common import print_json

    with state(ctx).session(write=False) as session:
        data = recipients.export_recipient(session, ref)
    print_json(data)


@app.command("forget")
def forget(ctx: typer.Context, ref: Ref, as_json: JsonOption = False) -> None:
    """Erase a person's data (GDPR); only a hash of the address is kept, so nothing brings them back.

    Works for an address no recipient holds yet (one a queued import would add, say): it is suppressed all the
    same, and taken out of every staged upload and rejected import row.

    Example: cm recipient forget bob@example.com
    """
    from campaign_manager.audience import recipients

    with state(ctx).session() as session:
        data = recipients.forget_recipient(session, ref, source="cm recipient forget")
    who = f"recipient {data['id']}" if data["id"] is not None else "the address (no recipient held it)"
    if not data["changed"]:
        info(ctx, "that address was already forgotten")
    else:
        uploads = f"; taken out of {data['staged_uploads']} staged upload(s)" if data["staged_uploads"] else ""
        info(ctx, f"forgot {who}; the address is suppressed for good{uploads}")
    emit(data, as_json=as_json, render=print_record)
