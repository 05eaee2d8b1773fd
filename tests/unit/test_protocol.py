"""Registration token format and wire-model strictness."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from edge_agent.protocol import LeaseRequest, RegistrationToken, TokenFormatError


def test_token_round_trip_and_redaction():
    token = RegistrationToken.mint(os.urandom(32))
    text = str(token)
    assert text.startswith("eat1_")
    assert RegistrationToken.parse(f"  {text}\n") == token
    assert token.secret not in repr(token) and token.secret not in token.redacted


@pytest.mark.parametrize("cut", [1, 5, 20, 60])
def test_truncated_or_altered_token_is_refused_locally(cut):
    text = str(RegistrationToken.mint(os.urandom(32)))
    with pytest.raises(TokenFormatError, match="truncated|mistyped|malformed|5 parts"):
        RegistrationToken.parse(text[:-cut])
    altered = text[:10] + ("a" if text[10] != "a" else "b") + text[11:]
    with pytest.raises(TokenFormatError):
        RegistrationToken.parse(altered)


def test_other_secrets_are_not_tokens():
    for text in ("", "ghp_abcdef", "eat1_a_b_c", "eat2_a_b_c_d"):
        with pytest.raises(TokenFormatError):
            RegistrationToken.parse(text)


def test_unknown_fields_are_refused():
    # An agent cannot smuggle in fields such as "queues" to widen what it may lease.
    with pytest.raises(ValidationError):
        LeaseRequest.model_validate({"free_slots": 1, "queues": ["eu_pii"]})


def test_protocol_imports_nothing_heavy():
    code = (
        "import sys, edge_agent.protocol as p;"
        "bad=[m for m in ('airflow','sqlalchemy','fastapi','httpx','cryptography') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
