"""Settings.from_env: defaults, and every unusable value refused with the variable's name."""
from __future__ import annotations

import dataclasses
import os

import pytest

from argus.config import ConfigError, Settings, check_sampling
from worker.engine import SamplingParams


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("ARGUS_") or key == "JWT_SECRET_KEY":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # ./data resolves here


def test_defaults(tmp_path):
    s = Settings.from_env(dotenv=False)
    assert s.data_dir == tmp_path / "data"
    assert (s.model_path, s.jwt_secret, s.blocks_per_stage) == (None, None, None)
    assert (s.messages_per_minute, s.login_attempts, s.login_window_s) == (20, 7, 300.0)
    assert s.max_upload_bytes == 10 * 1024 * 1024
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (512, 0.0, 40, 0.9, 1.1)
    assert s.log_level == "INFO"


def test_edge_values_that_work_are_accepted(monkeypatch):
    for key, value in {
        "ARGUS_TEMPERATURE": "0", "ARGUS_TOP_P": "1", "ARGUS_TOP_K": "0", "ARGUS_REPETITION_PENALTY": "0.5",
        "ARGUS_MAX_NEW_TOKENS": "1", "ARGUS_LOG_LEVEL": "debug", "ARGUS_MAX_UPLOAD_MB": "3",
    }.items():
        monkeypatch.setenv(key, value)
    s = Settings.from_env(dotenv=False)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.0, 1.0, 0, 0.5)
    assert (s.log_level, s.max_upload_bytes) == ("DEBUG", 3 * 1024 * 1024)
    SamplingParams(s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.max_new_tokens)


@pytest.mark.parametrize(
    "name, value",
    [
        ("ARGUS_TOP_P", "0"),
        ("ARGUS_TOP_P", "1.5"),
        ("ARGUS_TOP_P", "-0.1"),
        ("ARGUS_TOP_P", "nan"),
        ("ARGUS_TOP_P", "inf"),
        ("ARGUS_REPETITION_PENALTY", "0"),
        ("ARGUS_REPETITION_PENALTY", "-1"),
        ("ARGUS_REPETITION_PENALTY", "nan"),
        ("ARGUS_REPETITION_PENALTY", "inf"),
        ("ARGUS_TEMPERATURE", "nan"),
        ("ARGUS_TEMPERATURE", "NaN"),
        ("ARGUS_TEMPERATURE", "inf"),
        ("ARGUS_TEMPERATURE", "-inf"),
        ("ARGUS_TEMPERATURE", "-0.5"),
        ("ARGUS_TEMPERATURE", "1e6"),
        ("ARGUS_TEMPERATURE", "warm"),
        ("ARGUS_TOP_K", "-1"),
        ("ARGUS_TOP_K", "4.5"),
        ("ARGUS_MAX_NEW_TOKENS", "0"),
        ("ARGUS_LOGIN_WINDOW_S", "inf"),
        ("ARGUS_LOGIN_WINDOW_S", "nan"),
        ("ARGUS_LOGIN_WINDOW_S", "0.5"),
        ("ARGUS_LOGIN_ATTEMPTS", "0"),
        ("ARGUS_MESSAGES_PER_MINUTE", "many"),
        ("ARGUS_MAX_UPLOAD_MB", "0"),
        ("ARGUS_BLOCKS_PER_STAGE", "-2"),
        ("ARGUS_LOG_LEVEL", "VERBOSE"),
    ],
)
def test_unusable_values_are_refused_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env(dotenv=False)
    assert str(info.value).startswith(name + " ")


def test_non_finite_message_is_clear(monkeypatch):
    monkeypatch.setenv("ARGUS_TEMPERATURE", "nan")
    with pytest.raises(ConfigError, match=r"^ARGUS_TEMPERATURE must be a finite number, got 'nan'$"):
        Settings.from_env(dotenv=False)
    monkeypatch.setenv("ARGUS_TEMPERATURE", "0.7")
    monkeypatch.setenv("ARGUS_TOP_P", "0")
    with pytest.raises(ConfigError, match=r"^ARGUS_TOP_P must be greater than 0, got 0$"):
        Settings.from_env(dotenv=False)


