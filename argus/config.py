"""Settings, read once from the environment (and a ``.env`` file via python-dotenv).

Every variable is documented in ``.env.example``. Nothing here is a secret
except ``jwt_secret``, ``secret_key`` and ``api_keys`` (:data:`SECRET_SETTINGS`),
which are never logged (see ``Settings.__repr__``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from dotenv import find_dotenv, load_dotenv

if TYPE_CHECKING:
    from worker.engine import SamplingParams


class ConfigError(ValueError):
    """An environment variable has a value we cannot use; the message names it."""


def env_int(name: str, default: int, minimum: int = 0, maximum: Optional[int] = None, *, unit: str = "",
            environ: Optional[Mapping[str, str]] = None) -> int:
    """The whole number in environment variable ``name`` (``default`` when unset or blank), at
    least ``minimum`` and, when given, at most ``maximum``; ``unit`` ("KiB") names what it counts.

    Raises ConfigError with a sentence naming the variable.
    """
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        what = f"a whole number of {unit}" if unit else "a whole number"
        raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
    if maximum is None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}{f' ({unit})' if unit else ''}, got {value}")
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
#: The generation defaults: the setting that answered ``bench/local_defaults.py``'s question set
#: correctly most often (docs/LOCAL_MODEL.md): greedy (temperature 0), the repetition penalty
#: 1.1 over the answer's tokens. Top-k and top-p only matter once the temperature is above 0.
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
DEFAULT_REPETITION_PENALTY = 1.1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Each remote provider's API-key variables: a comma-separated list, and a single key.
API_KEY_VARS = {
    "gemini": ("GEMINI_API_KEYS", "GEMINI_API_KEY"),
    "openai": ("OPENAI_API_KEYS", "OPENAI_API_KEY"),
    "anthropic": ("ANTHROPIC_API_KEYS", "ANTHROPIC_API_KEY"),
}
#: Each remote provider's API root override (tests and OpenAI-compatible servers use them).
BASE_URL_VARS = {"gemini": "GEMINI_BASE_URL", "openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}
#: Values that look like keys but are not: Chainlit's CLI sets OPENAI_API_KEY to this when CI=true.
PLACEHOLDER_KEYS = frozenset({"sk-FAKE-OPENAI-API-KEY"})
API_TIERS = ("free", "tier1")
#: Settings whose values are secrets (shown as "<set>" by Settings.__repr__).
SECRET_SETTINGS = ("jwt_secret", "secret_key", "api_keys")


def _api_keys() -> dict[str, tuple[str, ...]]:
    """Each provider's keys from :data:`API_KEY_VARS`, in order, without repeats, blanks or
    :data:`PLACEHOLDER_KEYS`. Raises ConfigError (naming the variable, never the value) for a
    value with spaces or quotes inside a key."""
    out: dict[str, tuple[str, ...]] = {}
    for provider, names in API_KEY_VARS.items():
        keys: list[str] = []
        for name in names:
            for raw in os.environ.get(name, "").split(","):
                key = raw.strip()
                if not key or key in PLACEHOLDER_KEYS or key in keys:
                    continue
                if any(c.isspace() or c in "\"'" for c in key) or len(key) > 512:
                    raise ConfigError(f"{name} holds something that is not an API key (spaces, quotes or too long)")
                keys.append(key)
        if keys:
            out[provider] = tuple(keys)
    return out


def _base_urls() -> dict[str, str]:
    """Each provider's API root from :data:`BASE_URL_VARS` (only those set). Raises ConfigError."""
    out = {}
    for provider, name in BASE_URL_VARS.items():
        url = os.environ.get(name, "").strip()
        if url:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"{name} must be an http:// or https:// URL, got {url!r}")
            out[provider] = url.rstrip("/")
    return out


def sampling_params(settings: Any) -> "SamplingParams":
    """The sampling of one answer from the settings (``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``max_new_tokens``): the one translation of settings into
    :class:`worker.engine.SamplingParams`, for the local model and the worker network.

    Raises:
        ValueError: a value the engine refuses (:func:`check_sampling` reports it at start).
    """
    from worker.engine import SamplingParams  # local: keeps `import argus.config` light

    return SamplingParams(
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        repetition_penalty=settings.repetition_penalty,
        max_tokens=settings.max_new_tokens,
    )


