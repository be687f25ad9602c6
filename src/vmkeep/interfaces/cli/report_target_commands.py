"""`vmkeep report-target add|list|remove|test`: the named report targets jobs send their
run reports to (kept encrypted in the secret store; docs/RUNS.md §7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vmkeep.errors import UsageError

from .engine_context import engine
from .output import console, print_json, stdout, table
from .repo_commands import JsonOpt

report_target_app = typer.Typer(
    help="Where run reports go: SMTP email and signed webhook targets.", no_args_is_help=True
)


def read_secret_file(path: Path, what: str) -> str:
    """A secret from a file (never from the command line: it would show in `ps`)."""
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read it: {exc.strerror}") from None
    if not value:
        raise UsageError(f"{what} {path}: empty")
    return value


def email_target(
    name: str,
    to: list[str],
    host: str | None,
    port: int | None,
    sender: str | None,
    user: str | None,
    password_file: Path | None,
    tls: bool,
    starttls: str,
) -> dict[str, Any]:
    if host is None or sender is None:
        raise UsageError("--email needs --smtp-host and --from")
    target: dict[str, Any] = {"kind": "email", "name": name, "host": host, "from": sender}
    target.update(to=to, tls=tls, starttls=starttls)
    if port is not None:
        target["port"] = port
    if user is not None:
        target["user"] = user
    if password_file is not None:
        target["password"] = read_secret_file(password_file, "--smtp-password-file")
    return target


@report_target_app.command("add")
def add(
    name: str = typer.Argument(..., help="The name jobs use in report.email / report.webhook."),
    email: list[str] = typer.Option([], "--email", help="Recipient (repeatable): an email target."),
    smtp_host: str | None = typer.Option(None, "--smtp-host", help="Email: the SMTP server."),
    smtp_port: int | None = typer.Option(None, "--smtp-port", help="Email: its port."),
    sender: str | None = typer.Option(None, "--from", help="Email: the sender address."),
    smtp_user: str | None = typer.Option(None, "--smtp-user", help="Email: SMTP login."),
    smtp_password_file: Path | None = typer.Option(
        None, "--smtp-password-file", help="Email: file holding the SMTP password."
    ),
    tls: bool = typer.Option(False, "--tls", help="Email: implicit TLS (SMTPS, port 465)."),
    starttls: str = typer.Option(
        "required", "--starttls", help="Email: required, optional or off."
    ),
    webhook: str | None = typer.Option(None, "--webhook", help="A webhook target: its URL."),
    secret_file: Path | None = typer.Option(
        None, "--secret-file", help="Webhook: file holding the HMAC-SHA256 signing secret."
    ),
    replace: bool = typer.Option(False, "--replace", help="Replace a target of that name."),
) -> None:
    """Add a report target: --email ADDR ... (SMTP) or --webhook URL --secret-file F."""
    from vmkeep.engine.runs.report_targets import add_target

    if bool(email) == (webhook is not None):
        raise UsageError("give either --email ADDRESS (an email target) or --webhook URL")
    if webhook is not None:
        if secret_file is None:
            raise UsageError("--webhook needs --secret-file (the HMAC signing secret)")
        secret = read_secret_file(secret_file, "--secret-file")
        target = {"kind": "webhook", "name": name, "url": webhook, "secret": secret}
    else:
        target = email_target(
            name, email, smtp_host, smtp_port, sender, smtp_user, smtp_password_file, tls, starttls
        )
    with engine() as ctx:
        add_target(ctx, target, replace=replace)
    console.print(f"report target [bold]{name}[/] stored ({target['kind']})")


@report_target_app.command("list")
def list_command(json_out: bool = JsonOpt) -> None:
    """The report targets (secrets shown as `set`, never their value)."""
    from vmkeep.engine.runs.report_targets import list_targets

    with engine() as ctx:
        targets = list_targets(ctx)
    if json_out:
        print_json(targets)
        return
    listing = table("name", "kind", "where")
    for t in targets:
        where = t.get("url") or f"{', '.join(t.get('to', []))} via {t.get('host')}"
        listing.add_row(str(t.get("name")), str(t.get("kind")), str(where))
    stdout.print(listing)


@report_target_app.command("remove")
def remove(name: str = typer.Argument(..., help="The target's name.")) -> None:
    """Remove a report target (jobs naming it must be changed first to be applied again)."""
    from vmkeep.engine.runs.report_targets import remove_target

    with engine() as ctx:
        remove_target(ctx, name)
    console.print(f"report target [bold]{name}[/] removed")


@report_target_app.command("test")
def test(
    name: str = typer.Argument(..., help="The target's name."), json_out: bool = JsonOpt
) -> None:
    """Send a test report to the target now; exit 1 when it was not delivered."""
    from vmkeep.engine.runs.report_targets import send_test

    with engine() as ctx:
        result = send_test(ctx, name)
    if json_out:
        print_json({"target": result.target, "ok": result.ok, "error": result.error})
    elif result.ok:
        console.print(f"test report delivered to [bold]{name}[/]")
    else:
        console.print(f"test report to {name} not delivered: {result.error}", highlight=False)
    if not result.ok:
        raise typer.Exit(1)
