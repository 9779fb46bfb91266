"""The deployment files: container files, compose stack, systemd units, site configs.

No container engine runs here, so the files are parsed and checked against each other and
against the repository: every file they copy or mount exists, the ports, AE titles and
paths of triaged, Orthanc and compose agree, the image's health check really runs against
a real ``triaged serve``, and the systemd units pass ``systemd-analyze``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, Daemon, free_port
from triaged.cli import EXIT_USER_ERROR
from triaged.config import Settings
from triaged.config import load as load_config
from triaged.pipeline.definition import load_pipeline

DEPLOY = REPO / "deploy"
STATE = PurePosixPath("/var/lib/triaged")
ETC = PurePosixPath("/etc/triaged")


# -- a Containerfile reader ------------------------------------------------------------------
KEYWORDS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: dict[str, str]
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (CMD, ENTRYPOINT, VOLUME...)."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_containerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Split into instructions (joining continuations, dropping comments) and stages.

    Returns the global ARG defaults (before the first FROM) and the stages with ``${ARG}``
    in FROM resolved. An unknown instruction is an error, as it is for a builder.
    """
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append((start, " ".join(p for p in pending if p)))
        pending = []
    assert not pending, "the file ends inside a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, content in logical:
        keyword, _, rest = content.partition(" ")
        keyword = keyword.upper()
        assert keyword in KEYWORDS, f"line {line}: unknown instruction {keyword}"
        flags: dict[str, str] = {}
        rest = rest.strip()
        while keyword != "RUN" and rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        ins = Instruction(keyword, flags, rest, line)
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"line {line}: only ARG may precede FROM"
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def stage_args(stage: Stage) -> dict[str, str]:
    return dict(i.args.partition("=")[::2] for i in stage.all("ARG"))


