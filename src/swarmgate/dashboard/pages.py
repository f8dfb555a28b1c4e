"""``/dashboard``: the developer portal, the provider portal and the public network page.

Server-rendered pages over the same service functions the JSON API uses, so a page and
``/v1/…`` can never disagree. Forms post back to the page they came from; a change
answers with a redirect (so a reload does not repeat it), except where something is
shown once (a new key's secret, a new device's token).
"""

from __future__ import annotations

import hashlib
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from swarmgate.accounts import service
from swarmgate.accounts.keys import KeyMode, KeySettings, utcnow
from swarmgate.accounts.signin import Role, sign_in, sign_up
from swarmgate.api.deps import GatewayDep
from swarmgate.billing.earnings import provider_report
from swarmgate.billing.payouts import Payouts
from swarmgate.billing.pricing import MAX_AMOUNT_MICROS
from swarmgate.billing.stripe_payments import StripePayments
from swarmgate.dashboard import charts
from swarmgate.dashboard.reports import USAGE_DAYS, provider_devices, usage_report
from swarmgate.dashboard.web import (
    COOKIE_PATH,
    PRESESSION_COOKIE,
    SESSION_COOKIE,
    CsrfRejected,
    DashboardRoute,
    Form,
    StaticFiles,
    Templates,
    Viewer,
    as_markup,
    check_origin,
    new_presession,
    redirect,
    require_viewer,
    safe_next,
    set_presession_cookie,
    set_session_cookie,
    signed_form,
    signed_in,
    tokens_match,
)
from swarmgate.errors import (
    AuthError,
    Conflict,
    IllegalTransition,
    NotFound,
    RateLimited,
    RequestError,
    SwarmgateError,
)
from swarmgate.gateway import Gateway

router = APIRouter(prefix=COOKIE_PATH, route_class=DashboardRoute, include_in_schema=False)

MICROS_PER_USD = 1_000_000
CONVERSATIONS_PER_PAGE = 25
WORKFLOWS_PER_PAGE = 25
_MAX_NAME = 200
ROLES: tuple[Role, ...] = ("developer", "provider")
SIGN_IN_ATTEMPTS_PER_MINUTE = 10
_SIGN_IN_LIMIT = KeySettings(rpm_limit=SIGN_IN_ATTEMPTS_PER_MINUTE)


def pages(request: Request) -> Templates:
    templates: Templates = request.app.state.dashboard_templates
    return templates


async def signed_post(request: Request, gateway: Gateway) -> tuple[Viewer, Form]:
    """The signed-in viewer and the form it posted, its origin and CSRF token checked."""
    viewer = await require_viewer(request, gateway)
    return viewer, await signed_form(request, viewer)


def page_status(error: SwarmgateError | None, *, created: bool = False) -> int:
    """A page shown after a form: the error's status, 201 when it shows what was made."""
    if error is not None:
        return error.status_code
    return 201 if created else 200


def usd_field(form: Form, name: str, label: str, *, allow_zero: bool = False) -> int | None:
    """A dollar amount typed into a form, as exact micro-dollars (never through a float)."""
    text = form.get(name).strip().lstrip("$").replace(",", "")
    if not text:
        return None
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise RequestError(f"{label} is not an amount of dollars: {text!r}.", param=name) from None
    micros = amount * MICROS_PER_USD
    if not amount.is_finite() or micros != micros.to_integral_value():
        raise RequestError(f"{label} has more than 6 decimal places.", param=name)
    if amount < 0 or (amount == 0 and not allow_zero) or int(micros) > MAX_AMOUNT_MICROS:
        raise RequestError(f"{label} must be a positive amount of dollars.", param=name)
    return int(micros)


def _name(form: Form) -> str:
    name = form.get("name").strip()
    if len(name) > _MAX_NAME:
        raise RequestError(f"A name has at most {_MAX_NAME} characters.", param="name")
    return name


