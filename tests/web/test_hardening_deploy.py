"""Issue 13, findings 8 and 12: the deployment files.

* ``docker-compose.yml`` runs MongoDB with authentication, unpublished, and the app signs in as
  an app user that ``deploy/mongo/create-app-user.js`` creates with rights on its database only.
  (No Docker engine runs here: the file is checked as data; ``test_containers.py`` validates it
  against the Compose Specification.)
* ``deploy/argus-worker.service`` says what is true of a running daemon: started as the unit
  starts it (``--host 0.0.0.0``), its control endpoint listens on 127.0.0.1 only, and its
  credentials (a 0700 directory, private keys 0600) are readable by the daemon's user only.
"""
from __future__ import annotations

import json
import re
import stat

import psutil
import pytest
from ruamel.yaml import YAML

from tests.support.paths import REPO

MONGO_VARS = ("MONGO_ROOT_USERNAME", "MONGO_ROOT_PASSWORD", "MONGO_APP_USERNAME", "MONGO_APP_PASSWORD", "MONGO_APP_DB")


def _compose() -> dict:
    return YAML(typ="safe").load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))


def _interpolated(value: str) -> list[str]:
    """The variable names ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` in ``value``."""
    return re.findall(r"\$\{(\w+)(?::?[-?][^}]*)?\}", value)


# ---- 8. MongoDB with authentication -------------------------------------------------------------
def test_mongo_is_not_published_and_requires_credentials_from_env():
    mongo = _compose()["services"]["mongo"]
    assert not mongo.get("ports") and not mongo.get("network_mode")
    env = mongo["environment"]
    assert _interpolated(env["MONGO_INITDB_ROOT_USERNAME"]) == ["MONGO_ROOT_USERNAME"]
    # No default for a password: compose refuses to start without it (":?").
    for key, var in (("MONGO_INITDB_ROOT_PASSWORD", "MONGO_ROOT_PASSWORD"), ("MONGO_APP_PASSWORD", "MONGO_APP_PASSWORD")):
        assert env[key].startswith("${" + var + ":?"), env[key]


def test_app_signs_in_as_the_app_user_the_init_script_creates():
    doc = _compose()
    mongo, app = doc["services"]["mongo"], doc["services"]["app"]
    uri = app["environment"]["MONGO_URI"]
    assert re.fullmatch(r"mongodb://\$\{MONGO_APP_USERNAME[^}]*\}:\$\{MONGO_APP_PASSWORD\}@mongo:27017/\$\{MONGO_APP_DB[^}]*\}", uri), uri
    for var in ("MONGO_APP_USERNAME", "MONGO_APP_PASSWORD", "MONGO_APP_DB"):  # the script sees what the URI uses
        assert _interpolated(mongo["environment"][var]) == [var]

    (mount,) = mongo["configs"]
    assert mount["target"].startswith("/docker-entrypoint-initdb.d/") and mount["target"].endswith(".js")
    script = REPO / doc["configs"][mount["source"]]["file"]
    assert script.is_relative_to(REPO / "deploy") and script.is_file()
    js = script.read_text(encoding="utf-8")
    for var in ("MONGO_APP_USERNAME", "MONGO_APP_PASSWORD", "MONGO_APP_DB"):
        assert f"process.env.{var}" in js
    assert "createUser" in js
    roles = re.findall(r'role:\s*"(\w+)"', js)
    assert roles == ["readWrite"], roles  # its own database only; never root, dbOwner or userAdmin


def test_env_example_documents_the_security_settings():
    text = (REPO / ".env.example").read_text(encoding="utf-8")
    names = set(re.findall(r"(?m)^#?\s*([A-Z][A-Z0-9_]+)=", text))
    for name in (*MONGO_VARS, "ARGUS_MAX_BODY_KB", "ARGUS_ALLOWED_HOSTS", "CHAINLIT_URL", "FORWARDED_ALLOW_IPS"):
        assert name in names, name
    assert re.search(r"(?m)^MONGO_ROOT_PASSWORD=$", text) and re.search(r"(?m)^MONGO_APP_PASSWORD=$", text)  # no sample secret
    assert (REPO / "docs" / "SECURITY.md").is_file()


# ---- 12. the worker's service file ---------------------------------------------------------------
def _comments(path) -> str:
    return "\n".join(line[1:].strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#"))


def test_service_file_does_not_tell_to_open_the_control_port():
    text = _comments(REPO / "deploy" / "argus-worker.service")
    firewall = text[text.index("Firewall:"):text.index("Control credentials:")]
    assert "Do NOT open the control port (TCP 7700)" in " ".join(firewall.split())
    assert "127.0.0.1 only" in " ".join(firewall.split())
    assert not re.search(r"control port \(TCP 7700\)[^.]*must be reachable", " ".join(firewall.split()))
    creds = " ".join(text[text.index("Control credentials:"):].split())
    assert "/var/lib/argus-worker/control/" in creds and "only the argus user (and root)" in creds


@pytest.mark.e2e
def test_daemon_started_like_the_unit_keeps_control_on_loopback_and_private(tmp_path):
    from tests.support.daemons import start_daemon

    d = start_daemon(tmp_path / "w", "w", extra=("--host", "0.0.0.0"))  # as ExecStart= does
    try:
        control_port = json.loads((d.data_dir / "control" / "endpoint.json").read_text())["port"]
        listening = [c.laddr for c in psutil.Process(d.proc.pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        on_control = {addr.ip for addr in listening if addr.port == control_port}
        assert on_control == {"127.0.0.1"}, listening
        control = d.data_dir / "control"
        assert stat.S_IMODE(control.stat().st_mode) == 0o700
        # The directory alone keeps everyone else out; the private keys are owner-only as well.
        secrets = [p for p in control.iterdir() if p.suffix == ".key"]
        assert {p.name for p in secrets} >= {"ca.key", "client.key", "server.key"}
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in secrets} == {p.name: "0o600" for p in secrets}
    finally:
        d.stop()
