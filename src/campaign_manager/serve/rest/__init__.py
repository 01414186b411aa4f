"""The REST API: the seed system's paths and bodies, and what cm has beyond them (jobs, imports, campaign stats and
deliveries). Every route needs the bearer token (`serve.api_token`); every list is paged by keyset (`paging`);
errors are `{"detail", "code"}` with the status of the CLI's exit code (`serve.errors`).

- `auth`: the token check, and the routers and session every module uses;
- `schemas`: the bodies, bounded by cm's limits, and the errors each route declares;
- `recipients`, `groups`, `campaigns`, `jobs`, `imports`: one module a resource, each calling cm's services.
"""

from __future__ import annotations

from fastapi import APIRouter

from campaign_manager.serve.rest import campaigns, groups, imports, jobs, recipients

ROUTERS = (campaigns.router, groups.router, recipients.router, jobs.router, imports.router)
router = APIRouter()
for _each in ROUTERS:
    router.include_router(_each)