# -- static files and the public network page ---------------------------------------------
@router.get("/static/{name}")
async def static_file(name: str, request: Request) -> Response:
    files: StaticFiles = request.app.state.dashboard_static
    return files.response(name, request.headers.get("if-none-match"))


@router.get("/network")
async def network(request: Request, gateway: GatewayDep) -> Response:
    status = await gateway.network_status.get()
    viewer = await signed_in(request, gateway)
    return pages(request).render(
        "network.html", {"status": status}, viewer=viewer, active="network"
    )


# -- signing up, in and out -----------------------------------------------------------------
@router.get("/signin")
async def signin_page(
    request: Request, gateway: GatewayDep, next: Annotated[str | None, Query()] = None
) -> Response:
    if await signed_in(request, gateway) is not None:
        return redirect(safe_next(next))
    return _auth_form(request, "signin.html", {"next": safe_next(next), "email": ""})


@router.get("/signup")
async def signup_page(request: Request, gateway: GatewayDep) -> Response:
    if await signed_in(request, gateway) is not None:
        return redirect(COOKIE_PATH + "/")
    context = {
        "email": "",
        "name": "",
        "roles": ["developer"],
        "enabled": gateway.settings.signup_enabled,
    }
    return _auth_form(request, "signup.html", context)


def _auth_form(
    request: Request,
    page: str,
    context: dict[str, Any],
    *,
    error: SwarmgateError | None = None,
) -> Response:
    token = new_presession(request)
    response = pages(request).render(
        page,
        {**context, "form_token": token, "error": error},
        viewer=None,
        status_code=page_status(error),
    )
    set_presession_cookie(response, request, token)
    return response


async def _auth_post(request: Request) -> Form:
    check_origin(request)
    form = await Form.read(request)
    if not tokens_match(form.get("csrf"), request.cookies.get(PRESESSION_COOKIE, "")):
        raise CsrfRejected("This form has expired; reload the page and try again.")
    return form


async def throttle_sign_in(gateway: Gateway, email: str) -> None:
    """At most ``SIGN_IN_ATTEMPTS_PER_MINUTE`` tries for an email, checked before the slow
    password hash. Emails share 65,536 buckets, so guessing at random addresses cannot
    grow the limiter without bound; a shared bucket only shares the allowance."""
    bucket = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:4]
    try:
        await gateway.limiter.admit(f"signin:{bucket}", _SIGN_IN_LIMIT, 0)
    except RateLimited as exc:
        raise RateLimited(
            f"Too many sign-in attempts for this email; try again in {exc.retry_after} s.",
            retry_after=exc.retry_after,
        ) from None


