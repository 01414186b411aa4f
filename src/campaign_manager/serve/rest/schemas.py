"""The API's bodies: what each route takes (bounded: every string within cm's `limits`, every list within a request's
share) and what it answers, including the error body every route declares (`errors`), so that the OpenAPI document
says exactly what a client can get back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from campaign_manager import limits
from campaign_manager.audience.members import MemberOutcome
from campaign_manager.states import CampaignStatus, DeliveryStatus, JobStatus, RecipientStatus

# The largest id there can be: PostgreSQL's integer columns hold no more (a larger one is a 422 on both databases,
# rather than the database's "out of range" on one of them).
MAX_ID = 2**31 - 1
# Addresses in one request; more go through an import (POST /imports). A new campaign's are imported by a job, so
# the request only stages them; a group's are applied in the request and each reported (~2 ms an address: 1,000
# hold SQLite's write lock under two seconds).
MAX_EMAILS = 10_000
MAX_GROUP_EMAILS = 1_000
MAX_GROUPS = 100  # group ids in one body
MAX_ATTRIBUTES = 100  # attributes set in one body
BODY = 1_000_000  # a campaign's text or HTML body, in characters


def _has_at(value: str) -> str:
    if "@" not in value:
        raise PydanticCustomError("email", "an email address needs an @")
    return value


_EARLIEST = datetime.min.replace(tzinfo=UTC) + timedelta(days=1)
_LATEST = datetime.max.replace(tzinfo=UTC) - timedelta(days=1)


def _utc(value: datetime) -> datetime:
    """In UTC, and a day or more from the ends of the calendar, so that no time zone (this machine's, when a
    message says when the send starts) takes it past them: refused here rather than by an overflow later."""
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not _EARLIEST <= utc <= _LATEST:
        raise PydanticCustomError("datetime_range", "the time is out of range")
    return utc


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul", "an address cannot hold a NUL character")
    return value


def _at_most(limit: int) -> Any:
    """A list bound counted before each address is looked at, so that an oversized list costs nothing, and that
    says what to do instead."""

    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) > limit:
            raise PydanticCustomError(
                "too_many_addresses",
                f"at most {limit:,} addresses a request ({len(value):,} given): import more as a CSV file with"
                " POST /imports",
            )
        return value

    return BeforeValidator(check)


Id = Annotated[int, Field(ge=1, le=MAX_ID)]
# "@" keeps an address from reading as an id (the services take either); the services check the rest.
Email = Annotated[
    str, Field(min_length=3, max_length=limits.EMAIL, json_schema_extra={"format": "email"}), AfterValidator(_has_at)
]
# Addresses of a list are checked one by one by the services, which report an invalid one rather than refuse all.
EmailItem = Annotated[str, Field(max_length=limits.EMAIL)]
# A new campaign's addresses are imported as the rows of a file, where a NUL would make the whole file binary.
ImportedEmail = Annotated[EmailItem, AfterValidator(_no_nul)]
Emails = Annotated[list[ImportedEmail], _at_most(MAX_EMAILS), Field(json_schema_extra={"maxItems": MAX_EMAILS})]
GroupEmails = Annotated[
    list[EmailItem], _at_most(MAX_GROUP_EMAILS), Field(json_schema_extra={"maxItems": MAX_GROUP_EMAILS})
]
Name = Annotated[str, Field(max_length=limits.NAME)]
Phone = Annotated[str, Field(max_length=limits.PHONE)]
GroupName = Annotated[str, Field(min_length=1, max_length=limits.GROUP_NAME)]
Description = Annotated[str, Field(max_length=limits.DESCRIPTION)]
Title = Annotated[str, Field(min_length=1, max_length=limits.TITLE)]
Subject = Annotated[str, Field(min_length=1, max_length=limits.SUBJECT)]
Template = Annotated[str, Field(min_length=1, max_length=BODY)]
Reason = Annotated[str, Field(max_length=limits.REASON)]
Notifier = Annotated[str, Field(min_length=1, max_length=100)]
AttributeKey = Annotated[str, Field(min_length=1, max_length=limits.ATTRIBUTE_KEY)]
AttributeValue = Annotated[str, Field(max_length=limits.ATTRIBUTE_VALUE)]
Attributes = Annotated[dict[AttributeKey, AttributeValue], Field(max_length=MAX_ATTRIBUTES)]
GroupIds = Annotated[list[Id], Field(max_length=MAX_GROUPS)]


class In(BaseModel):
    """A request body: an unknown field is refused (a typo such as `opt_uot` must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------------- errors


class Problem(BaseModel):
    """Every error: `detail` a line a person can act on, `code` the name of cm's exit code for it (`invalid_input`,
    `not_found`, `conflict`, `consent`, `database`, `queue`, `config`) or `unauthorized`."""

    detail: str
    code: str


_MEANINGS = {
    400: "Refused by cm's rules (`invalid_input`): an invalid address, a name that is all digits, a bad CSV file",
    401: "No bearer token, or the wrong one (`unauthorized`)",
    404: "No such recipient, group, campaign or job (`not_found`)",
    409: "Conflict with what is stored (`conflict`), or with a person's consent (`consent`)",
    422: "The request does not match this schema (`invalid_input`)",
    503: "The database or the queue cannot be reached (`database`, `queue`), or a setting is missing (`config`)",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of a route, for its OpenAPI `responses`: those named, and those every route can give."""
    return {s: {"model": Problem, "description": _MEANINGS[s]} for s in sorted({401, 422, 503, *statuses})}


# ---------------------------------------------------------------------------------------------------- recipients


class RecipientIn(In):
    email: Email
    name: Name | None = None
    phone: Phone | None = None
    attributes: Attributes = Field(default_factory=dict)
    group_id: Id | None = Field(default=None, description="A group to add the recipient to (the seed's field)")
    groups: GroupIds = Field(default_factory=list, description="Groups to add the recipient to, by id")


class RecipientPatch(In):
    name: Name | None = Field(default=None, description="The new name; an empty string clears it")
    phone: Phone | None = Field(default=None, description="The new phone number; an empty string clears it")
    attributes: Attributes | None = Field(default=None, description="Attributes to set; an empty value removes one")
    group_id: Id | None = Field(default=None, description="Add to this group (the seed's field; groups are many)")
    add_groups: GroupIds = Field(default_factory=list, description="Add to these groups, by id")
    remove_groups: GroupIds = Field(default_factory=list, description="Take out of these groups, by id")
    opt_out: bool | None = Field(
        default=None,
        description="true opts the recipient out (a consent event); false never opts anyone in: an opted-out"
        " recipient answers 409 `consent` (POST /recipients/opt-in is the way back)",
    )
    reason: Reason | None = Field(default=None, description="With `opt_out: true`: why, for the consent log")


class OptOutIn(In):
    email: Email
    reason: Reason | None = None


class OptInIn(In):
    email: Email
    reason: Reason | None = None


class RecipientOut(BaseModel):
    id: int
    email: str
    name: str | None
    phone: str | None
    status: RecipientStatus
    groups: list[str]
    attributes: dict[str, Any]
    opt_out_reason: str | None
    opted_out_at: datetime | None
    created_at: datetime
    updated_at: datetime


# ---------------------------------------------------------------------------------------------------- groups


class GroupIn(In):
    name: GroupName
    description: Description | None = None


class GroupPatch(In):
    name: GroupName | None = None
    description: Description | None = Field(default=None, description="The new description; an empty one clears it")
    public: bool | None = Field(default=None, description="Offer the group on cm serve's sign-up form, or not")


class GroupRecipientsIn(In):
    recipient_emails: GroupEmails


class GroupOut(BaseModel):
    id: int
    name: str
    description: str | None
    public: bool = Field(description="Offered on cm serve's sign-up form (`cm group update G --public`)")
    members: int
    active_members: int
    created_at: datetime


class MemberResult(BaseModel):
    """What became of one address given to a group (as `cm group add-recipients --json` reports it)."""

    input: str
    email: str | None
    outcome: MemberOutcome
    reason: str | None


# ---------------------------------------------------------------------------------------------------- jobs


class JobOut(BaseModel):
    id: int
    kind: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    worker: str | None
    error: str | None
    counts: dict[str, Any]
    progress: Any = None
    args: dict[str, Any]


class RejectOut(BaseModel):
    """A row an import could not take: its line in the file, why, and the row as it was written."""

    line: int
    reason: str
    row: str


# ---------------------------------------------------------------------------------------------------- campaigns


class CampaignIn(In):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    title: Title
    message: Template = Field(
        description="The plain-text body (a template: `{{ name }}`, `{{ unsubscribe_url }}`, ...)"
    )
    subject: Subject | None = Field(default=None, description="The subject line (a template); default: the title")
    html: Template | None = Field(default=None, description="An HTML body (a template)")
    from_: Email | None = Field(default=None, alias="from", description="The From address; default: send.from")
    group_ids: GroupIds = Field(default_factory=list, description="Groups the campaign goes to")
    recipient_emails: Emails = Field(
        default_factory=list,
        description="Addresses the campaign goes to, imported into its audience by a queued job (new ones are"
        " created; opted-out and forgotten ones are left out)",
    )


class CampaignOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: int
    title: str
    subject: str
    status: CampaignStatus
    from_: str | None = Field(alias="from")
    groups: list[str]
    named_recipients: int
    audience: int = Field(description="Distinct active recipients it would reach now")
    created_at: datetime


class CampaignCreated(CampaignOut):
    job: JobOut | None = Field(description="The job importing `recipient_emails` into its audience (202), if any")


class CampaignDetail(CampaignOut):
    text: str
    html: str | None


class SendIn(In):
    campaign_id: Id
    notifier: Notifier | None = Field(default=None, description="The notifier to send with; default: send.notifier")
    at: Annotated[AwareDatetime, AfterValidator(_utc)] | None = Field(
        default=None, description="Start then (ISO 8601, with its offset)"
    )
    rate: float | None = Field(default=None, gt=0, le=1_000_000, description="At most this many messages a second")
    new: bool = Field(default=False, description="A campaign already sent: also mail who joined its audience since")


class SendOut(BaseModel):
    campaign_id: int
    job: JobOut | None = Field(description="The send job (202); none when there was nothing to send (200)")
    message: str


class TopReason(BaseModel):
    status: DeliveryStatus
    reason: str
    count: int


class StatsOut(BaseModel):
    campaign_id: int
    title: str
    status: CampaignStatus
    reason: str | None
    notifier: str | None
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    total: int
    pending: int
    sent: int
    failed: int
    skipped: int
    attempts: int
    hard_bounces: int
    possible_duplicates: int
    send_rate: float | None
    top_reasons: list[TopReason]


class DeliveryOut(BaseModel):
    delivery_id: int
    recipient_id: int | None = Field(description="None once the person was forgotten")
    email: str | None
    status: DeliveryStatus
    attempts: int
    error: str | None
    sent_at: datetime | None
    provider_id: str | None
    possible_duplicate: bool
