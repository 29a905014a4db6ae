"""The Python version the package declares is one it runs on, and README and Makefile say the same."""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NEWER_STDLIB = {"tomllib": (3, 11)}
"""Standard-library modules the code may import and the Python that first ships them."""


def _declared() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert m, f"requires-python {spec!r} is not of the form >=3.N"
    return 3, int(m.group(1))


def test_requires_python_covers_the_stdlib_the_code_imports():
    declared = _declared()
    for fpath in sorted(p for pkg in ("saev_store", "trainers", "tools") for p in (ROOT / pkg).rglob("*.py")):
        text = fpath.read_text()
        for module, since in NEWER_STDLIB.items():
            if re.search(rf"^\s*(import {module}\b|from {module}\b)", text, re.M):
                assert declared >= since, f"{fpath.relative_to(ROOT)} imports {module} (Python {since[0]}.{since[1]}+) " \
                                          f"but pyproject declares >={declared[0]}.{declared[1]}"


def test_readme_and_makefile_state_the_declared_python():
    want = "Python {}.{}+".format(*_declared())
    for name in ("README.md", "Makefile"):
        found = set(re.findall(r"Python 3\.\d+\+", (ROOT / name).read_text()))
        assert found == {want}, f"{name} says {sorted(found)}, pyproject declares {want}"