@router.post("/signin")
async def signin(request: Request, gateway: GatewayDep) -> Response:
    form = await _auth_post(request)
    target = safe_next(form.get("next"))
    try:
        await throttle_sign_in(gateway, form.get("email"))
        session = await sign_in(
            gateway.engine,
            gateway.sessions.passwords,
            email=form.get("email"),
            password=form.get("password"),
            session_ttl_s=gateway.settings.session_ttl_s,
        )
    except (AuthError, RateLimited) as error:
        context = {"next": target, "email": form.get("email")[:400]}
        return _auth_form(request, "signin.html", context, error=error)
    response = redirect(target)
    set_session_cookie(response, request, session.token, int(gateway.settings.session_ttl_s))
    response.delete_cookie(PRESESSION_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/signup")
async def signup(request: Request, gateway: GatewayDep) -> Response:
    form = await _auth_post(request)
    settings = gateway.settings
    chosen = form.all("roles")
    roles: list[Role] = [r for r in ROLES if r in chosen]
    context = {
        "email": form.get("email")[:400],
        "name": form.get("name")[:_MAX_NAME],
        "roles": roles,
        "enabled": settings.signup_enabled,
    }
    if not settings.signup_enabled:
        error: SwarmgateError = AuthError("Sign-up is turned off on this gateway.")
        return _auth_form(request, "signup.html", context, error=error)
    try:
        created = await sign_up(
            gateway.engine,
            gateway.sessions.passwords,
            email=form.get("email"),
            password=form.get("password"),
            name=_name(form) or None,
            roles=roles,
            welcome_credit_micros=settings.welcome_credit_micros,
            session_ttl_s=settings.session_ttl_s,
        )
    except SwarmgateError as error:
        return _auth_form(request, "signup.html", context, error=error)
    viewer = Viewer(
        await gateway.sessions.verify(created.session.token),
        created.session.token,
        created.account,
    )
    # The first key's secret is shown on this one page and never again.
    response = await _keys_page(
        request, gateway, viewer, new_secret=created.key.secret, welcome=True
    )
    set_session_cookie(response, request, created.session.token, int(settings.session_ttl_s))
    response.delete_cookie(PRESESSION_COOKIE, path=COOKIE_PATH)
    return response


@router.post("/signout")
async def signout(request: Request, gateway: GatewayDep) -> Response:
    viewer, _form = await signed_post(request, gateway)
    await gateway.sessions.revoke(viewer.session_token)
    response = redirect(COOKIE_PATH + "/signin")
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


# -- developers: overview and credit ----------------------------------------------------------
@router.get("/")
async def overview(
    request: Request,
    gateway: GatewayDep,
    checkout: Annotated[str | None, Query(max_length=20)] = None,
) -> Response:
    viewer = await require_viewer(request, gateway)
    return await _overview(request, gateway, viewer, checkout=checkout)


async def _overview(
    request: Request,
    gateway: Gateway,
    viewer: Viewer,
    *,
    checkout: str | None = None,
    error: SwarmgateError | None = None,
) -> Response:
    live = await gateway.billing.balance(viewer.account_id, sandbox=False)
    sandbox = await gateway.billing.balance(viewer.account_id, sandbox=True)
    await gateway.billing.writer.posted()
    month = await usage_report(gateway.engine, viewer.account_id, days=30, sandbox=False)
    context = {
        "live": live,
        "sandbox": sandbox,
        "month": month,
        "payments": bool(gateway.settings.stripe_secret_key),
        "checkout": checkout if checkout in ("success", "cancel") else None,
        "base_url": str(request.base_url).rstrip("/") + "/v1",
        "error": error,
    }
    status = page_status(error)
    return pages(request).render(
        "overview.html", context, viewer=viewer, status_code=status, active="overview"
    )


@router.post("/credits")
async def buy_credits(request: Request, gateway: GatewayDep) -> Response:
    viewer, form = await signed_post(request, gateway)
    try:
        amount = usd_field(form, "amount_usd", "The amount")
        if amount is None:
            raise RequestError("Enter an amount of dollars.", param="amount_usd")
        session = await StripePayments(gateway.settings).create_checkout(viewer.account_id, amount)
    except SwarmgateError as error:
        return await _overview(request, gateway, viewer, error=error)
    # Stripe's own page takes the card; its webhook credits the account.
    return redirect(session.url)


# -- developers: API keys -------------------------------------------------------------------
@router.get("/keys")
async def keys_page(request: Request, gateway: GatewayDep) -> Response:
    viewer = await require_viewer(request, gateway)
    return await _keys_page(request, gateway, viewer)


async def _keys_page(
    request: Request,
    gateway: Gateway,
    viewer: Viewer,
    *,
    new_secret: str | None = None,
    welcome: bool = False,
    error: SwarmgateError | None = None,
) -> Response:
    keys = await service.list_api_keys(gateway.engine, viewer.account_id)
    context = {
        "keys": keys,
        "new_secret": new_secret,
        "welcome": welcome,
        "error": error,
        "base_url": str(request.base_url).rstrip("/") + "/v1",
    }
    status = page_status(error, created=new_secret is not None)
    return pages(request).render(
        "keys.html", context, viewer=viewer, status_code=status, active="keys"
    )


@router.post("/keys")
async def create_key(request: Request, gateway: GatewayDep) -> Response:
    viewer, form = await signed_post(request, gateway)
    try:
        chosen = form.get("mode", "live")
        if chosen not in ("live", "test"):
            raise RequestError("A key is 'live' or 'test'.", param="mode")
        mode: KeyMode = "test" if chosen == "test" else "live"
        created = await service.create_api_key(
            gateway.engine, account_id=viewer.account_id, name=_name(form), mode=mode
        )
    except SwarmgateError as error:
        return await _keys_page(request, gateway, viewer, error=error)
    return await _keys_page(request, gateway, viewer, new_secret=created.secret)


@router.get("/keys/{key_id}")
async def key_page(
    key_id: str,
    request: Request,
    gateway: GatewayDep,
    saved: Annotated[str | None, Query(max_length=4)] = None,
) -> Response:
    viewer = await require_viewer(request, gateway)
    key = await service.get_api_key(gateway.engine, viewer.account_id, key_id)
    return _key_page(request, gateway, viewer, key, saved=bool(saved))


def _key_page(
    request: Request,
    gateway: Gateway,
    viewer: Viewer,
    key: dict[str, Any],
    *,
    saved: bool = False,
    error: SwarmgateError | None = None,
) -> Response:
    context = {
        "key": key,
        "models": [m.id for m in gateway.catalog],
        "saved": saved,
        "error": error,
    }
    return pages(request).render(
        "key.html",
        context,
        viewer=viewer,
        status_code=page_status(error),
        active="keys",
    )


def key_changes(form: Form, catalog_ids: list[str]) -> dict[str, Any]:
    """The Configure form as the changes ``update_api_key`` takes: every setting is sent,
    so an emptied field clears its limit."""
    settings = KeySettings(
        rpm_limit=form.optional_int(
            "rpm_limit", low=1, high=10_000_000, label="Requests per minute"
        ),
        tpm_limit=form.optional_int(
            "tpm_limit", low=1, high=10_000_000_000, label="Tokens per minute"
        ),
        daily_spend_cap_micros=usd_field(
            form, "daily_spend_cap_usd", "The daily spend cap", allow_zero=True
        ),
        allowed_models=None,
        auto_memory=form.checked("auto_memory"),
        auto_orchestration=form.checked("auto_orchestration"),
    )
    models: list[str] | None = None
    if form.get("restrict_models") == "on":
        models = form.all("allowed_models")
        unknown = [m for m in models if m not in catalog_ids]
        if unknown:
            raise RequestError(f"No such model: {unknown[0]!r}.", param="allowed_models")
        if not models:
            raise RequestError(
                "Pick at least one model, or allow every model.", param="allowed_models"
            )
    return {
        "name": _name(form),
        "rpm_limit": settings.rpm_limit,
        "tpm_limit": settings.tpm_limit,
        "daily_spend_cap_micros": settings.daily_spend_cap_micros,
        "allowed_models": models,
        "auto_memory": settings.auto_memory,
        "auto_orchestration": settings.auto_orchestration,
    }


@router.post("/keys/{key_id}")
async def configure_key(key_id: str, request: Request, gateway: GatewayDep) -> Response:
    viewer, form = await signed_post(request, gateway)
    key = await service.get_api_key(gateway.engine, viewer.account_id, key_id)
    try:
        changes = key_changes(form, [m.id for m in gateway.catalog])
        await service.update_api_key(gateway.engine, viewer.account_id, key_id, changes)
    except SwarmgateError as error:
        return _key_page(request, gateway, viewer, key, error=error)
    # Keys are cached for a few seconds: drop this one so the next request sees the change.
    gateway.verifier.forget_key(key_id)
    return redirect(f"{COOKIE_PATH}/keys/{key_id}?saved=1")


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request, gateway: GatewayDep) -> Response:
    viewer, _form = await signed_post(request, gateway)
    await service.revoke_api_key(gateway.engine, viewer.account_id, key_id)
    gateway.verifier.forget_key(key_id)
    return redirect(COOKIE_PATH + "/keys")


