"""The error tree: classification (retryable, exit code) and one-line operator messages."""

from __future__ import annotations

import inspect

import pytest

from edge_agent import errors
from edge_agent.errors import (
    CertificateExpired,
    ConfigError,
    EdgeAgentError,
    GatewayUnreachable,
    IdentityError,
    IdentityRejected,
    InsecureKeyFile,
    LogGap,
    PinMismatch,
    RegistrationRefused,
    ServerError,
    StaleLease,
    StateMissing,
    TokenInvalid,
)


def _all_errors() -> list[type[EdgeAgentError]]:
    return [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, EdgeAgentError)]


def test_every_error_is_exported_and_drawn_in_the_docstring() -> None:
    for cls in _all_errors():
        assert cls.__name__ in errors.__all__
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} missing from the tree in the module docstring"


@pytest.mark.parametrize("cls", _all_errors())
def test_every_error_says_whether_it_is_retryable(cls: type[EdgeAgentError]) -> None:
    assert isinstance(cls.retryable, bool)
    assert cls.exit_code in (1, 2)


def test_retryable_classification() -> None:
    assert GatewayUnreachable("x").retryable
    assert ServerError("x").retryable
    assert LogGap("x", size=3).retryable
    for err in (IdentityRejected("x"), CertificateExpired("2020"), PinMismatch("https://h"),
                RegistrationRefused("x"), StaleLease("x"), ConfigError("x"), TokenInvalid("x")):
        assert not err.retryable, err


def test_usage_and_config_errors_exit_2_others_exit_1() -> None:
    assert StateMissing("/d").exit_code == 2
    assert TokenInvalid("x").exit_code == 2
    assert InsecureKeyFile("/d/agent.key", 0o644).exit_code == 2
    assert IdentityRejected("x").exit_code == 1
    assert GatewayUnreachable("x").exit_code == 1


def test_messages_are_one_line_and_tell_what_to_do() -> None:
    assert str(StateMissing("/var/lib/edge-agent")).startswith(
        "no identity in /var/lib/edge-agent: run 'edge-agent register"
    )
    assert "re-register with a new token" in str(CertificateExpired("2020-01-01"))
    assert "chmod 600" in str(InsecureKeyFile("/d/agent.key", 0o640))
    assert "token was not sent" in str(PinMismatch("https://gw"))
    multi = ServerError("gateway said:\n  Internal\n\terror")
    assert "\n" not in str(multi) and str(multi) == "gateway said: Internal error"


def test_tree_shape() -> None:
    assert issubclass(StateMissing, ConfigError)
    assert issubclass(TokenInvalid, ConfigError)
    for cls in (PinMismatch, RegistrationRefused, IdentityRejected, CertificateExpired):
        assert issubclass(cls, IdentityError)
    assert IdentityRejected("x", revoked=True).revoked