def check_sampling(settings: "Settings") -> None:
    """Let the engine's own ``SamplingParams`` validate the generation settings, so
    a value it would refuse on every chat is refused at start instead.

    Raises:
        ConfigError: naming the variable whose value the engine refused.
    """
    try:
        sampling_params(settings)
    except ValueError as exc:
        text = str(exc)
        field = next((f for f in _SAMPLING_VARS if text.startswith(f + " ")), None)
        name = _SAMPLING_VARS[field] if field else "ARGUS_TEMPERATURE, ARGUS_TOP_K, ARGUS_TOP_P or ARGUS_REPETITION_PENALTY"
        raise ConfigError(f"{name} is not usable: {text}") from None


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    worker_data_dir: Path  # the local worker daemon's data dir (its control credentials); default data_dir/worker
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
    # Remote providers and the API-key pool (argus.keys, argus.catalogue).
    api_keys: dict = field(default_factory=dict, hash=False)  # provider -> keys from the environment (secret)
    secret_key: Optional[str] = None  # ARGUS_SECRET_KEY; None: generated into data_dir (argus.keys.secretbox)
    base_urls: dict = field(default_factory=dict, hash=False)  # provider -> API root
    api_tier: str = "free"  # which catalogue limits apply: "free" or "tier1"
    default_model: Optional[str] = None  # a catalogue id; None: the first chat model with a key, else local
    catalogue_path: Optional[str] = None  # None: argus/catalogue.json
    provider_timeout_s: float = 120.0  # longest wait for a provider's response, in seconds
    video_timeout_s: float = 600.0  # longest wait for a generated video, in seconds

    def __repr__(self) -> str:  # never print the secrets
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in SECRET_SETTINGS:
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
                (and never contains ``JWT_SECRET_KEY``'s, ``ARGUS_SECRET_KEY``'s or an API key's value).
        """
        if dotenv:
            load_dotenv(find_dotenv(usecwd=True), override=False)  # the .env of the directory the server runs in
        bps = env_int("ARGUS_BLOCKS_PER_STAGE", 0, 0)
        log_level = (os.environ.get("ARGUS_LOG_LEVEL", "").strip() or "INFO").upper()
        if log_level not in LOG_LEVELS:
            raise ConfigError(f"ARGUS_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        data_dir = Path(os.environ.get("ARGUS_DATA_DIR", "").strip() or "./data").resolve()
        api_tier = (os.environ.get("ARGUS_API_TIER", "").strip() or "free").lower()
        if api_tier not in API_TIERS:
            raise ConfigError(f"ARGUS_API_TIER must be one of {', '.join(API_TIERS)}, got {api_tier!r}")
        secret = os.environ.get("ARGUS_SECRET_KEY", "").strip()
        if secret and len(secret) < 32:
            raise ConfigError("ARGUS_SECRET_KEY must be at least 32 characters (it encrypts stored API keys)")
        worker_dir = os.environ.get("ARGUS_WORKER_DATA_DIR", "").strip()
        settings = cls(
            data_dir=data_dir,
            worker_data_dir=Path(worker_dir).resolve() if worker_dir else data_dir / "worker",
            model_path=os.environ.get("ARGUS_MODEL_PATH", "").strip() or None,
            jwt_secret=os.environ.get("JWT_SECRET_KEY", "").strip() or None,
            messages_per_minute=env_int("ARGUS_MESSAGES_PER_MINUTE", 20, 1),
            login_attempts=env_int("ARGUS_LOGIN_ATTEMPTS", 7, 1),
            login_window_s=_float("ARGUS_LOGIN_WINDOW_S", 300.0, 1.0),
            max_upload_bytes=env_int("ARGUS_MAX_UPLOAD_MB", 10, 1) * 1024 * 1024,
            max_new_tokens=env_int("ARGUS_MAX_NEW_TOKENS", 512, 1),
            # Defaults measured by bench/local_defaults.py (docs/LOCAL_MODEL.md): greedy with a
            # repetition penalty of 1.1 over the answer answered the question set best.
            temperature=_float("ARGUS_TEMPERATURE", DEFAULT_TEMPERATURE, 0.0, 100.0),
            top_k=env_int("ARGUS_TOP_K", DEFAULT_TOP_K, 0),
            top_p=_float("ARGUS_TOP_P", DEFAULT_TOP_P, 0.0, 1.0, above_minimum=True),
            repetition_penalty=_float("ARGUS_REPETITION_PENALTY", DEFAULT_REPETITION_PENALTY, 0.0, 100.0,
                                      above_minimum=True),
            blocks_per_stage=bps or None,
            log_level=log_level,
            api_keys=_api_keys(),
            secret_key=os.environ.get("ARGUS_SECRET_KEY", "").strip() or None,
            base_urls=_base_urls(),
            api_tier=api_tier,
            default_model=os.environ.get("ARGUS_DEFAULT_MODEL", "").strip() or None,
            catalogue_path=os.environ.get("ARGUS_CATALOGUE", "").strip() or None,
            provider_timeout_s=_float("ARGUS_PROVIDER_TIMEOUT_S", 120.0, 1.0),
            video_timeout_s=_float("ARGUS_VIDEO_TIMEOUT_S", 600.0, 10.0),
        )
        check_sampling(settings)
        return settings