# -- developers: usage ----------------------------------------------------------------------
@router.get("/usage")
async def usage_page(
    request: Request,
    gateway: GatewayDep,
    days: Annotated[int, Query()] = 30,
    mode: Annotated[str, Query(pattern="^(live|test)$")] = "live",
) -> Response:
    viewer = await require_viewer(request, gateway)
    if days not in USAGE_DAYS:
        days = 30
    await gateway.billing.writer.posted()  # include the answers of the last few ms
    report = await usage_report(
        gateway.engine, viewer.account_id, days=days, sandbox=mode == "test"
    )
    series = charts.series_for([m.model for m in report.models])
    columns = [d.isoformat() for d in report.days]
    context = {
        "report": report,
        "days": days,
        "mode": mode,
        "choices": USAGE_DAYS,
        "legend": as_markup(charts.legend(series)),
        "cost_chart": as_markup(
            charts.stacked_bars(
                columns, series, report.cost, label=_usd_label, title="Spend by day and model"
            )
        ),
        "requests_chart": as_markup(
            charts.stacked_bars(
                columns,
                series,
                report.requests,
                label=lambda n: f"{n:,} requests",
                title="Requests by day and model",
            )
        ),
    }
    return pages(request).render("usage.html", context, viewer=viewer, active="usage")


