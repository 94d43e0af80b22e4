"""The README's two set-up commands, CI and the locks cannot drift apart (issue 26): CI runs the README's commands
as printed, both installs go through the committed locks, and the locks cover what pyproject.toml asks for."""
from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    spec = importlib.util.spec_from_file_location("readme_command", ROOT / ".ci" / "readme_command.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_commands(ROOT / "README.md")


def _lock(name: str) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "requirements" / name).read_text(), re.MULTILINE)
    return {_normal(pkg): version for pkg, version in pins}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(extras: list[str]) -> set[str]:
    """Direct requirements of the core and ``extras`` (self-references expanded), as normalised names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names, todo, seen = set(), list(extras), set()
    names.update(_normal(re.split(r"[<>=!\[; ]", r)[0]) for r in project["dependencies"])
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            name = re.split(r"[<>=!\[; ]", req)[0]
            if _normal(name) == _normal(project["name"]):
                todo += re.search(r"\[(.*)\]", req).group(1).split(",")
            else:
                names.add(_normal(name))
    return names


def test_readme_has_the_two_commands_installing_through_the_lock():
    install, tests = _readme_commands()
    assert "pip install -c requirements/lock-dev.txt -e '.[dev]'" in install
    assert install.endswith('toolkit generate "astronaut in a jungle" --steps 4')
    assert tests == ". .venv/bin/activate && python -m pytest -q"


def test_ci_runs_the_readme_commands_it_reads_and_serves_through_the_serving_lock():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 .ci/readme_command.py \"$n\"" in ci and "for n in 1 2" in ci
    assert "pip install" not in ci.split("for n in 1 2")[0], "CI must install only through the README's command"
    readme = (ROOT / "README.md").read_text()
    serving = re.search(r"Serving only[^`]*`pip install ([^`&]*?) &&", readme).group(1).strip()
    assert serving == "-c requirements/lock-serve.txt -e '.[onnxruntime,serve]'"
    assert f"pip install --quiet {serving}" in (ROOT / ".ci" / "serve-slim").read_text()


def test_locks_pin_every_requirement_and_agree_with_pyproject_pins():
    dev, serve = _lock("lock-dev.txt"), _lock("lock-serve.txt")
    missing_dev = _requirement_names(["dev"]) - dev.keys()
    missing_serve = _requirement_names(["onnxruntime", "serve"]) - serve.keys()
    assert not missing_dev and not missing_serve, f"locks are stale (bash requirements/refresh.sh): {missing_dev or missing_serve}"
    assert "torch" not in serve, "the serving-only install must stay torch-free"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["optional-dependencies"]["torch"]:
        if "==" in req:
            name, version = req.split("==")
            assert dev[_normal(name)] == version, f"lock-dev.txt pins {name} {dev[_normal(name)]}, pyproject {version}"
    shared = dev.keys() & serve.keys()
    assert {p: (dev[p], serve[p]) for p in shared if dev[p] != serve[p]} == {}, "the two locks disagree on a version"
