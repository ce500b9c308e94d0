"""Every check triocomm's CI runs, as nox sessions.

``python3 -m nox`` runs the default list below (what CI runs); ``nox -l`` lists
every session, ``nox -s NAME`` runs one, and anything after ``--`` is handed to
the tool the session drives (``nox -s tests-3.12 -- -k pool -x``).

Tool versions are pinned here so a new release of a linter or type checker
cannot turn CI red overnight; bump them on purpose. The library's own
dependencies are not pinned: the ``tests`` sessions take the newest trio, and
``tests_oldest_trio`` holds the floor that ``pyproject.toml`` promises.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

import nox

# 2025.10.14 added `download_python`.
nox.needs_version = ">=2025.10.14"

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# The oldest trio runs on the oldest Python.
OLDEST_PYTHON = PYTHONS[0]
# Sessions that need one interpreter use this one.
TOOLS_PYTHON = "3.12"
# Must match the floor in pyproject.toml's `dependencies`.
OLDEST_TRIO = "trio==0.25.0"
# The floor of the `dns` extra. Newer dnspythons refuse trio 0.25 for their trio
# backend (2.8 wants trio >= 0.30), so the oldest trio runs with the oldest one.
OLDEST_DNSPYTHON = "dnspython==2.6.1"

RUFF = "ruff==0.17.5"
MYPY = "mypy==2.4.1"
# Sphinx, MyST and Furo: pinned in docs/requirements.txt, which Read the Docs reads too.
DOCS_REQUIREMENTS = "docs/requirements.txt"
PACKAGING = ("build==1.6.1", "twine==7.0.0")
# trio-typing's mypy plugin builds TypeVarType with a plain int id, which
# mypy 1.11 and later reject (they crash inside the plugin), so the
# compatibility check runs on the last mypy release the plugin works with.
TRIO_TYPING = ("trio-typing[mypy]==0.10.0", "mypy==1.10.1")

# Python files only: ruff would also reformat the code blocks in docs/*.md.
LINT_PATHS = [
    "src",
    "tests",
    "examples",
    "benchmarks",
    "typing_compat",
    "docs/conf.py",
    "docs/_ext",
    "noxfile.py",
]
RELIABILITY_DIR = "tests/reliability"

ON_CI = bool(os.environ.get("CI"))
HERE = Path(__file__).resolve().parent

# trio-typing installs a `trio-stubs` package that mypy prefers over the hints
# trio ships inline, so its presence would silently change what `typecheck` checks.
NO_TRIO_TYPING = """
import importlib.metadata, sys
try:
    importlib.metadata.distribution("trio-typing")
except importlib.metadata.PackageNotFoundError:
    sys.exit(0)
sys.exit("trio-typing is installed: its stale trio-stubs would shadow trio's own hints")
"""

nox.options.sessions = [
    "lint",
    "typecheck",
    "docs",
    "package",
    "typing_compat",
    "reliability",
    "tests_oldest_trio",
    "tests",
]
# On CI every supported Python must be there; elsewhere the missing ones are
# named once (below) and left out, and the rest still run.
nox.options.error_on_missing_interpreters = ON_CI
# Use the pyenv interpreters that are there; never fetch one from the network.
nox.options.download_python = "never"
# Locally a second run skips the venv creation; CI always starts clean.
nox.options.reuse_venv = "no" if ON_CI else "yes"
nox.options.default_venv_backend = "virtualenv"


class _QuietUvProbe(logging.Filter):
    """Drop nox's note that uv is missing: this file uses virtualenv, not uv."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "uv binary not found."


logging.getLogger("nox").addFilter(_QuietUvProbe())


def _pyenv_interpreters() -> dict[str, Path]:
    """The newest interpreter pyenv has installed for each Python 3.X, by "3.X".

    pyenv's shims run only the versions it has been told to activate
    (PYENV_VERSION, .python-version, ``pyenv global``), so a fresh shell finds
    one of them at most. Its installs are plain folders under
    ``$(pyenv root)/versions`` though, and any of them runs when called by path.
    """
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    newest: dict[str, tuple[int, Path]] = {}
    for folder in (root / "versions").glob("3.*"):
        # Plain releases only ("3.12.1"); not "3.13-dev", "3.12.1t" or virtualenvs.
        match = re.fullmatch(r"(3\.\d+)\.(\d+)", folder.name)
        if match is None:
            continue
        minor, patch = match[1], int(match[2])
        python = folder / "bin" / f"python{minor}"
        runnable = python.is_file() and os.access(python, os.X_OK)
        if runnable and (minor not in newest or patch > newest[minor][0]):
            newest[minor] = (patch, python)
    return {minor: python for minor, (_, python) in newest.items()}