def _usd_label(micros: int) -> str:
    return "$" + service.usd_text(micros).rstrip("0").rstrip(".")


# -- developers: conversations and workflows ----------------------------------------------
@router.get("/conversations")
async def conversations_page(
    request: Request,
    gateway: GatewayDep,
    after: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
) -> Response:
    viewer = await require_viewer(request, gateway)
    try:
        found, more = await gateway.memory.store.page(
            viewer.account_id, limit=CONVERSATIONS_PER_PAGE, after=after
        )
    except LookupError:
        raise NotFound("That page of conversations is gone; start from the first.") from None
    context = {"conversations": found, "more": more, "after": after}
    return pages(request).render(
        "conversations.html", context, viewer=viewer, active="conversations"
    )


@router.get("/conversations/{conversation_id}")
async def conversation_page(
    conversation_id: str, request: Request, gateway: GatewayDep
) -> Response:
    viewer = await require_viewer(request, gateway)
    store = gateway.memory.store
    conversation = await store.get(viewer.account_id, conversation_id)
    if conversation is None:
        raise NotFound(f"No conversation {conversation_id!r} on this account.")
    context = {
        "conversation": conversation,
        "messages": await store.messages(conversation.id),
        "summary": await store.summary(conversation),
    }
    return pages(request).render(
        "conversation.html", context, viewer=viewer, active="conversations"
    )


@router.post("/conversations/{conversation_id}/delete")
async def delete_conversation(
    conversation_id: str, request: Request, gateway: GatewayDep
) -> Response:
    viewer, _form = await signed_post(request, gateway)
    if not await gateway.memory.store.delete(viewer.account_id, conversation_id):
        raise NotFound(f"No conversation {conversation_id!r} on this account.")
    return redirect(COOKIE_PATH + "/conversations")


