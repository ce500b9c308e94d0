"""The code that the README and the tutorial show is the code that runs.

* examples/echo.py is the README's quick start, line for line (apart from
  the ``if __name__ == "__main__":`` guard that lets tests import it), and
  the tutorial's last step shows it too;
* examples/echo_server.py is the tutorial's ``echo_server.py`` (step 3);
* every Python block of docs/tutorial.md compiles;
* echo.py runs and prints the echoed reply.
"""

from __future__ import annotations

import re

import pytest

from conftest import EXAMPLES, REPO

GUARD = 'if __name__ == "__main__":\n    trio.run(main)\n'


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def example_program(name: str = "echo.py") -> str:
    """An example file without its module docstring."""
    source = (EXAMPLES / name).read_text()
    match = re.match(r'"""(.*?)"""\n\n', source, flags=re.DOTALL)
    assert match, f"{name} starts with a module docstring"
    return source[match.end() :]


def echo_program() -> str:
    return example_program("echo.py")


def test_echo_example_is_the_readme_quick_start() -> None:
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    block = python_blocks(quick_start)[0]
    # The README may run main() unguarded; the file guards it.
    assert block.replace("\ntrio.run(main)\n", "\n" + GUARD) == echo_program()


def test_the_tutorial_ends_with_the_echo_example() -> None:
    blocks = python_blocks((REPO / "docs" / "tutorial.md").read_text())
    assert echo_program() in blocks


def test_the_tutorial_serves_with_the_echo_server_example() -> None:
    blocks = python_blocks((REPO / "docs" / "tutorial.md").read_text())
    assert example_program("echo_server.py") in blocks


@pytest.mark.parametrize(
    "page", ["tutorial.md", "example-redis-client.md"], ids=lambda page: page.removesuffix(".md")
)
def test_every_python_block_compiles(page: str) -> None:
    blocks = python_blocks((REPO / "docs" / page).read_text())
    assert blocks
    for number, block in enumerate(blocks, 1):
        compile(block, f"{page}, block {number}", "exec")


async def test_echo_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import echo

    await echo.main()
    assert capsys.readouterr().out == "b'hello'\n"
