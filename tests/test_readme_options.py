"""README's option tables are the CLIs' options: one table per command, marked `<!-- options: NAME -->`,
whose option cells (flag, choices) and default cells equal what the click commands (made from the config
dataclasses, saev_store/options.py) say; and every option comes from a config field but the few listed
here. The meaning column is README's own words. When this fails it prints the table the code implies."""

import pathlib
import re

import pytest

import tools.cli
import trainers.cli
from saev_store import cli as store_cli
from saev_store.add_labels import AddLabelsConfig
from saev_store.bench import BenchConfig
from saev_store.options import commands, markdown_table, specs, table_rows
from saev_store.record import RecordConfig
from tools.config import RenderConfig, ReportConfig, TopkConfig
from tools.heads.config import HeadConfig
from trainers.config import TrainConfig
from trainers.sweep import axes

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = {**commands(store_cli.main, "saev-store"), **commands(trainers.cli.main, "saev-train"),
            **commands(tools.cli.main, "saev-tools")}
CONFIGS = (RecordConfig, AddLabelsConfig, BenchConfig, TrainConfig, TopkConfig, RenderConfig, ReportConfig, HeadConfig)
CLI_ONLY = {("saev-store info", "as_json"), ("saev-store verify", "quiet"), ("saev-store hooks", "show_all"),
            ("saev-train", "sweep_fpath"), ("saev-train", "resume")}
"""Options that are not a config field: what to print, where the SAEs come from, whether to resume."""


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def readme_tables() -> dict[str, list[list[str]]]:
    tables, lines = {}, README.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- options: (.+) -->", line.strip())
        if not m:
            continue
        rows = []
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                break
            rows.append(_cells(row))
        assert rows[0][:2] == ["option", "default"], f"table {m.group(1)}: header must start with | option | default |"
        tables[m.group(1)] = rows[2:]
    return tables


def _visible(cmd):
    return table_rows(cmd)


@pytest.mark.parametrize("name", sorted(n for n, c in COMMANDS.items() if _visible(c)))
def test_readme_table_is_the_commands_options(name):
    tables = readme_tables()
    want = markdown_table(COMMANDS[name])
    assert name in tables, f"README has no option table for `{name}`; add\n<!-- options: {name} -->\n{want}"
    got = [(r[0], r[1]) for r in tables[name]]
    expected = [(cell, default) for cell, default, _ in table_rows(COMMANDS[name])]
    assert sorted(got) == sorted(expected) and len(got) == len(set(got)), (
        f"README's table for `{name}` differs from the code; the code's (meaning column from --help):\n{want}")
    assert all(r[2] for r in tables[name]), f"`{name}`: every row needs a meaning"


def test_every_readme_table_names_a_command():
    assert set(readme_tables()) <= set(COMMANDS)


def test_options_come_from_config_fields():
    fields = {s.name for cls in CONFIGS for s in specs(cls)} | set(axes())
    for name, cmd in COMMANDS.items():
        for p in cmd.params:
            if p.name in ("help", "version") or getattr(p, "hidden", False) or not hasattr(p, "opts") or p.param_type_name == "argument":
                continue
            assert p.name in fields or (name, p.name) in CLI_ONLY, f"`{name}` option {p.opts} is declared outside a config"


def test_the_flags_are_the_fields():
    """Spot checks of the derivation: default, choices and help of a flag are its field's."""
    opts = {p.name: p for p in COMMANDS["saev-train"].params}
    assert opts["batch_size"].default == TrainConfig.batch_size and opts["buffer_mb"].default == TrainConfig.buffer_mb
    assert list(opts["schedule"].type.choices) == ["constant", "cosine"]
    assert "Linear learning-rate warmup" in opts["warmup_steps"].help
    rec = {p.name: p for p in COMMANDS["saev-store record"].params}
    assert list(rec["tokens"].type.choices) == ["all", "patches", "cls"] and rec["hooks"].multiple
    topk = {p.name: p for p in COMMANDS["saev-tools topk"].params}
    assert "--n-readers" in topk["n_readers"].opts and topk["n_readers"].default == TopkConfig.n_readers
