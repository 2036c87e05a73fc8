"""The Dockerfile against the repository: no Docker engine runs here, so check what it refers to.

Every path it copies exists (and is not dropped by ``.dockerignore``), its entry point is the project's
console script, the flags of its default command are accepted by the real ``retrieval serve``, the
health check asks for a route the app has, the runtime stage runs as a non-root user, and the torch
pins agree with ``pyproject.toml``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # 0-based index of the FROM stage it belongs to (-1 before the first FROM)

    def exec_form(self) -> list[str]:
        """The JSON-array (exec) form of the arguments; fails the test for the shell form."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (enough for this file's syntax)."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if not full:
            continue
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    assert DOCKERFILE.is_file(), "the design card lists a top-level Dockerfile"
    return parse_dockerfile(DOCKERFILE.read_text())


def _all(instructions: list[Instruction], keyword: str, stage: int | None = None) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword and (stage is None or i.stage == stage)]


def _one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = _all(instructions, keyword)
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def _stages(instructions: list[Instruction]) -> list[str]:
    """Stage names (``FROM image AS name``), in order."""
    names = []
    for i in _all(instructions, "FROM"):
        match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", i.args, re.IGNORECASE)
        assert match, i
        names.append(match.group(2) or "")
    return names


def _global_args(instructions: list[Instruction]) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in _all(instructions, "ARG", stage=-1) if "=" in i.args)


def test_multi_stage_slim_python_base(instructions):
    stages = _stages(instructions)
    assert len(stages) >= 2 and stages[0] == "builder", stages
    assert _global_args(instructions)["PYTHON_IMAGE"] == "python:3.11-slim"
    assert all(i.args.split()[0] == "${PYTHON_IMAGE}" for i in _all(instructions, "FROM"))
    runtime = len(stages) - 1
    copies_from = [i for i in _all(instructions, "COPY", stage=runtime) if i.args.startswith("--from=")]
    assert copies_from and all(i.args.split()[0] == "--from=builder" for i in copies_from)


def test_every_copied_path_exists_and_reaches_the_build_context(instructions):
    ignore = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    sources = []
    for copy in _all(instructions, "COPY"):
        parts = shlex.split(copy.args)
        if any(p.startswith("--from=") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        sources += parts[:-1]
    assert {"pyproject.toml", "README.md", "LICENSE", "serving", "retrieval"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        dropped = [p for p in ignore if fnmatch.fnmatch(source, p) or fnmatch.fnmatch(source, p.rstrip("/") + "/*")]
        assert not dropped, f"COPY {source} is excluded from the build context by .dockerignore {dropped}"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(sources), f"packages the install needs but the image lacks: {packages - set(sources)}"


def test_dockerignore_keeps_local_state_out():
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", "runs", ".git"} <= patterns


def test_cpu_torch_wheels_within_the_project_pins(instructions):
    builder = [i.args for i in _all(instructions, "RUN", stage=0)]
    torch_install = next(run for run in builder if "torch" in run and "--index-url" in run)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_install
    arg = next(i.args for i in _all(instructions, "ARG", stage=0) if i.args.startswith("TORCH_INDEX_URL="))
    assert arg == "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
    pinned = dict(re.findall(r'"(torchvision|torch)([<>=!~][^"]*)"', torch_install))
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)(.*)", d.replace(" ", "")).groups() for d in dependencies)
    assert pinned == {"torch": declared["torch"], "torchvision": declared["torchvision"]}


def test_runs_as_a_non_root_user_with_the_data_volumes(instructions):
    runtime = len(_stages(instructions)) - 1
    users = _all(instructions, "USER", stage=runtime)
    assert users, "the runtime stage sets no USER, so the server would run as root"
    assert users[-1].args.split(":")[0] not in ("root", "0")
    volumes = _one(instructions, "VOLUME").exec_form()
    assert volumes == ["/data/index", "/data/models"]


def test_entrypoint_is_the_console_script_and_cmd_flags_exist(instructions):
    entrypoint = _one(instructions, "ENTRYPOINT").exec_form()
    cmd = _one(instructions, "CMD").exec_form()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] in scripts and entrypoint == ["retrieval", "serve"]
    flags = [arg for arg in cmd if arg.startswith("--")]
    assert flags == ["--index", "--host", "--port"]
    options = dict(zip(cmd[::2], cmd[1::2], strict=True))
    assert options["--index"] in _one(instructions, "VOLUME").exec_form()
    assert options["--host"] == "0.0.0.0"  # reachable through the published port
    assert _one(instructions, "EXPOSE").args == options["--port"]

    # The real CLI, as the image's console script would run it.
    script = Path(sys.executable).with_name(entrypoint[0])
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "retrieval.cli.main"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run(
        [*command, *entrypoint[1:], "--help"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    accepted = set(re.findall(r"--[a-z][a-z0-9-]*", result.stdout))
    assert set(flags) <= accepted, f"retrieval serve does not accept {set(flags) - accepted}"


def test_healthcheck_asks_a_route_of_the_app(instructions, tmp_path):
    from serving.app import create_app
    from serving.settings import ServeSettings

    check = _one(instructions, "HEALTHCHECK")
    assert "CMD" in check.args and "--interval=" in check.args and "--start-period=" in check.args
    command = json.loads(check.args[check.args.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")  # valid Python, with the standard library only
    assert "urllib.request" in command[2]
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", command[2])
    assert url, command[2]
    cmd = _one(instructions, "CMD").exec_form()
    assert url.group(1) == cmd[cmd.index("--port") + 1]
    paths = create_app(ServeSettings(index=tmp_path)).openapi()["paths"]  # builds the app, loads nothing
    assert url.group(2) == "/v1/healthz" and "get" in paths[url.group(2)]


def test_docker_docs_show_build_run_and_the_gpu_variant():
    text = (ROOT / "docs" / "docker.md").read_text()
    assert "docker build" in text and "docker run" in text
    assert "TORCH_INDEX_URL" in text and "EXTRAS=gpu" in text and "--gpus" in text
