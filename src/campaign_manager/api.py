"""The library under the CLI, for programs that embed cm: every command of `cm` is one of these functions (or a
few of them) over a session, and the CLI adds nothing but parsing and printing.

    from campaign_manager import api

    settings = api.load_settings()                      # campaign.toml, CM_* variables, defaults
    with api.open_session(settings.database_url) as session:    # one transaction, committed on success
        api.create_group(session, "newsletter")
        api.add_recipients(session, "newsletter", ["ada@example.com"])
        api.opt_out_address(session, "bob@example.com", reason="asked by phone", source="crm")

    job = api.submit_job(settings, lambda s: api.stage_import(s, "people.csv", group="newsletter"))
    api.drain(settings)                                 # what `cm worker --drain` does

    with api.open_session(settings.database_url) as session:
        campaign = api.create_campaign(session, title="May", subject="Hi", text="News", groups=["newsletter"])
    api.submit_job(settings, lambda s: api.queue_send(s, settings, campaign.id, notifier="outbox").job)
    api.drain(settings)                                 # the worker sends it
    with api.open_session(settings.database_url) as session:
        api.campaign_stats(session, campaign.id)        # {"sent": 1, ...}; api.iter_deliveries: who got it

Functions raise `CmError` subclasses (`InvalidInput`, `NotFound`, `Conflict`, `ConsentError`, `DatabaseError`,
...) with a one-line message and an `exit_code`; nothing here prints. The consent rules hold on every path: an
opted-out address is never reactivated except by `opt_in`, a forgotten one never comes back except by
`opt_in_address`, and only `mailable()` recipients are ever in an audience. Names not listed in `__all__` (and
the modules behind them) may change between releases; these keep their meaning.
"""

from __future__ import annotations

from campaign_manager.audience.consent import forget, history, mailable, may_add, may_mail, opt_in, opt_out
from campaign_manager.audience.groups import (
    create_group,
    delete_group,
    describe_groups,
    find_group,
    get_group,
    list_groups,
    update_group,
)
from campaign_manager.audience.listing import (
    Selection,
    count_recipients,
    group_recipients,
    iter_recipients,
    select_recipients,
)
from campaign_manager.audience.members import add_recipients, remove_recipients
from campaign_manager.audience.recipients import (
    create_recipient,
    describe,
    export_recipient,
    find_recipient,
    forget_recipient,
    get_recipient,
    opt_in_address,
    opt_out_address,
    update_recipient,
)
from campaign_manager.config import Settings, load_settings
from campaign_manager.db import open_session, upgrade
from campaign_manager.errors import CmError, ConsentError, DatabaseError, InvalidInput, NotFound
from campaign_manager.imports.service import iter_rejects, stage_import, write_rejects, write_rejects_file
from campaign_manager.jobs.drain import DrainReport, drain
from campaign_manager.jobs.queue import enqueue_job, submit_job
from campaign_manager.jobs.records import cancel_job, describe_job, get_job, list_jobs, retry_job
from campaign_manager.jobs.runner import run_in_foreground, run_job
from campaign_manager.sending.campaigns import (
    audience_size,
    create_campaign,
    delete_campaign,
    get_campaign,
    iter_campaigns,
    update_campaign,
)
from campaign_manager.sending.reports import iter_deliveries
from campaign_manager.sending.reports import stats as campaign_stats
from campaign_manager.sending.service import cancel, pause, queue_send, resume, retry

__all__ = [
    "CmError",
    "ConsentError",
    "DatabaseError",
    "DrainReport",
    "InvalidInput",
    "NotFound",
    "Selection",
    "Settings",
    "add_recipients",
    "audience_size",
    "campaign_stats",
    "cancel",
    "cancel_job",
    "count_recipients",
    "create_campaign",
    "create_group",
    "create_recipient",
    "delete_campaign",
    "delete_group",
    "describe",
    "describe_groups",
    "describe_job",
    "drain",
    "enqueue_job",
    "export_recipient",
    "find_group",
    "find_recipient",
    "forget",
    "forget_recipient",
    "get_campaign",
    "get_group",
    "get_job",
    "get_recipient",
    "group_recipients",
    "history",
    "iter_campaigns",
    "iter_deliveries",
    "iter_recipients",
    "iter_rejects",
    "list_groups",
    "list_jobs",
    "load_settings",
    "mailable",
    "may_add",
    "may_mail",
    "open_session",
    "opt_in",
    "opt_in_address",
    "opt_out",
    "opt_out_address",
    "pause",
    "queue_send",
    "remove_recipients",
    "resume",
    "retry",
    "retry_job",
    "run_in_foreground",
    "run_job",
    "select_recipients",
    "stage_import",
    "submit_job",
    "update_campaign",
    "update_group",
    "update_recipient",
    "upgrade",
    "write_rejects",
    "write_rejects_file",
]
