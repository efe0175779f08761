"""The shared HTTP pieces: the token's sources and checks, and the one error mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from collage_inference.errors import ConfigError, DataError, OverloadedError, UnauthorizedError
from collage_inference.serving.http import TOKEN_ENV, check_token, error_answer, load_token


def test_the_token_comes_from_the_file_else_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_token() is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert load_token() == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert load_token(token_file) == "from-file"


@pytest.mark.parametrize("content", ["", "two words", "a\r\nInjected: header"])
def test_bad_tokens_are_refused_with_the_fix(tmp_path: Path, content: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(content)
    with pytest.raises(ConfigError, match="token"):
        load_token(token_file)
    with pytest.raises(ConfigError, match="cannot read"):
        load_token(tmp_path / "missing")


def test_check_token_guards_all_but_health_checks() -> None:
    check_token("/v2/models/m/infer", None, None)  # no token configured: open
    check_token("/v2/health/ready", None, "t")
    check_token("/metrics", "Bearer t", "t")
    for sent in (None, "", "Bearer x", "t", "bearer t"):
        with pytest.raises(UnauthorizedError):
            check_token("/metrics", sent, "t")


def test_error_answer_maps_every_failure_once() -> None:
    assert error_answer(OverloadedError("full")) == (429, {"error": "full"}, {"Retry-After": "1"})
    status, _, headers = error_answer(UnauthorizedError("no"))
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert error_answer(DataError("broken"))[:2] == (500, {"error": "broken"})
    status, body, _ = error_answer(RuntimeError("secret detail"))
    assert status == 500 and "secret" not in body["error"]
