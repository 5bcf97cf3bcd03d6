"""Render the results of one run as Markdown tables (plus the raw JSON)."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DIRECT = "direct"


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    digits: int = 0
    ratio: bool = False  # add a "x direct" column after this one
    overhead: bool = False  # add a "vs direct" difference column after this one


def format_number(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        nonzero = {kind: count for kind, count in value.items() if count}
        return ", ".join(f"{kind} {count}" for kind, count in nonzero.items()) or "0"
    if isinstance(value, list):
        return "; ".join(format_number(item, digits) for item in value)[:200] or "none"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def ratio_text(value: Any, direct: Any) -> str:
    if not isinstance(value, (int, float)) or not isinstance(direct, (int, float)) or not direct:
        return "—"
    return f"{value / direct:.2f}x"


def overhead_text(value: Any, direct: Any) -> str:
    if not isinstance(value, (int, float)) or not isinstance(direct, (int, float)):
        return "—"
    return f"{value - direct:+,.0f}"


def result_cells(columns: list[Column], result: dict, references: list[dict]) -> list[str]:
    """The row's cells; `references` are the baseline rows, first one first."""
    cells = []
    for column in columns:
        value = result.get(column.key)
        cells.append(format_number(value, column.digits))
        if column.ratio:
            cells += [ratio_text(value, ref.get(column.key)) for ref in references]
        if column.overhead:
            cells.append(overhead_text(value, references[0].get(column.key)))
    return cells


def scenario_table(
    columns: list[Column],
    by_variant: dict[str, dict[str, dict]],
    variant_header: str | None,
    baselines: tuple[str, ...] = (DIRECT,),
) -> list[str]:
    headers = ([variant_header] if variant_header else []) + ["system"]
    for column in columns:
        headers.append(column.header)
        if column.ratio:
            headers += [f"x {name}" for name in baselines]
        if column.overhead:
            headers.append(f"vs {baselines[0]}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for variant, systems in by_variant.items():
        references = [systems.get(name, {}) for name in baselines]
        for system, result in systems.items():
            cells = ([variant] if variant_header else []) + [system]
            if "failed" in result:
                cells.append(f"failed: {result['failed']}"[:160])
                cells += [""] * (len(headers) - len(cells))
            else:
                cells += result_cells(columns, result, references)
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    if not by_variant or not any(by_variant.values()):
        lines.append("| " + " | ".join(["(no systems ran)"] + [""] * (len(headers) - 1)) + " |")
    return lines


def render_markdown(run: dict, scenarios: list[dict]) -> str:
    """`scenarios` describe the tables: key, title, description, columns,
    variant_header; the numbers come from run["scenarios"][key]."""
    lines = [f"# Eyewall benchmark — {run['date']}{' (quick)' if run['quick'] else ''}", ""]
    lines += ["## Machine", ""]
    lines += [f"- {name}: {value}" for name, value in run["machine"].items()]
    lines += ["", "## Versions", ""]
    lines += [f"- {name}: {value}" for name, value in run["versions"].items()]
    lines += ["", "## Layout and settings", ""]
    lines += [f"- {line}" for line in run["layout"]]
    lines.append(f"- settings: `{json.dumps(run['settings'])}`")
    for scenario in scenarios:
        data = run["scenarios"].get(scenario["key"])
        if data is None:
            continue
        lines += ["", f"## {scenario['title']}", "", scenario["description"], ""]
        lines += scenario_table(
            scenario["columns"],
            data["results"],
            scenario["variant_header"],
            scenario.get("baselines", (DIRECT,)),
        )
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in run["notes"]] or ["- none"]
    lines += ["", "## Commands", ""]
    for name, command in run["commands"].items():
        lines += [f"- {name}: `{command}`"]
    lines += ["", "## Configs", ""]
    for name, text in run["configs"].items():
        lines += [f"### {name}", "", "```", text.rstrip() or "(empty)", "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _anonymise(text: str, paths: dict[str, str]) -> str:
    """Results are committed: name paths relative to the repository, not this machine.

    `paths` maps machine paths (the run's temp dir, tools outside the repo) to
    what the results show instead; the longest are replaced first.
    """
    repo = str(Path(__file__).resolve().parent.parent)
    replacements = {**paths, str(Path(sys.executable)): "python", repo + "/": "", repo: "."}
    replacements.setdefault(str(Path.home()), "~")
    for path in sorted(replacements, key=len, reverse=True):
        if len(path) > 1:
            text = text.replace(path, replacements[path])
    return re.sub(r"/tmp/[A-Za-z0-9_.-]+", "$TMPDIR", text)


def write_results(
    directory: Path, stem: str, run: dict, scenarios: list[dict], paths: dict[str, str]
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    markdown_path = directory / f"{stem}.md"
    json_path = directory / f"{stem}.json"
    markdown_path.write_text(_anonymise(render_markdown(run, scenarios), paths))
    raw = json.dumps(run, indent=2, sort_keys=False, default=str) + "\n"
    json_path.write_text(_anonymise(raw, paths))
    return markdown_path, json_path
