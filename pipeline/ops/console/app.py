"""Operations console: bounces, the review list, resend cases, alerts, and the case actions.

FastAPI with server-rendered Jinja2 pages rather than an Airflow UI plugin: operations staff
are not Airflow users, Airflow is an optional extra, and the console's roles (viewer, operator,
approver) and four-eyes rule are the pipeline's own. (An Airflow 3 plugin can still mount this
app through `fastapi_apps` if a deployment wants one UI.)

Security: Argon2 password hashes, a signed session cookie (HttpOnly, SameSite=strict, Secure
unless `secure_cookies=False` for local HTTP), a per-session CSRF token required on every POST,
role checks on every action, and an audit event for every page view and action. Email
addresses are masked on every page.
"""

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.middleware.sessions import SessionMiddleware

from pipeline.config import Settings
from pipeline.delivery.policy import policy_for
from pipeline.errors import IllegalTransition
from pipeline.ops.console.auth import authenticate, mask_email, may
from pipeline.records.ledger import audit, open_ledger
from pipeline.records.ledger.models import (
    Bounce,
    ConsoleUser,
    DeliverabilityAlert,
    Incident,
    Message,
    ResendCase,
    StateTransition,
)
from pipeline.records.ledger.states import CaseState
from pipeline.returns import cases, reconcile

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
TEMPLATES.env.filters["mask"] = mask_email
SESSION_HOURS = 8


@dataclass(frozen=True)
class User:
    username: str
    role: str


