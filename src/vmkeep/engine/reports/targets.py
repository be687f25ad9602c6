"""Where reports go: SMTP email and signed webhook settings, validated with the field named.
Secrets (SMTP password, webhook secret) are `SecretStr`: never in a repr, a log or the outbox."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from vmkeep.errors import ReportError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EmailTarget(_Settings):
    """SMTP delivery. `tls` is implicit TLS (SMTPS, port 465); otherwise `starttls` says
    whether the plain connection must (required), may (optional) or must not (off) upgrade."""

    kind: Literal["email"] = "email"
    name: str = Field(pattern=_NAME)
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: bool = False
    starttls: Literal["required", "optional", "off"] = "required"
    user: str | None = None
    password: SecretStr | None = None
    allow_plain_auth: bool = False  # send a password over an unencrypted connection
    sender: str = Field(alias="from", min_length=3)
    to: list[str] = Field(min_length=1)
    timeout: float = Field(default=30.0, gt=0, le=600)
    ca_file: str | None = None  # extra CA bundle (a private CA); system CAs otherwise

    @field_validator("sender", "to")
    @classmethod
    def _one_line_addresses(cls, v: str | list[str]) -> str | list[str]:
        for addr in [v] if isinstance(v, str) else v:
            if "\r" in addr or "\n" in addr or "@" not in addr:
                raise ValueError(f"not an email address: {addr!r}")
        return v

    @model_validator(mode="after")
    def _auth_pair(self) -> EmailTarget:
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together")
        return self

    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.tls:
            return 465
        return 25 if self.starttls == "off" else 587


class WebhookTarget(_Settings):
    """An HTTP(S) POST of the run JSON, signed with HMAC-SHA256 under `secret`."""

    kind: Literal["webhook"] = "webhook"
    name: str = Field(pattern=_NAME)
    url: str
    secret: SecretStr
    timeout: float = Field(default=30.0, gt=0, le=600)
    ca_file: str | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry user:password@ (the HMAC secret authenticates)")
        return v

    @field_validator("secret")
    @classmethod
    def _long_secret(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return v


Target = Annotated[EmailTarget | WebhookTarget, Field(discriminator="kind")]
_TARGET: TypeAdapter[Target] = TypeAdapter(Target)


def load_targets(data: Iterable[Mapping[str, Any] | EmailTarget | WebhookTarget]) -> list[Target]:
    """Validated targets from plain dicts (a job's `report.targets`), names unique;
    ReportError naming the bad target and field otherwise."""
    targets: list[Target] = []
    for i, item in enumerate(data):
        if isinstance(item, EmailTarget | WebhookTarget):
            targets.append(item)
            continue
        try:
            targets.append(_TARGET.validate_python(item))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"][1:])
            raise ReportError(f"report target [{i}]{loc}: {err['msg']}") from None
    names = [t.name for t in targets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ReportError(f"report target name {dup!r} is used twice")
    return targets
