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

import os
from pathlib import Path

import nox

# 2025.10.14 added `download_python`.
nox.needs_version = ">=2025.10.14"

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# Sessions that need one interpreter use this one.
TOOLS_PYTHON = "3.12"
# Must match the floor in pyproject.toml's `dependencies`.
OLDEST_TRIO = "trio==0.25.0"

RUFF = "ruff==0.17.5"
MYPY = "mypy==2.4.1"
SPHINX = ("sphinx==9.1.1", "myst-parser==5.2.0")
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
    "typing_compat",
    "reliability",
    "tests_oldest_trio",
    "tests",
]
nox.options.error_on_missing_interpreters = True
# Use the pyenv interpreters that are there; never fetch one from the network.
nox.options.download_python = "never"
# Locally a second run skips the venv creation; CI always starts clean.
nox.options.reuse_venv = "no" if ON_CI else "yes"
nox.options.default_venv_backend = "virtualenv"

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
    session.install(".[test,examples]")
    session.run(*PYTEST, *_pytest_args(session.posargs))


@nox.session(python=PYTHONS[0])
def tests_oldest_trio(session: nox.Session) -> None:
    """The test suite with the oldest trio that pyproject.toml allows."""
    session.install(".[test,examples]", OLDEST_TRIO)
    session.run("python", "-c", "import trio; print('trio', trio.__version__)")
    session.run(*PYTEST, *_pytest_args(session.posargs))


@nox.session(python=TOOLS_PYTHON)
def reliability(session: nox.Session) -> None:
    """Fault-injection suite under tests/reliability (passes while it is empty)."""
    if not Path(RELIABILITY_DIR).is_dir():
        session.skip(f"{RELIABILITY_DIR} does not exist yet")
    session.install(".[test,examples]")
    # Exit status 5 is pytest's "no tests collected": allowed here only, so the
    # session can sit in the default list before the suite has any tests.
    session.run(*PYTEST, RELIABILITY_DIR, *session.posargs, success_codes=[0, 5])


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
    session.install(".[examples]", MYPY)
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
    """The Sphinx site, with every warning treated as an error."""
    session.install(".", *SPHINX)
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "html", *session.posargs,
        "docs", "docs/_build/html",
    )  # fmt: skip


@nox.session(python=TOOLS_PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks (benchmarks/run.py), with uvloop for the asyncio baselines."""
    session.install(".[examples]", "uvloop")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python=TOOLS_PYTHON, default=False)
def soak(session: nox.Session) -> None:
    """The long-running soak test; pass its options after `--`."""
    session.install(".[test,examples]")
    session.run("python", "-m", "tests.reliability.soak", *session.posargs)
