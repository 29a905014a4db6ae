"""ARCHITECTURE.md's rules that code can break: the dependency direction, nothing imports a CLI module,
one flag name per thing across the three CLIs, and one way of reporting a UserError."""

import ast
import pathlib

import pytest
from click.testing import CliRunner

import tools.cli
import trainers.cli
from saev_store import cli as store_cli
from saev_store.options import commands

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI_MODULES = {"saev_store.cli", "trainers.cli", "tools.cli"}
MAY_IMPORT = {"saev_store": {"saev_store"}, "trainers": {"saev_store", "trainers"}, "tools": {"saev_store", "trainers", "tools"}}


def _imports(fpath: pathlib.Path, package: str) -> set[str]:
    """Absolute names of the project modules a file imports (relative imports resolved)."""
    mod = ".".join(fpath.relative_to(ROOT).with_suffix("").parts)
    parts = mod.split(".")
    out = set()
    for node in ast.walk(ast.parse(fpath.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = parts[: len(parts) - node.level] if not fpath.name == "__init__.py" else parts[: len(parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in MAY_IMPORT}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_dependency_direction_and_no_cli_imports(package):
    for fpath in sorted((ROOT / package).rglob("*.py")):
        names = _imports(fpath, package)
        wrong = sorted(m for m in names if m.split(".")[0] not in MAY_IMPORT[package])
        assert not wrong, f"{fpath.relative_to(ROOT)} imports {wrong}: {package} may only use {sorted(MAY_IMPORT[package])}"
        mod = ".".join(fpath.relative_to(ROOT).with_suffix("").parts)
        clis = sorted(m for m in names if m in CLI_MODULES and m != mod)
        assert not clis, f"{fpath.relative_to(ROOT)} imports the CLI module(s) {clis}; CLI modules are imported by nobody"


ALL = {**commands(store_cli.main, "saev-store"), **commands(trainers.cli.main, "saev-train"), **commands(tools.cli.main, "saev-tools")}


def test_one_flag_name_for_one_thing():
    spellings: dict[str, set[str]] = {}
    for cmd in ALL.values():
        for p in cmd.params:
            if getattr(p, "hidden", False) or not hasattr(p, "opts") or p.param_type_name == "argument":
                continue
            spellings.setdefault(p.name, set()).add(max(p.opts, key=len))
    assert {k: v for k, v in spellings.items() if len(v) > 1} == {}
    assert spellings["n_readers"] == {"--n-readers"}


def test_the_old_readers_spelling_still_works(tmp_path):
    r = CliRunner().invoke(tools.cli.main, ["topk", str(tmp_path / "none"), "--readers", "2"])
    assert r.exit_code == 2 and "no such option" not in r.output.lower() and "--n-readers" in r.output


@pytest.mark.parametrize("main,args", [
    (store_cli.main, ["info", "/nonexistent/s.zarr"]),
    (store_cli.main, ["record", "--out", "/nonexistent/s.zarr", "--chunk-mib", "16", "--images-per-chunk", "2"]),
    (trainers.cli.main, ["/nonexistent/s.zarr", "--hook", "h"]),
    (tools.cli.main, ["topk", "/nonexistent/run"]),
])
def test_the_three_clis_report_a_user_error_alike(main, args):
    r = CliRunner().invoke(main, args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and lines[-1].startswith("error: ") and "Traceback" not in r.output, r.output