def _on_path(minor: str) -> bool:
    found = shutil.which(f"python{minor}")
    # A pyenv shim is on PATH for every version pyenv has, active or not.
    return found is not None and Path(found).parent.name != "shims"


def _find_interpreters(wanted: list[str]) -> list[str]:
    """Make pyenv's interpreters visible to nox; return the versions not found.

    nox looks for ``python3.X`` on PATH, so each pyenv interpreter gets a
    link of that name in a folder put first on PATH (for this process and
    the sessions it runs; nothing outside the checkout is changed).
    """
    pyenv = _pyenv_interpreters()
    links = HERE / ".nox" / ".interpreters"
    missing, linked = [], {}
    for minor in wanted:
        if _on_path(minor):
            continue
        if minor in pyenv:
            linked[f"python{minor}"] = pyenv[minor]
        else:
            missing.append(minor)
    if links.is_dir():
        for old in links.iterdir():  # left by an earlier run on another set of Pythons
            if old.name not in linked and not old.name.startswith("."):
                old.unlink()
    for name, target in linked.items():
        link = links / name
        if link.is_symlink() and link.readlink() == target:
            continue
        # Made beside it, then renamed over it, so that a second nox running at
        # the same time never sees the link missing.
        links.mkdir(parents=True, exist_ok=True)
        fresh = links / f".{name}.{os.getpid()}"
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(target)
        fresh.replace(link)
    if linked:
        os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"
    return missing


_MISSING = _find_interpreters(PYTHONS)
if _MISSING and not ON_CI:
    # One line, then run what can run; under CI=true nox fails the sessions.
    print(
        f"nox: Python {', '.join(_MISSING)} not found (neither on PATH nor in pyenv);"
        " their sessions are skipped",
        file=sys.stderr,
    )
    # A session of one interpreter that is missing is skipped by nox itself.
    PYTHONS = [minor for minor in PYTHONS if minor not in _MISSING]
    if not PYTHONS:
        nox.options.sessions.remove("tests")


# What a source release must carry besides the package: the docs, tests and
# examples (a user builds the docs or runs the tests from the sdist alone).
SDIST_HAS_EXTRAS = """
import sys, tarfile
names = tarfile.open(sys.argv[1]).getnames()
root = names[0].split("/")[0]
wanted = ["docs/index.md", "docs/conf.py", "tests/conftest.py", "examples/echo.py", "noxfile.py"]
missing = [name for name in wanted if f"{root}/{name}" not in names]
sys.exit(f"the sdist lacks {missing}" if missing else 0)
"""


def _readme_quick_start() -> str:
    """The README's quick start: the first Python code block after its heading."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    after = readme.split("## Quick start", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


# No .pytest_cache in the work tree, and no state carried between runs.
PYTEST = ("pytest", "-p", "no:cacheprovider")


def _existing(paths: list[str]) -> list[str]:
    # A fresh clone has no empty folders, and ruff refuses a path that is missing.
    return [path for path in paths if Path(path).exists()]


def _pytest_args(posargs: list[str]) -> list[str]:
    # The reliability suite has its own session; the unit sessions skip it
    # unless the command line asks for it by name.
    if any("reliability" in arg for arg in posargs):
        return posargs
    return [f"--ignore={RELIABILITY_DIR}", *posargs]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite with the newest trio, on every supported Python."""
    session.install(".[test,examples,dns,prometheus]")
    session.run(*PYTEST, *_pytest_args(session.posargs))


@nox.session(python=OLDEST_PYTHON)
def tests_oldest_trio(session: nox.Session) -> None:
    """The test suite with the oldest trio that pyproject.toml allows."""
    session.install(".[test,examples,dns,prometheus]", OLDEST_TRIO, OLDEST_DNSPYTHON)
    session.run("python", "-c", "import trio; print('trio', trio.__version__)")
    session.run(*PYTEST, *_pytest_args(session.posargs))