def create_app(
    settings: Settings,
    *,
    secret_key: str,
    secure_cookies: bool = True,
    policy_file: Path | None = None,
) -> FastAPI:
    if len(secret_key) < 32:
        raise ValueError("console secret key: at least 32 characters")
    sessions = open_ledger(settings.ledger_url)
    policy = reconcile.load_policy(policy_file) if policy_file else reconcile.load_policy()
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key,
        session_cookie="eob_console",
        max_age=SESSION_HOURS * 3600,
        same_site="strict",
        https_only=secure_cookies,
    )

    def db() -> Iterator[Session]:
        with sessions.begin() as session:
            yield session

    DB = Annotated[Session, Depends(db)]

    def current_user(request: Request, session: DB) -> User:
        username = request.session.get("user")
        user = session.get(ConsoleUser, username) if username else None
        if user is None:
            # Pages send the browser to the login form; anything else is refused outright.
            if request.method == "GET":
                raise HTTPException(303, headers={"Location": "/login"})
            raise HTTPException(401, "login required")
        return User(user.username, user.role)

    CurrentUser = Annotated[User, Depends(current_user)]

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(32)
        return str(token)

    def check_csrf(request: Request, csrf: str) -> None:
        expected = request.session.get("csrf")
        if not expected or not secrets.compare_digest(str(expected), csrf):
            raise HTTPException(403, "missing or invalid CSRF token")

    def require_role(user: User, action: str, entity_kind: str, entity_id: str) -> None:
        """Refuse (403) an action the user's role may not take; the refusal is audited."""
        if may(user.role, action):
            return
        # Its own transaction: the refusal rolls the request's back.
        with sessions.begin() as separate:
            audit(
                separate,
                "console_refused",
                entity_kind,
                entity_id,
                actor=user.username,
                detail=f"action={action} role={user.role}",
            )
        raise HTTPException(403, f"role {user.role} may not {action}")

    def page(
        request: Request, session: Session, user: User | None, name: str, **context: Any
    ) -> HTMLResponse:
        if user is not None:
            audit(session, "console_view", "page", request.url.path[:64], actor=user.username)
        return TEMPLATES.TemplateResponse(
            request,
            name,
            {"user": user, "csrf": csrf_token(request), "may": may, **context},
        )

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, session: DB) -> HTMLResponse:
        return page(request, session, None, "login.html", error=None)

    @app.post("/login")
    def login(
        request: Request,
        session: DB,
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        check_csrf(request, csrf)
        user = authenticate(session, username, password)
        if user is None:
            audit(session, "console_login_failed", "user", username[:64], actor="anonymous")
            return page(request, session, None, "login.html", error="Wrong user name or password.")
        # A fresh session (and CSRF token) at login: no fixation.
        request.session.clear()
        request.session["user"] = user.username
        audit(session, "console_login", "user", user.username, actor=user.username)
        return RedirectResponse("/cases", status_code=303)

    @app.post("/logout")
    def logout(
        request: Request, session: DB, user: CurrentUser, csrf: Annotated[str, Form()] = ""
    ) -> Response:
        check_csrf(request, csrf)
        audit(session, "console_logout", "user", user.username, actor=user.username)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @app.get("/")
    def home(user: CurrentUser) -> Response:
        return RedirectResponse("/cases", status_code=303)

    @app.get("/cases", response_class=HTMLResponse)
    def case_list(
        request: Request, session: DB, user: CurrentUser, state: str = ""
    ) -> HTMLResponse:
        query = select(ResendCase).order_by(ResendCase.opened_at.desc())
        if state:
            query = query.where(ResendCase.state == state)
        counts = dict(
            session.execute(select(ResendCase.state, func.count()).group_by(ResendCase.state)).all()
        )
        return page(
            request,
            session,
            user,
            "cases.html",
            cases=session.scalars(query).all(),
            counts=counts,
            states=list(CaseState),
            state=state,
        )

    @app.get("/bounces", response_class=HTMLResponse)
    def bounce_list(
        request: Request, session: DB, user: CurrentUser, cls: str = "", review: bool = False
    ) -> HTMLResponse:
        query = select(Bounce).order_by(Bounce.received_at.desc()).limit(500)
        if cls:
            query = query.where(Bounce.bounce_class == cls)
        if review:
            query = query.where(Bounce.message_id.is_(None))
        counts = dict(
            session.execute(
                select(Bounce.bounce_class, func.count()).group_by(Bounce.bounce_class)
            ).all()
        )
        unmatched = session.scalar(
            select(func.count()).select_from(Bounce).where(Bounce.message_id.is_(None))
        )
        return page(
            request,
            session,
            user,
            "bounces.html",
            bounces=session.scalars(query).all(),
            counts=counts,
            unmatched=unmatched,
            cls=cls,
            review=review,
        )

    @app.get("/alerts", response_class=HTMLResponse)
    def alert_list(request: Request, session: DB, user: CurrentUser) -> HTMLResponse:
        alerts = session.scalars(
            select(DeliverabilityAlert).order_by(DeliverabilityAlert.opened_at.desc())
        ).all()
        incidents = session.scalars(select(Incident).order_by(Incident.due_at)).all()
        return page(request, session, user, "alerts.html", alerts=alerts, incidents=incidents)

    @app.get("/cases/{case_id}", response_class=HTMLResponse)
    def case_page(
        request: Request, case_id: str, session: DB, user: CurrentUser, error: str = ""
    ) -> HTMLResponse:
        case = session.get(ResendCase, case_id)
        if case is None:
            raise HTTPException(404, "no such case")
        attempts = session.scalars(
            select(Message)
            .where(Message.statement_id == case.statement_id)
            .order_by(Message.attempt)
        ).all()
        ids = [m.message_id for m in attempts]
        history = session.scalars(
            select(StateTransition)
            .where(StateTransition.entity_id.in_([*ids, case_id]))
            .order_by(StateTransition.at, StateTransition.transition_id)
        ).all()
        bounces = session.scalars(select(Bounce).where(Bounce.message_id.in_(ids))).all()
        return page(
            request,
            session,
            user,
            "case.html",
            case=case,
            attempts=attempts,
            history=history,
            bounces=bounces,
            channels=cases.CHANNELS,
            error=error,
        )

    actions: dict[str, Callable[[Session, str, str, dict[str, str]], object]] = {
        "verify": lambda s, c, who, f: cases.verify(
            s, c, actor=who, channel=f["channel"], evidence=f["evidence"], address=f["address"]
        ),
        "approve": lambda s, c, who, f: cases.approve(s, c, actor=who, policy=policy.cases),
        "unreachable": lambda s, c, who, f: cases.mark_unreachable(
            s, c, actor=who, note=f["note"] or "no answer"
        ),
        "print": lambda s, c, who, f: cases.route_to_print(
            s, c, actor=who, reason=f["reason"] or "operations"
        ),
        "close": lambda s, c, who, f: cases.close(
            s, c, actor=who, reason=f["reason"] or "operations"
        ),
    }

    @app.post("/cases/{case_id}/{action}")
    def case_action(
        request: Request,
        case_id: str,
        action: str,
        session: DB,
        user: CurrentUser,
        csrf: Annotated[str, Form()] = "",
        channel: Annotated[str, Form()] = "",
        evidence: Annotated[str, Form()] = "",
        address: Annotated[str, Form()] = "",
        note: Annotated[str, Form()] = "",
        reason: Annotated[str, Form()] = "",
    ) -> Response:
        check_csrf(request, csrf)
        if action not in actions:
            raise HTTPException(404, "no such action")
        require_role(user, action, "case", case_id)
        audit(session, f"console_{action}", "case", case_id, actor=user.username)
        fields = {
            "channel": channel,
            "evidence": evidence,
            "address": address,
            "note": note,
            "reason": reason,
        }
        target = f"/cases/{case_id}"
        try:
            with session.begin_nested():
                actions[action](session, case_id, user.username, fields)
        except (cases.CaseActionRefused, IllegalTransition) as err:
            # The refusal names the rule, never a value: safe to show.
            return RedirectResponse(f"{target}?{urlencode({'error': str(err)})}", status_code=303)
        return RedirectResponse(target, status_code=303)

    @app.post("/alerts/{alert_id}/ack")
    def ack_alert(
        request: Request,
        alert_id: int,
        session: DB,
        user: CurrentUser,
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        check_csrf(request, csrf)
        require_role(user, "ack", "alert", str(alert_id))
        try:
            reconcile.acknowledge_alert(
                session, alert_id, actor=user.username, policy=policy_for(settings)
            )
        except cases.CaseActionRefused as err:
            raise HTTPException(409, str(err)) from err
        return RedirectResponse("/alerts", status_code=303)

    return app