@pytest.mark.parametrize(
    "field, value, name",
    [
        ("top_p", 0.0, "ARGUS_TOP_P"),
        ("repetition_penalty", 0.0, "ARGUS_REPETITION_PENALTY"),
        ("temperature", -1.0, "ARGUS_TEMPERATURE"),
        ("top_k", -1, "ARGUS_TOP_K"),
        ("max_new_tokens", 0, "ARGUS_MAX_NEW_TOKENS"),
    ],
)
def test_the_engines_own_check_is_reported_with_the_variable(field, value, name):
    settings = dataclasses.replace(Settings.from_env(dotenv=False), **{field: value})
    with pytest.raises(ConfigError) as info:
        check_sampling(settings)
    assert str(info.value).startswith(f"{name} is not usable: ")


def test_the_secret_never_appears_in_repr(monkeypatch):
    monkeypatch.setenv("JWT_SECRET_KEY", "s3cret-value-that-must-not-leak-0123456789")
    s = Settings.from_env(dotenv=False)
    assert s.jwt_secret == "s3cret-value-that-must-not-leak-0123456789"
    assert "s3cret" not in repr(s) and "jwt_secret='<set>'" in repr(s)


# ---- remote providers and the API-key pool ----------------------------------------------
PROVIDER_VARS = (
    "GEMINI_API_KEYS", "GEMINI_API_KEY", "OPENAI_API_KEYS", "OPENAI_API_KEY", "ANTHROPIC_API_KEYS",
    "ANTHROPIC_API_KEY", "GEMINI_BASE_URL", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL",
)


@pytest.fixture
def no_provider_env(monkeypatch):
    for name in PROVIDER_VARS:
        monkeypatch.delenv(name, raising=False)


def test_provider_keys_come_from_both_variables_without_repeats_or_placeholders(monkeypatch, no_provider_env):
    monkeypatch.setenv("GEMINI_API_KEYS", " AIzaOne , AIzaTwo,,AIzaOne ")
    monkeypatch.setenv("GEMINI_API_KEY", "AIzaThree")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-FAKE-OPENAI-API-KEY")  # what Chainlit's CLI sets when CI=true
    monkeypatch.setenv("ANTHROPIC_API_KEYS", "sk-ant-a")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1/")
    s = Settings.from_env(dotenv=False)
    assert s.api_keys == {"gemini": ("AIzaOne", "AIzaTwo", "AIzaThree"), "anthropic": ("sk-ant-a",)}
    assert s.base_urls == {"openai": "http://127.0.0.1:11434/v1"}
    assert (s.api_tier, s.secret_key, s.default_model, s.catalogue_path) == ("free", None, None, None)
    assert "AIzaOne" not in repr(s) and "sk-ant-a" not in repr(s)


@pytest.mark.parametrize(
    "name, value",
    [
        ("GEMINI_API_KEYS", "AIza with space"),
        ("OPENAI_API_KEY", '"sk-quoted"'),
        ("GEMINI_BASE_URL", "ftp://127.0.0.1"),
        ("ARGUS_API_TIER", "platinum"),
        ("ARGUS_SECRET_KEY", "too-short-secret"),
        ("ARGUS_PROVIDER_TIMEOUT_S", "0"),
    ],
)
def test_unusable_provider_settings_name_the_variable_not_the_value(monkeypatch, no_provider_env, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        Settings.from_env(dotenv=False)
    assert name in str(info.value)
    if "KEY" in name:
        assert value.strip('"') not in str(info.value)


def test_the_api_key_secret_never_appears_in_repr(monkeypatch, no_provider_env):
    monkeypatch.setenv("ARGUS_SECRET_KEY", "x" * 40)
    s = Settings.from_env(dotenv=False)
    assert s.secret_key == "x" * 40 and "x" * 40 not in repr(s) and "secret_key='<set>'" in repr(s)
