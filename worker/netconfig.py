"""A network's configuration: its fields, its CA signature and its file.

Every node of a network keeps ``<data_dir>/network_config_<network id>.json``::

    {"format": 1, "network_id": "...", "version": 7,
     "config": {...},                      # the fields below
     "signature": "<base64 r||s>"}         # the network CA over protocol.config_signed_bytes

The config (``new_config`` builds the first one):

``network_id``, ``name``, ``model_id``, ``block_count`` (transformer blocks in
the model file), ``chain`` (block indices in pipeline order, ``0..n-1``),
``port`` (the admin's network port), ``admin`` ``{"node_id", "address"}``,
``members`` ``{node_id: {"role", "address", "allocation", "serial",
"joined_at"}}`` (``allocation``: ``{"cpu_share", "ram_bytes", "disk_bytes"}``
or null; ``serial``: the member certificate's serial, hex), ``crl_pem`` (the
network's current certificate revocation list, so a removal reaches every
node with the config), ``auto_approve``, ``created_at``, ``updated_at`` (Unix s).

Only the admin holds the CA key, so only the admin can produce a config that
verifies; a node applies a config only if the signature verifies with the
network CA and the version is newer than the one it has (``accept_update``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from worker import pki, protocol

FORMAT = 1
FILE_PREFIX = "network_config_"


class ConfigInvalid(Exception):
    """A config whose signature, network or version is wrong; ``str()`` says which."""


@dataclass(frozen=True)
class SignedConfig:
    """One version of a network's config with the CA's signature (64 raw bytes)."""

    network_id: str
    version: int
    config: dict
    signature: bytes

    def to_wire(self) -> dict:
        """The JSON object of the file (also sent in ``join_approved.config``)."""
        return {"format": FORMAT, "network_id": self.network_id, "version": self.version,
                "config": self.config, "signature": protocol.b64(self.signature)}

    @classmethod
    def from_wire(cls, obj: Any, ca_cert: pki.CertLike) -> "SignedConfig":
        """Parse and verify (signature with ``ca_cert``). Raises ConfigInvalid."""
        try:
            if obj.get("format") != FORMAT:
                raise ConfigInvalid(f"unknown config format {obj.get('format')!r}")
            signed = cls(str(obj["network_id"]), int(obj["version"]), dict(obj["config"]),
                         protocol.unb64(obj["signature"]))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ConfigInvalid(f"config file is malformed: {e}") from None
        signed.verify(ca_cert)
        return signed

    def verify(self, ca_cert: pki.CertLike) -> None:
        """Raise ConfigInvalid unless the CA signed exactly this network, version and config."""
        if self.config.get("network_id") != self.network_id:
            raise ConfigInvalid("the config names another network than its envelope")
        if pki.network_of(pki.as_cert(ca_cert)) != self.network_id:
            raise ConfigInvalid(f"the config is for network {self.network_id}, not this CA's")
        data = protocol.config_signed_bytes(self.network_id, self.version, self.config)
        if not pki.verify_data(ca_cert, self.signature, data):
            raise ConfigInvalid(f"config version {self.version} is not signed by the network CA")


def sign(ca_key: ec.EllipticCurvePrivateKey, network_id: str, version: int, config: dict) -> SignedConfig:
    """The CA's signature over ``(network_id, version, canonical JSON of config)``."""
    config = json.loads(json.dumps(config))  # plain JSON types only, as a peer will see it
    data = protocol.config_signed_bytes(network_id, version, config)
    return SignedConfig(network_id, version, config, pki.sign_data(ca_key, data))


def accept_update(current: Optional[SignedConfig], network_id: str, version: int, config: dict,
                  signature: bytes, ca_cert: pki.CertLike) -> SignedConfig:
    """The config of a ``config_update`` if it may replace ``current``.

    Raises ConfigInvalid when the signature does not verify with the network CA,
    it names another network, or ``version`` is not newer than ``current``'s.
    """
    candidate = SignedConfig(network_id, version, config, signature)
    candidate.verify(ca_cert)
    if current is not None and version <= current.version:
        raise ConfigInvalid(f"config version {version} is not newer than the version {current.version} held here")
    return candidate


def new_config(*, network_id: str, name: str, model_id: str, block_count: int, port: int,
               admin_node_id: str, admin_address: str, allocation: Optional[dict],
               admin_serial: int, crl: x509.CertificateRevocationList, auto_approve: bool,
               now: Optional[float] = None) -> dict:
    """The first config of a new network (version 1), with the admin as its only member."""
    now = time.time() if now is None else now
    return {
        "network_id": network_id, "name": name, "model_id": model_id, "block_count": block_count,
        "chain": list(range(block_count)), "port": port,
        "admin": {"node_id": admin_node_id, "address": admin_address},
        "members": {admin_node_id: {"role": "admin", "address": admin_address, "allocation": allocation,
                                    "serial": format(admin_serial, "x"), "joined_at": now}},
        "crl_pem": pki.pem(crl).decode("ascii"), "auto_approve": bool(auto_approve),
        "created_at": now, "updated_at": now,
    }


def path_for(data_dir: Path, network_id: str) -> Path:
    return Path(data_dir) / f"{FILE_PREFIX}{network_id}.json"


def save(data_dir: Path, signed: SignedConfig) -> Path:
    """Write the config file atomically (owner-only). Returns its path."""
    path = path_for(data_dir, signed.network_id)
    pki.atomic_write(path, json.dumps(signed.to_wire(), indent=1, sort_keys=True).encode("utf-8"), mode=0o600)
    return path


def load(path: Path, ca_cert: pki.CertLike) -> SignedConfig:
    """Read and verify one config file. Raises ConfigInvalid (also for unreadable JSON) or OSError."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigInvalid(f"{Path(path).name} is not JSON: {e}") from None
    return SignedConfig.from_wire(obj, ca_cert)


def config_files(data_dir: Path) -> list[Path]:
    """Every ``network_config_<id>.json`` in ``data_dir``, sorted."""
    return sorted(Path(data_dir).glob(f"{FILE_PREFIX}*.json"))


def network_id_of(path: Path) -> str:
    return Path(path).name[len(FILE_PREFIX):-len(".json")]


__all__ = ["ConfigInvalid", "FILE_PREFIX", "SignedConfig", "accept_update", "config_files", "load",
           "network_id_of", "new_config", "path_for", "save", "sign"]
