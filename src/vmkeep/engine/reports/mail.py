"""Report by email: a multipart text + HTML message over SMTP (smtplib), with implicit TLS or
STARTTLS, optional authentication, timeouts. A password is never sent over a connection that
is not encrypted unless the target explicitly allows it."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from vmkeep.engine.reports.model import Run
from vmkeep.engine.reports.summary import redacted_run, subject, summary_html, summary_text
from vmkeep.engine.reports.targets import EmailTarget
from vmkeep.errors import DeliveryError


def build_message(run: Run, target: EmailTarget) -> EmailMessage:
    """The report as an email: text/plain first, text/html as the alternative."""
    r = redacted_run(run)
    msg = EmailMessage()
    msg["Subject"] = " ".join(subject(r).split())  # no CR/LF from a job name into a header
    msg["From"] = target.sender
    msg["To"] = ", ".join(target.to)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain="vmkeep.invalid")
    msg["X-Vmkeep-Run"] = " ".join(r.id.split())
    msg.set_content(summary_text(r))
    msg.add_alternative(summary_html(r), subtype="html")
    return msg


def send_email(run: Run, target: EmailTarget) -> None:
    """Send the report; DeliveryError with a one-line reason if it was not accepted."""
    msg = build_message(run, target)
    try:
        _send(msg, target)
    except DeliveryError:
        raise
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else ""
        raise DeliveryError(
            f"email {target.name}: server said {exc.smtp_code} {text}".strip()
        ) from None
    except (smtplib.SMTPException, OSError) as exc:
        where = f"{target.host}:{target.effective_port()}"
        raise DeliveryError(f"email {target.name}: {where}: {exc or type(exc).__name__}") from None


def _context(target: EmailTarget) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=target.ca_file)


def _send(msg: EmailMessage, target: EmailTarget) -> None:
    port = target.effective_port()
    smtp: smtplib.SMTP
    if target.tls:
        smtp = smtplib.SMTP_SSL(target.host, port, timeout=target.timeout, context=_context(target))
    else:
        smtp = smtplib.SMTP(target.host, port, timeout=target.timeout)
    with smtp:
        smtp.ehlo()
        secure = target.tls
        if not target.tls and target.starttls != "off":
            if smtp.has_extn("starttls"):
                smtp.starttls(context=_context(target))
                smtp.ehlo()
                secure = True
            elif target.starttls == "required":
                raise DeliveryError(f"email {target.name}: server does not offer STARTTLS")
        if target.user is not None and target.password is not None:
            if not secure and not target.allow_plain_auth:
                raise DeliveryError(
                    f"email {target.name}: refusing to send the password unencrypted "
                    "(use tls or starttls, or set allow_plain_auth)"
                )
            smtp.login(target.user, target.password.get_secret_value())
        refused = smtp.send_message(msg)
        if refused:
            raise DeliveryError(f"email {target.name}: recipients refused: {sorted(refused)}")
