"""Ray token auth for the clusters cellfoundry starts (runtime.ensure_cluster_token)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from cellfoundry import runtime


@pytest.fixture
def clean_auth_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in (runtime.AUTH_MODE, runtime.AUTH_TOKEN, runtime.AUTH_TOKEN_PATH):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_token_file_is_private_random_and_never_overwritten(tmp_path: Path) -> None:
    first = runtime.write_token_file(tmp_path / "a")
    second = runtime.write_token_file(tmp_path / "b")
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.parent.stat().st_mode) & 0o077 == 0
    assert len(first.read_text()) == 64 and first.read_text() != second.read_text()
    with pytest.raises(FileExistsError):
        runtime.write_token_file(tmp_path / "a")


def test_a_new_cluster_gets_token_auth_and_a_fresh_token(
    clean_auth_env: pytest.MonkeyPatch,
) -> None:
    path = runtime.ensure_cluster_token()
    assert path is not None and os.environ[runtime.AUTH_MODE] == "token"
    assert os.environ[runtime.AUTH_TOKEN_PATH] == path
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    # A second call in the same process (a later stage) keeps the same token.
    assert runtime.ensure_cluster_token() == path


def test_a_given_token_is_used_as_it_is(clean_auth_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mine = runtime.write_token_file(tmp_path)
    clean_auth_env.setenv(runtime.AUTH_TOKEN_PATH, str(mine))
    assert runtime.ensure_cluster_token() == str(mine)
    clean_auth_env.delenv(runtime.AUTH_TOKEN_PATH)
    clean_auth_env.setenv(runtime.AUTH_TOKEN, "x" * 40)
    assert runtime.ensure_cluster_token() is None
    assert os.environ[runtime.AUTH_MODE] == "token"
    assert runtime.AUTH_TOKEN_PATH not in os.environ


def test_disabling_auth_is_the_users_call_and_is_warned_about(
    clean_auth_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_auth_env.setenv(runtime.AUTH_MODE, "disabled")
    with caplog.at_level(logging.WARNING, logger="cellfoundry.runtime"):
        assert runtime.ensure_cluster_token() is None
    assert os.environ[runtime.AUTH_MODE] == "disabled"
    assert "RAY_AUTH_MODE=disabled" in caplog.text and "run code" in caplog.text


def test_data_context_bars_on_a_terminal_operator_lines_otherwise() -> None:
    """Interactive runs keep Ray Data's progress bars; runs without a terminal (log files,
    CI, job logs) get one line per operator start and finish instead of status dumps."""
    import ray.data

    from cellfoundry import datalog

    ctx = ray.data.DataContext.get_current()
    before = (ctx.enable_progress_bars, list(ctx.custom_execution_callback_classes))
    try:
        runtime.configure_data_context(interactive=False)
        assert not ctx.enable_progress_bars and ctx.execution_options.preserve_order
        runtime.configure_data_context(interactive=False)  # registered once
        assert ctx.custom_execution_callback_classes.count(datalog.OperatorLines) == 1
        assert datalog.OperatorLines in ctx.execution_callback_classes  # what Ray Data builds
        runtime.configure_data_context(interactive=True)
        assert ctx.enable_progress_bars
        assert datalog.OperatorLines not in ctx.custom_execution_callback_classes
    finally:
        ctx.enable_progress_bars = before[0]
        ctx.custom_execution_callback_classes[:] = before[1]


def test_local_clusters_run_without_ray_trains_preemption_watcher() -> None:
    """Its actor takes the workers' handles as arguments, which makes Ray log an ERROR line
    on every training run; a single machine has no spot nodes to watch."""
    from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR as name

    assert runtime.LOCAL_ENV[name] == "0"
