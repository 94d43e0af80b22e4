"""The installed layout (issue 30): the four product folders install as one namespace, ``atdiff.runtime`` ->
runtime/, ``atdiff.train`` -> train/, ... (pyproject.toml's package-dir). From the checkout's root a bare ``runtime``
would still import (the root is on sys.path), as a second copy of every module beside ``atdiff.runtime``'s: so no
code names the bare packages, and the package list names every package folder (or a wheel would miss it)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "train", "export", "eval")
# a bare package name after `from` or `import` (also later in an import list), in code, in docstrings and in
# strings (code run by `python -c`); not a path (`from train/...`) or a file name (`import export.md`)
_NAMES = "|".join(PACKAGES)
BARE = re.compile(rf"(?<![\w.])(?:from\s+(?:{_NAMES})\b|import\s+(?:[\w.]+\s*,\s*)*(?:{_NAMES})\b)(?![/-]|\.md)")


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_installed_under_atdiff():
    config = setuptools_config()
    assert config["package-dir"] == {f"atdiff.{name}": name for name in PACKAGES}
    folders = {".".join(("atdiff", *init.parent.relative_to(ROOT).parts))
               for name in PACKAGES for init in (ROOT / name).rglob("__init__.py")}
    assert folders == set(config["packages"])


def test_the_classifier_weights_are_package_data():
    data = setuptools_config()["package-data"]["atdiff.eval"]
    assert {path.name for path in (ROOT / "eval/assets").iterdir()} <= {
        path.name for pattern in data for path in (ROOT / "eval").glob(pattern)}


def test_no_code_imports_the_bare_package_names():
    sources = [path for path in ROOT.rglob("*.py") if not {".venv", ".git"} & set(path.relative_to(ROOT).parts)]
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in sources for number, line in enumerate(path.read_text().splitlines(), 1)
             if BARE.search(line)]
    assert not found, "import these as atdiff.<package>:\n" + "\n".join(found)
    assert len(sources) > 100   # the walk found the code


def test_the_installed_runtime_and_server_import_without_torch_from_outside_the_checkout(tmp_path):
    # from another folder only the installed atdiff.* can be found (not the checkout's bare names)
    code = ("import sys, atdiff.runtime, atdiff.runtime.serve, atdiff.runtime.serve.app\n"
            "assert atdiff.runtime.__name__ == 'atdiff.runtime' and 'runtime' not in sys.modules\n"
            "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules))\n"
            "assert not heavy, heavy")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=120)


def test_a_missing_package_names_the_extra_of_the_commands_own_package():
    # the group is read from the command's module, atdiff.<package>....
    from atdiff.runtime.errors import missing_package

    def command():
        pass
    for module, extra in (("atdiff.train.adm.adm_cli", "train"), ("atdiff.eval.cli", "eval"),
                          ("atdiff.runtime.cli_generate", "torch"), ("toolkit", "torch")):
        command.__module__ = module
        error = missing_package(ModuleNotFoundError("No module named 'torch'", name="torch"), command)
        assert f"at-diffusion-toolkit[{extra}]" in str(error), module
