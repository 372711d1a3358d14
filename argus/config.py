"""Settings, read once from the environment (and a ``.env`` file via python-dotenv).

Every variable is documented in ``.env.example``. Nothing here is a secret
except ``jwt_secret``, which is never logged (see ``Settings.__repr__``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from dotenv import find_dotenv, load_dotenv


class ConfigError(ValueError):
    """An environment variable has a value we cannot use; the message names it."""


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(
    name: str, default: float, minimum: float = 0.0, maximum: float = math.inf, *, above_minimum: bool = False
) -> float:
    """A finite float from ``name``: ``minimum <= value <= maximum`` (``minimum < value``
    when ``above_minimum``). Raises ConfigError naming ``name`` (nan/inf included)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum or (above_minimum and value == minimum):
        raise ConfigError(f"{name} must be {'greater than' if above_minimum else 'at least'} {minimum:g}, got {value:g}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, got {value:g}")
    return value


#: Which environment variable feeds each ``worker.engine.SamplingParams`` field.
_SAMPLING_VARS = {
    "temperature": "ARGUS_TEMPERATURE",
    "top_k": "ARGUS_TOP_K",
    "top_p": "ARGUS_TOP_P",
    "repetition_penalty": "ARGUS_REPETITION_PENALTY",
    "max_tokens": "ARGUS_MAX_NEW_TOKENS",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _check_sampling(settings: "Settings") -> None:
    """Let the engine's own ``SamplingParams`` validate the generation settings, so
    a value it would refuse on every chat is refused at start instead.

    Raises:
        ConfigError: naming the variable whose value the engine refused.
    """
    from worker.engine import SamplingParams  # local: keeps `import argus.config` light

    try:
        SamplingParams(
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty,
            max_tokens=settings.max_new_tokens,
        )
    except ValueError as exc:
        text = str(exc)
        field = next((f for f in _SAMPLING_VARS if text.startswith(f + " ")), None)
        name = _SAMPLING_VARS[field] if field else "ARGUS_TEMPERATURE, ARGUS_TOP_K, ARGUS_TOP_P or ARGUS_REPETITION_PENALTY"
        raise ConfigError(f"{name} is not usable: {text}") from None


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    model_path: Optional[str]  # None: the packaged SmolLM2-135M-Instruct GGUF
    jwt_secret: Optional[str]  # None: generated and kept in data_dir (see argus.auth)
    messages_per_minute: int
    login_attempts: int
    login_window_s: float
    max_upload_bytes: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    blocks_per_stage: Optional[int]
    log_level: str

    def __repr__(self) -> str:  # never print the secret
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "jwt_secret":
                v = "<set>" if v else None
            parts.append(f"{f.name}={v!r}")
        return f"Settings({', '.join(parts)})"

    @classmethod
    def from_env(cls, dotenv: bool = True) -> "Settings":
        """Build settings from ``os.environ`` (after loading ``.env`` unless ``dotenv`` is False).

        Units: ``login_window_s`` in seconds, ``max_upload_bytes`` in bytes
        (``ARGUS_MAX_UPLOAD_MB`` × 1 MiB). Generation values must be ones the
        engine accepts: ``0 <= ARGUS_TEMPERATURE <= 100``, ``ARGUS_TOP_K >= 0``,
        ``0 < ARGUS_TOP_P <= 1``, ``0 < ARGUS_REPETITION_PENALTY <= 100``; no
        float may be nan or infinite.

        Raises:
            ConfigError: a value is unusable; the message names the variable
                (and never contains ``JWT_SECRET_KEY``'s value).
        """
        if dotenv:
            load_dotenv(find_dotenv(usecwd=True), override=False)  # the .env of the directory the server runs in
        bps = _int("ARGUS_BLOCKS_PER_STAGE", 0, 0)
        log_level = (os.environ.get("ARGUS_LOG_LEVEL", "").strip() or "INFO").upper()
        if log_level not in LOG_LEVELS:
            raise ConfigError(f"ARGUS_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        settings = cls(
            data_dir=Path(os.environ.get("ARGUS_DATA_DIR", "").strip() or "./data").resolve(),
            model_path=os.environ.get("ARGUS_MODEL_PATH", "").strip() or None,
            jwt_secret=os.environ.get("JWT_SECRET_KEY", "").strip() or None,
            messages_per_minute=_int("ARGUS_MESSAGES_PER_MINUTE", 20, 1),
            login_attempts=_int("ARGUS_LOGIN_ATTEMPTS", 7, 1),
            login_window_s=_float("ARGUS_LOGIN_WINDOW_S", 300.0, 1.0),
            max_upload_bytes=_int("ARGUS_MAX_UPLOAD_MB", 10, 1) * 1024 * 1024,
            max_new_tokens=_int("ARGUS_MAX_NEW_TOKENS", 512, 1),
            temperature=_float("ARGUS_TEMPERATURE", 0.7, 0.0, 100.0),
            top_k=_int("ARGUS_TOP_K", 40, 0),
            top_p=_float("ARGUS_TOP_P", 0.9, 0.0, 1.0, above_minimum=True),
            repetition_penalty=_float("ARGUS_REPETITION_PENALTY", 1.1, 0.0, 100.0, above_minimum=True),
            blocks_per_stage=bps or None,
            log_level=log_level,
        )
        _check_sampling(settings)
        return settings