@nox.session(python=TOOLS_PYTHON)
def reliability(session: nox.Session) -> None:
    """The fault-injection suite under tests/reliability (resets, stalls, garbage, churn)."""
    session.install(".[test,examples,dns,prometheus]")
    session.run(*PYTEST, RELIABILITY_DIR, *session.posargs)


@nox.session(python=TOOLS_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff's lint rules and formatting check."""
    session.install(RUFF)
    paths = _existing(LINT_PATHS)
    session.run("ruff", "check", *session.posargs, *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session(python=TOOLS_PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src/ and examples/, against trio's own inline type hints.

    The examples are what users copy, so they must type-check as users' code
    would: strictly, against the public API only.
    """
    # dnspython: DnsResolver's imports are type-checked too.
    session.install(".[examples,dns,prometheus]", MYPY)
    session.run("python", "-c", NO_TRIO_TYPING)
    session.run("mypy", "--strict", *session.posargs, "src")
    session.run("mypy", "--strict", *session.posargs, "examples")


@nox.session(python=TOOLS_PYTHON)
def typing_compat(session: nox.Session) -> None:
    """A user program that still carries trio-typing type-checks against triocomm."""
    session.install(".", *TRIO_TYPING)
    # Run from the program's folder, as its owner would: mypy then reads the
    # mypy.ini there (which enables trio_typing.plugin) and not ours.
    session.chdir("typing_compat")
    session.run("mypy", *session.posargs, "user_program.py")


@nox.session(python=TOOLS_PYTHON)
def docs(session: nox.Session) -> None:
    """The Sphinx site, with every warning treated as an error.

    The diagrams are drawn by Graphviz's ``dot`` at build time (Debian:
    ``apt-get install graphviz``).
    """
    if shutil.which("dot") is None:
        session.error("the diagrams need Graphviz's dot: apt-get install graphviz")
    session.install(".[prometheus]", "-r", DOCS_REQUIREMENTS)
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "html", *session.posargs,
        "docs", "docs/_build/html",
    )  # fmt: skip


@nox.session(python=TOOLS_PYTHON)
def package(session: nox.Session) -> None:
    """Build the sdist and the wheel, check them, and use the wheel as a user would.

    The wheel goes into a venv of its own, and the CLI and the README's quick
    start run from a folder outside the checkout, so nothing is imported from
    the source tree.
    """
    dist = Path(session.create_tmp()).resolve() / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.install(*PACKAGING)
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        session.error(f"expected one sdist and one wheel in {dist}, found {sdists + wheels}")
    session.run("twine", "check", "--strict", str(sdists[0]), str(wheels[0]))
    session.run("python", "-c", SDIST_HAS_EXTRAS, str(sdists[0]))

    user = Path(session.create_tmp()).resolve() / "user"
    shutil.rmtree(user, ignore_errors=True)
    user.mkdir(parents=True)
    session.run("python", "-m", "venv", str(user / "venv"))
    bin_dir = user / "venv" / ("Scripts" if sys.platform == "win32" else "bin")
    pip = (str(bin_dir / "python"), "-m", "pip")
    session.run(*pip, "install", "-q", str(wheels[0]), external=True)
    quick_start = user / "quick_start.py"
    quick_start.write_text(_readme_quick_start(), encoding="utf-8")
    with session.chdir(user):
        where = session.run(
            str(bin_dir / "python"), "-c", "import triocomm; print(triocomm.__file__)",
            external=True, silent=True,
        )  # fmt: skip
        if where is None or not where.startswith(str(user / "venv")):
            session.error(f"triocomm was imported from {where!r}, not from the wheel")
        session.run(str(bin_dir / "triocomm"), "bench", "--requests", "200", external=True)
        out = session.run(str(bin_dir / "python"), quick_start.name, external=True, silent=True)
        if out is None or "b'hello'" not in out:
            session.error(f"the README's quick start printed {out!r}, not b'hello'")


@nox.session(python=TOOLS_PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks (benchmarks/run.py), with uvloop for the asyncio baselines."""
    session.install(".[examples,prometheus]", "uvloop")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python=TOOLS_PYTHON, default=False)
def soak(session: nox.Session) -> None:
    """The long-running soak test; pass its options after `--`."""
    session.install(".[test,examples,prometheus]")
    session.run("python", "-m", "tests.reliability.soak", *session.posargs)
