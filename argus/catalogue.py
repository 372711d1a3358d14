"""The model catalogue: which models exist, what they can do, and their rate limits.

The data lives in ``argus/catalogue.json`` (or the file ``ARGUS_CATALOGUE``
names); adding a model is an edit there, not code. Each entry gives the
provider, the provider's model id, a label, a kind (``chat``, ``image``,
``video``), capabilities (``vision``, ``image_output``, ``video_output``), the
context length in tokens, and per-tier limits per API key: requests per minute
(RPM), tokens per minute (TPM) and requests per day (RPD); ``null`` means no
published limit. The file names its sources.

The local model (``worker.engine``) is not in the file: its id comes from the
loaded engine, so :func:`local_spec` builds its entry at run time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: The provider name of the local engine.
LOCAL = "local"
KINDS = ("chat", "image", "video")
CAPABILITIES = ("vision", "image_output", "video_output")
#: The usage tiers a catalogue may give limits for (``ARGUS_API_TIER``).
TIERS = ("free", "tier1")
DEFAULT_PATH = Path(__file__).with_name("catalogue.json")


class CatalogueError(ValueError):
    """The catalogue file is unreadable or malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Limits:
    """Per API key and model: requests per minute, input tokens per minute, requests per day.
    None = no limit applied by us (the provider's 429 still counts)."""

    rpm: Optional[int] = None
    tpm: Optional[int] = None
    rpd: Optional[int] = None


@dataclass(frozen=True)
class ModelSpec:
    """One model of the catalogue.

    Attributes:
        provider: ``"gemini"``, ``"openai"``, ``"anthropic"`` or :data:`LOCAL`.
        id: the provider's model id (what the API is called with).
        label: what people see.
        kind: ``"chat"``, ``"image"`` or ``"video"``.
        capabilities: a subset of :data:`CAPABILITIES`.
        context_tokens: the context window, in tokens.
        limits: per tier (:data:`TIERS`).
        day_resets: IANA time zone in which the provider's daily quota resets.
    """

    provider: str
    id: str
    label: str
    kind: str
    capabilities: frozenset[str] = frozenset()
    context_tokens: int = 0
    limits: dict = field(default_factory=dict, compare=False, hash=False)
    day_resets: str = "UTC"

    @property
    def vision(self) -> bool:
        return "vision" in self.capabilities

    @property
    def is_local(self) -> bool:
        return self.provider == LOCAL

    def limits_for(self, tier: str) -> Limits:
        """The limits of ``tier`` (no limits when the catalogue has none for it)."""
        return self.limits.get(tier) or Limits()


def local_spec(model_id: str, label: str, context_tokens: int = 0) -> ModelSpec:
    """The catalogue entry of the local engine's model (text only, no limits)."""
    return ModelSpec(provider=LOCAL, id=model_id, label=label, kind="chat", context_tokens=context_tokens)


@dataclass(frozen=True)
class Catalogue:
    """The models, in file order (the first chat model of a provider is its default)."""

    models: tuple[ModelSpec, ...]
    sources: dict = field(default_factory=dict, compare=False, hash=False)

    def get(self, model_id: str) -> Optional[ModelSpec]:
        """The model with this id (case-insensitive), or None."""
        wanted = model_id.strip().lower()
        return next((m for m in self.models if m.id.lower() == wanted), None)

    def of_kind(self, kind: str, providers: Optional[Iterable[str]] = None) -> list[ModelSpec]:
        """The models of ``kind``, in file order; only those of ``providers`` when given."""
        allowed = None if providers is None else set(providers)
        return [m for m in self.models if m.kind == kind and (allowed is None or m.provider in allowed)]

    @property
    def providers(self) -> list[str]:
        """Every provider named, in file order."""
        return list(dict.fromkeys(m.provider for m in self.models))


def _limits(raw: object, where: str) -> Limits:
    if raw is None:
        return Limits()
    if not isinstance(raw, dict) or set(raw) - {"rpm", "tpm", "rpd"}:
        raise CatalogueError(f"{where}: limits must be an object with rpm, tpm and rpd")
    values = {}
    for name in ("rpm", "tpm", "rpd"):
        v = raw.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise CatalogueError(f"{where}: {name} must be a positive whole number or null, got {v!r}")
        values[name] = v
    return Limits(**values)


def _model(raw: object, index: int, day_resets: dict, path: Path) -> ModelSpec:
    where = f"{path}: models[{index}]"
    if not isinstance(raw, dict):
        raise CatalogueError(f"{where} must be an object")
    try:
        provider, model_id, label, kind = (raw[k] for k in ("provider", "id", "label", "kind"))
    except KeyError as exc:
        raise CatalogueError(f"{where} lacks {exc.args[0]!r}") from None
    if not all(isinstance(v, str) and v.strip() for v in (provider, model_id, label, kind)):
        raise CatalogueError(f"{where}: provider, id, label and kind must be non-empty strings")
    where = f"{path}: model {model_id!r}"
    if provider == LOCAL:
        raise CatalogueError(f"{where}: the local model is not listed in the catalogue (its id comes from the engine)")
    if kind not in KINDS:
        raise CatalogueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    caps = raw.get("capabilities", [])
    if not isinstance(caps, list) or any(c not in CAPABILITIES for c in caps):
        raise CatalogueError(f"{where}: capabilities must be a list of {', '.join(CAPABILITIES)}")
    context = raw.get("context_tokens", 0)
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise CatalogueError(f"{where}: context_tokens must be a whole number >= 0")
    limits_raw = raw.get("limits", {})
    if not isinstance(limits_raw, dict) or set(limits_raw) - set(TIERS):
        raise CatalogueError(f"{where}: limits must be an object keyed by tier ({', '.join(TIERS)})")
    limits = {tier: _limits(limits_raw.get(tier), f"{where}, tier {tier}") for tier in TIERS}
    return ModelSpec(
        provider=provider, id=model_id, label=label, kind=kind, capabilities=frozenset(caps),
        context_tokens=context, limits=limits, day_resets=str(day_resets.get(provider) or "UTC"),
    )


def load_catalogue(path: Union[str, Path, None] = None) -> Catalogue:
    """Read and check a catalogue file (default: ``argus/catalogue.json``).

    Raises:
        CatalogueError: unreadable, not JSON, or an entry is malformed or repeated;
            the message names the file and the entry.
    """
    path = Path(path) if path else DEFAULT_PATH
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogueError(f"cannot read the model catalogue {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CatalogueError(f"the model catalogue {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CatalogueError(f"{path}: expected an object with a 'models' list")
    day_resets = data.get("day_resets") or {}
    if not isinstance(day_resets, dict):
        raise CatalogueError(f"{path}: day_resets must map providers to time zones")
    for provider, zone in day_resets.items():
        try:
            ZoneInfo(str(zone))
        except (ZoneInfoNotFoundError, ValueError):
            raise CatalogueError(f"{path}: day_resets of {provider!r}: unknown time zone {zone!r}") from None
    models = tuple(_model(raw, i, day_resets, path) for i, raw in enumerate(data["models"]))
    seen: set[str] = set()
    for m in models:
        if m.id.lower() in seen:
            raise CatalogueError(f"{path}: model {m.id!r} is listed twice")
        seen.add(m.id.lower())
    return Catalogue(models=models, sources=dict(data.get("sources") or {}))