@router.get("/workflows")
async def workflows_page(
    request: Request,
    gateway: GatewayDep,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    viewer = await require_viewer(request, gateway)
    runs, total = await gateway.workflows.page(
        viewer.account_id, limit=WORKFLOWS_PER_PAGE, offset=(page - 1) * WORKFLOWS_PER_PAGE
    )
    context = {
        "runs": runs,
        "page": page,
        "more": page * WORKFLOWS_PER_PAGE < total,
        "total": total,
    }
    return pages(request).render("workflows.html", context, viewer=viewer, active="workflows")


@router.get("/workflows/{workflow_id}")
async def workflow_page(workflow_id: str, request: Request, gateway: GatewayDep) -> Response:
    viewer = await require_viewer(request, gateway)
    run = await gateway.workflows.get(viewer.account_id, workflow_id)
    if run is None:
        raise NotFound(f"No workflow run {workflow_id!r} on this account.")
    return pages(request).render("workflow.html", {"run": run}, viewer=viewer, active="workflows")


# -- providers --------------------------------------------------------------------------------
@router.get("/provider")
async def provider_page(request: Request, gateway: GatewayDep) -> Response:
    viewer = await require_viewer(request, gateway)
    return await _provider_page(request, gateway, viewer)


async def _provider_page(
    request: Request,
    gateway: Gateway,
    viewer: Viewer,
    *,
    new_device: service.CreatedSecret | None = None,
    error: SwarmgateError | None = None,
) -> Response:
    settings = gateway.settings
    await gateway.billing.writer.posted()  # the jobs of the last few ms have earned
    report = await provider_report(
        gateway.engine,
        viewer.account_id,
        days=30,
        now=utcnow(),
        lock_days=settings.welcome_bonus_lock_days,
    )
    payouts = await Payouts.from_settings(gateway.engine, settings).list_payouts(
        account_id=viewer.account_id
    )
    devices = await provider_devices(gateway.engine, gateway.registry, viewer.account_id)
    earned = {d.device_id: d.totals for d in report.by_device}
    series = charts.series_for(["earned"])
    days = [d.isoformat() for d, _ in report.by_day]
    chart = charts.stacked_bars(
        days,
        series,
        {(d.isoformat(), "earned"): t.earned_micros for d, t in report.by_day},
        label=_usd_label,
        title="Earnings by day",
    )
    ws_scheme = "wss" if request.url.scheme == "https" else "ws"
    context = {
        "report": report,
        "funds": report.funds,
        "devices": devices,
        "earned": earned,
        "payouts": payouts,
        "chart": as_markup(chart),
        "threshold_micros": settings.payout_threshold_micros,
        "new_device": new_device,
        "connect_url": f"{ws_scheme}://{request.url.netloc}/v1/nodes/connect",
        "error": error,
    }
    status = page_status(error, created=new_device is not None)
    return pages(request).render(
        "provider.html", context, viewer=viewer, status_code=status, active="provider"
    )


@router.post("/provider/devices")
async def register_device(request: Request, gateway: GatewayDep) -> Response:
    viewer, form = await signed_post(request, gateway)
    try:
        created = await service.create_device(
            gateway.engine,
            account_id=viewer.account_id,
            name=_name(form),
            welcome_bonus_micros=gateway.settings.provider_welcome_bonus_micros,
        )
    except SwarmgateError as error:
        return await _provider_page(request, gateway, viewer, error=error)
    return await _provider_page(request, gateway, viewer, new_device=created)


@router.post("/provider/payouts")
async def request_payout(request: Request, gateway: GatewayDep) -> Response:
    viewer, form = await signed_post(request, gateway)
    try:
        amount = usd_field(form, "amount_usd", "The amount")
        if amount is None:
            raise RequestError("Enter an amount of dollars.", param="amount_usd")
        destination = form.get("destination").strip()[:200] or None
        await gateway.billing.writer.posted()
        await Payouts.from_settings(gateway.engine, gateway.settings).request(
            viewer.account_id, amount, destination=destination
        )
    except SwarmgateError as error:
        return await _provider_page(request, gateway, viewer, error=error)
    return redirect(COOKIE_PATH + "/provider")


@router.post("/provider/payouts/{payout_id}/cancel")
async def cancel_payout(payout_id: str, request: Request, gateway: GatewayDep) -> Response:
    viewer, _form = await signed_post(request, gateway)
    try:
        try:
            await Payouts.from_settings(gateway.engine, gateway.settings).cancel(
                viewer.account_id, payout_id
            )
        except IllegalTransition as exc:
            raise Conflict(f"This payout can no longer be cancelled: {exc}") from exc
    except SwarmgateError as error:
        return await _provider_page(request, gateway, viewer, error=error)
    return redirect(COOKIE_PATH + "/provider")