def copy_sources(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context."""
    out = []
    for ins in stage.all("COPY") + stage.all("ADD"):
        if "from" in ins.flags:
            continue
        words = ins.exec_form() if ins.args.startswith("[") else shlex.split(ins.args)
        out.append((words[:-1], words[-1]))
    return out


@pytest.fixture(scope="module")
def image() -> tuple[dict[str, str], list[Stage]]:
    return parse_containerfile((DEPLOY / "Containerfile").read_text())


@pytest.fixture(scope="module")
def site() -> Settings:
    return load_config(DEPLOY / "config.toml", environ={})


def test_containerfile_reader_rejects_what_a_builder_rejects() -> None:
    with pytest.raises(AssertionError, match="unknown instruction"):
        parse_containerfile("FROM x\nRUNN true\n")
    with pytest.raises(AssertionError, match="continuation"):
        parse_containerfile("FROM x\nRUN true \\\n")
    _, (stage,) = parse_containerfile("FROM a AS b\n# c\nRUN x \\\n  # d\n  y\n")
    assert (stage.name, stage.all("RUN")[0].args) == ("b", "x y")


def test_image_is_python_311_slim_with_the_pinned_cpu_torch(
    image: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = image
    assert [s.name for s in stages] == ["build", None]
    for stage in stages:
        assert re.fullmatch(r"(docker\.io/library/)?python:3\.11-slim(-\w+)?", stage.base)
    build = stages[0]
    args = stage_args(build)
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={args['TORCH_VERSION']}" in pins  # the image's torch is the project's pin
    assert args["TORCH_INDEX"].endswith("/whl/cpu")
    runs = [i.args for i in build.all("RUN")]
    torch_at = next(n for n, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    assert '--index-url "${TORCH_INDEX}"' in runs[torch_at]
    package_at = next(n for n, r in enumerate(runs) if "pip install ." in r)
    assert torch_at < package_at  # torch first, or pip would fetch the CUDA build
    assert "pip check" in runs[package_at]


def test_every_copied_file_exists_in_the_repository(
    image: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = image
    names = set()
    for stage in stages:
        for ins in stage.all("COPY"):
            if "from" in ins.flags:
                assert ins.flags["from"] in names, f"COPY --from an unknown stage: {ins}"
        for sources, _ in copy_sources(stage):
            for src in sources:
                assert (REPO / src).exists(), f"Containerfile copies a missing {src}"
        if stage.name:
            names.add(stage.name)
    # the build context filter lets through exactly what the image copies
    kept = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "Containerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = {src for stage in stages for sources, _ in copy_sources(stage) for src in sources}
    assert copied == kept
    _, (orthanc,) = parse_containerfile((DEPLOY / "orthanc" / "Containerfile").read_text())
    for sources, dest in copy_sources(orthanc):
        assert dest == "/etc/orthanc/"
        for src in sources:
            assert (DEPLOY / "orthanc" / src).is_file(), src
    assert orthanc.all("USER")[0].args == "orthanc"
    assert "TCP_NODELAY=1" in orthanc.all("ENV")[0].args
    assert orthanc.all("CMD")[0].exec_form() == ["Orthanc", "/etc/orthanc/"]


def test_image_runs_as_non_root_with_state_volumes_ports_and_health_check(
    image: tuple[dict[str, str], list[Stage]], site: Settings
) -> None:
    _, stages = image
    final = stages[-1]
    args = stage_args(final)
    (user,) = final.all("USER")
    uid = user.args.split(":")[0].replace("${UID}", args["UID"])
    assert uid.isdigit() and int(uid) >= 1000

    volumes = [PurePosixPath(v) for v in final.all("VOLUME")[0].exec_form()]
    database = PurePosixPath(site.database.url.removeprefix("sqlite:///"))
    for path in (site.storage.spool_dir, site.storage.results_dir, site.models.store, database):
        assert any(PurePosixPath(path).is_relative_to(v) for v in volumes), path
    assert all(v.is_relative_to(STATE) for v in volumes)

    exposed = {int(p.split("/")[0]) for i in final.all("EXPOSE") for p in i.args.split()}
    assert exposed == {site.dicom.port, site.web.port}

    copies = {tuple(src): dest for src, dest in copy_sources(final)}
    config_path = copies[("deploy/config.toml",)]
    assert final.all("ENTRYPOINT")[0].exec_form() == ["triaged"]
    assert final.all("CMD")[0].exec_form() == ["serve", "--config", config_path]
    pipelines_dest = PurePosixPath(copies[("pipelines",)])
    for p in site.pipelines:
        rel = PurePosixPath(p).relative_to(pipelines_dest)
        assert load_pipeline(REPO / "pipelines" / rel).name  # the shipped pipeline is valid

    (health,) = final.all("HEALTHCHECK")
    assert "start-period" in health.flags
    text = (DEPLOY / "Containerfile").read_text()
    assert "curl" not in text and "wget" not in text
    cmd = health.args
    assert cmd.startswith("CMD ")
    argv = json.loads(cmd[4:])
    assert argv[0] == "python" and "/healthz" in argv[-1] and "urllib" in argv[-1]


def health_check_argv(image: tuple[dict[str, str], list[Stage]]) -> list[str]:
    (health,) = image[1][-1].all("HEALTHCHECK")
    argv: list[str] = json.loads(health.args[4:])
    return [sys.executable, *argv[1:]]


class _Status(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[Callable[[int], int]]:
    servers: list[HTTPServer] = []

    def serve(status: int) -> int:
        handler = type("H", (_Status,), {"status": status})
        srv = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return int(srv.server_address[1])

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def run_health(argv: list[str], port: int) -> int:
    env = {"TRIAGED_WEB__PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


def health_body(port: int) -> str:
    """What /healthz said (for the failure message)."""
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).text


def test_health_check_command_follows_the_status_code(
    image: tuple[dict[str, str], list[Stage]], status_server: Callable[[int], int]
) -> None:
    argv = health_check_argv(image)
    assert run_health(argv, status_server(200)) == 0
    assert run_health(argv, status_server(503)) != 0
    assert run_health(argv, free_port()) != 0  # nothing listening


def test_health_check_passes_on_serve_as_the_compose_stack_runs_it(
    image: tuple[dict[str, str], list[Stage]], make_daemon: Callable[..., Daemon]
) -> None:
    """serve without in-process workers (they are replicas) and no model yet is healthy.

    The compose workers wait for serve to be healthy; if serve reported itself unhealthy
    for lack of a model it does not load, the stack would never start scoring.
    """
    web_port = free_port()
    d = make_daemon(web={"enabled": True, "port": web_port}, worker={"in_process": 0})
    d.start()
    assert run_health(health_check_argv(image), web_port) == 0, health_body(web_port)


def test_health_check_passes_on_a_fresh_single_node_with_a_live_model(
    image: tuple[dict[str, str], list[Stage]],
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    """The systemd/single-container shape: an in-process worker, a live model, no study yet.

    A node that can score must be healthy from the start, not only after its first study.
    """
    import torch

    from tests.pipeline.conftest import register_cbam, register_fusion
    from triaged.registry import ModelStore

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    store = ModelStore(tmp_path / "models")
    register_fusion(store, seed=0)
    register_cbam(store)
    torch.set_num_threads(before)
    web_port = free_port()
    d = make_daemon(
        pipelines=[str(REPO / "pipelines" / "covid-ct.toml")],
        models={"store": str(store.root)},
        web={"enabled": True, "port": web_port},
        worker={"in_process": 1},
    )
    d.start()
    assert run_health(health_check_argv(image), web_port) == 0, health_body(web_port)


# -- compose -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def orthanc() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    return data


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's volumes (short syntax)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        out[target] = source
    return out


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, value)


def compose_settings(compose: dict[str, Any], service: str) -> Settings:
    """The triaged settings a compose service runs with (mounted config + environment)."""
    svc = compose["services"][service]
    config = mounts(svc)["/etc/triaged/config.toml"]
    env = {"POSTGRES_PASSWORD": "pw", "TRIAGED_WEB_SECRET": "secret"}
    environ = {k: interpolate(str(v), env) for k, v in svc["environment"].items()}
    return load_config(DEPLOY / config, environ=environ)


def test_compose_parses_and_references_only_existing_files(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "orthanc", "triaged", "worker"}
    declared = set(compose["volumes"])
    for name, svc in services.items():
        if "build" in svc:
            context = DEPLOY / svc["build"]["context"]
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for target, source in mounts(svc).items():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts a missing {source}"
            else:
                assert source in declared, f"{name} mounts an undeclared volume {source}"
            assert target.startswith("/")
        image = interpolate(svc["image"], {}) if "image" in svc else ""
        assert not image.endswith(":latest"), name
    example = (DEPLOY / "compose" / "env.example").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", (DEPLOY / "compose.yaml").read_text()))
    assert required == {"POSTGRES_PASSWORD", "ORTHANC_ADMIN_PASSWORD", "TRIAGED_WEB_SECRET"}
    for var in required:
        assert re.search(rf"^{var}=$", example, re.M), f"{var} missing from env.example"


def test_compose_serve_and_workers_share_spool_results_models_and_database(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    serve, worker = services["triaged"], services["worker"]
    assert serve["image"] == worker["image"]
    assert worker["deploy"]["replicas"] == 2
    assert mounts(serve) == mounts(worker)
    assert serve["command"][0] == "serve" and worker["command"][0] == "worker"
    assert worker["depends_on"]["triaged"]["condition"] == "service_healthy"
    assert serve["depends_on"]["postgres"]["condition"] == "service_healthy"
    s, w = compose_settings(compose, "triaged"), compose_settings(compose, "worker")
    assert s.database.url == w.database.url
    assert s.database.url.startswith("postgresql+psycopg://triaged:pw@postgres:5432/")
    assert s.web.secret_key == "secret"
    targets = [PurePosixPath(t) for t in mounts(serve)]
    for path in (s.storage.spool_dir, s.storage.results_dir, s.models.store):
        assert sum(PurePosixPath(path).is_relative_to(t) for t in targets) == 1, path
    assert s.worker.in_process == 0  # scoring happens in the worker replicas


def test_compose_triaged_and_orthanc_point_at_each_other(
    compose: dict[str, Any], orthanc: dict[str, Any]
) -> None:
    s = compose_settings(compose, "triaged")
    (dest,) = s.destinations
    assert dest.host in compose["services"] and dest.host == "orthanc"
    assert dest.port == orthanc["DicomPort"]
    assert dest.ae_title == orthanc["DicomAet"]
    assert (
        f"{orthanc['DicomPort']}:{orthanc['DicomPort']}" in compose["services"]["orthanc"]["ports"]
    )
    assert s.dicom.allowed_calling_aets == [orthanc["DicomAet"]]
    peer = orthanc["DicomModalities"]["triaged"]
    assert peer["Host"] in compose["services"] and peer["Host"] == "triaged"
    assert (peer["Port"], peer["AET"]) == (s.dicom.port, s.dicom.ae_title)
    assert s.dicom.bind == "0.0.0.0"
    # Orthanc takes results only from listed modalities, triaged among them
    assert orthanc["DicomAlwaysAllowStore"] is False and peer["AllowStore"] is True
    orthanc_mounts = mounts(compose["services"]["orthanc"])
    for script in orthanc["LuaScripts"]:
        assert script in orthanc_mounts
    assert orthanc["RegisteredUsers"] == {"admin": "${ORTHANC_ADMIN_PASSWORD}"}
    assert "ORTHANC_ADMIN_PASSWORD" in compose["services"]["orthanc"]["environment"]


def test_lua_script_names_match_the_orthanc_configuration(orthanc: dict[str, Any]) -> None:
    lua = (DEPLOY / "orthanc" / "forward.lua").read_text()
    target = re.search(r"^local TARGET = '([^']+)'", lua, re.M)
    mark = re.search(r"^local MARK = '([^']+)'", lua, re.M)
    assert target and target.group(1) in orthanc["DicomModalities"]
    assert mark and mark.group(1) in orthanc["UserMetadata"]
    assert 1024 <= orthanc["UserMetadata"][mark.group(1)] <= 65535
    for callback in ("OnStableStudy", "OnHeartBeat", "OnJobFailure"):
        assert re.search(rf"^function {callback}\(", lua, re.M), callback


# -- systemd -------------------------------------------------------------------------------
def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections -> (key, value) in order; keys may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path.name}:{n}: not key=value"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], key: str) -> list[str]:
    return [v for k, v in unit["Service"] if k == key]


def one(unit: dict[str, list[tuple[str, str]]], key: str) -> str:
    (v,) = values(unit, key)
    return v


UNITS = {"triaged.service": "serve", "triaged-worker@.service": "worker"}
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "ReadWritePaths": str(STATE),
    "StateDirectory": "triaged",
    "ConfigurationDirectory": "triaged",
    "User": "triaged",
    "Restart": "on-failure",
    "RestartPreventExitStatus": str(EXIT_USER_ERROR),
}


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit_is_hardened_and_runs_the_command(name: str, site: Settings) -> None:
    unit = parse_unit(DEPLOY / "systemd" / name)
    assert set(unit) == {"Unit", "Service", "Install"}
    for key, expected in HARDENING.items():
        assert one(unit, key) == expected, key
    assert "@system-service" in values(unit, "SystemCallFilter")
    assert re.fullmatch(r"\d+[KMG]", one(unit, "MemoryMax"))
    assert re.fullmatch(r"\d+s", one(unit, "RestartSec"))
    assert (
        "AmbientCapabilities" not in dict(unit["Service"]) or one(unit, "AmbientCapabilities") == ""
    )
    argv = shlex.split(one(unit, "ExecStart"))
    assert argv[0].endswith("/bin/triaged")
    assert argv[1:] == [UNITS[name], "--config", str(ETC / "config.toml")]
    # what the sandbox lets the daemon write is where the site config puts its state
    for path in (site.storage.spool_dir, site.storage.results_dir, site.models.store):
        assert PurePosixPath(path).is_relative_to(STATE), path
    assert site.dicom.port >= 1024 and site.web.port >= 1024  # no capability needed
    sysusers = (DEPLOY / "systemd" / "triaged.sysusers.conf").read_text()
    assert re.search(rf"^u triaged - .* {STATE} ", sysusers, re.M)


def test_systemd_analyze_verifies_the_units_and_rates_them_safe(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing (apt-get install systemd)"
    triaged = Path(sys.executable).with_name("triaged")
    assert triaged.is_file()
    paths = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={triaged}", text, flags=re.M)
        (tmp_path / name).write_text(text)
        paths.append(f"./{name}")  # a path, not a unit name: verify offline
    verify = subprocess.run(
        ["systemd-analyze", "verify", *paths],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        # --threshold is on the internal 0-100 scale; the report shows 0.0-10.0
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", *paths],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    levels = re.findall(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert len(levels) == 2 and all(float(v) <= 2.0 for v in levels), security.stdout


# -- the package the image installs ----------------------------------------------------------
def test_non_editable_install_carries_migrations_templates_and_static_files(
    tmp_path: Path,
) -> None:
    """The image runs ``pip install .``: the wheel must hold what alembic and the web need."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "triaged", src / "triaged",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("triaged-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    repo_files = {
        p.relative_to(REPO).as_posix()
        for sub in ("worklist/migrations", "web/templates", "web/static")
        for p in (REPO / "triaged" / sub).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert repo_files and repo_files <= names, sorted(repo_files - names)
    assert not any(n.startswith("tests/") for n in names)


# -- the guide ---------------------------------------------------------------------------------
def test_the_guide_mentions_every_deployment_file() -> None:
    guide = (REPO / "docs" / "deploy.md").read_text()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        rel = path.relative_to(REPO).as_posix()
        assert rel in guide, f"docs/deploy.md does not mention {rel}"
    for command in ("triaged db upgrade", "triaged models rollback", "triaged worker"):
        assert command in guide
