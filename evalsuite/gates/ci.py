"""What a user and a CI system read from gate outcomes: the terminal table, JUnit XML, a Markdown summary.

Imports point one way: this module reads `rules`' outcomes; `rules` never imports it (the CLI
calls `report` here after `rules.evaluate`).

JUnit is the one report format every CI system renders (GitHub, GitLab, Jenkins, Azure): one
test case per (dtype, gate), a failed gate a <failure>, a skipped dtype a <skipped>; value and
bound are in the message so the CI page says what failed without opening results.json.
ElementTree does the escaping. The Markdown is what `$GITHUB_STEP_SUMMARY` shows on a job page.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from evalsuite.errors import UsageError
from evalsuite.fmt import fmt
from evalsuite.gates.gatefile import GateSet
from evalsuite.gates.measurable import missing
from evalsuite.gates.rules import Outcome, counts, passed
from evalsuite.store.results import Scalar


def show(v: Scalar) -> str:
    if missing(v):
        return "NaN"
    return f'"{v}"' if isinstance(v, str) else fmt(v, 6)


def shown(o: Outcome) -> tuple[str, str]:
    """Value and bound as table cells; a skipped dtype has neither."""
    return ("-", "-") if o.status == "skipped" else (show(o.value), show(o.bound))


def verdict_line(gs: GateSet, outcomes: tuple[Outcome, ...]) -> str:
    c = counts(outcomes)
    head = "PASSED" if passed(outcomes) else "FAILED"
    tail = "; nothing was checked" if not c["pass"] and not c["fail"] else ""
    return f"gates {head}: {c['pass']} passed, {c['fail']} failed, {c['skipped']} skipped ({gs.source}){tail}"


def notes(outcomes: tuple[Outcome, ...]) -> list[str]:
    """Each distinct detail once (a failed dtype's message would otherwise repeat per gate)."""
    return list(dict.fromkeys(o.detail for o in outcomes if o.detail))


def format_table(gs: GateSet, outcomes: tuple[Outcome, ...]) -> str:
    """The table `evalsuite gate` prints: one row per (dtype, gate), the notes, then the verdict."""
    rows = [["dtype", "gate", "value", "bound", "result"]]
    rows += [[o.dtype, o.gate.text, *shown(o), {"pass": "pass", "fail": "FAIL"}.get(o.status, "skip")] for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + notes(outcomes) + [verdict_line(gs, outcomes)])


def junit_xml(gs, outcomes) -> str:
    c = counts(outcomes)
    totals = {"tests": str(len(outcomes)), "failures": str(c["fail"]), "errors": "0", "skipped": str(c["skipped"])}
    root = ET.Element("testsuites", name="evalsuite", **totals)
    suite = ET.SubElement(root, "testsuite", name=f"evalsuite gates ({gs.source})", time="0", **totals)
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", classname=f"evalsuite.gates.{o.dtype}", name=o.gate.text, time="0")
        said = f"{o.dtype} {o.gate.metric} = {show(o.value)}, needs {o.gate.op} {show(o.bound)}"
        if o.gate.baseline is not None:
            said += f" ({o.gate.rhs})"
        if o.status == "fail":
            failure = ET.SubElement(case, "failure", type="GateFailed", message=o.detail or said)
            failure.text = f"{said}\n{o.detail}".strip()
        elif o.status == "skipped":
            ET.SubElement(case, "skipped", message=o.detail)
        else:
            ET.SubElement(case, "system-out").text = f"{said}\n{o.detail}".strip()
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def summary_markdown(gs, outcomes, results) -> str:
    """A Markdown summary fit for $GITHUB_STEP_SUMMARY: verdict first, then every gate."""
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    icon = {"pass": "✅ pass", "fail": "❌ **FAIL**", "skipped": "⏭ skipped"}
    lines = [f"### {'✅' if passed(outcomes) else '❌'} evalsuite {verdict_line(gs, outcomes)}", "",
             f"Model `{cell(results.model.get('source'))}`, {fmt(results.corpus.get('n_tokens'))} tokens, "
             f"reference {results.reference}" + (f", baseline `{gs.baseline_source}`" if gs.baseline_source else ""),
             "", "| result | dtype | gate | value | bound |", "|---|---|---|---|---|"]
    lines += [f"| {icon[o.status]} | {o.dtype} | `{cell(o.gate.text)}` | {cell(shown(o)[0])} | {cell(shown(o)[1])} |"
              for o in outcomes]
    lines += ([""] + [f"- {cell(n)}" for n in notes(outcomes)]) if notes(outcomes) else []
    return "\n".join(lines) + "\n"


def write_text(path: str | Path, text: str, flag: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {flag} {path} ({exc.strerror}); pass a writable path") from None


def report(gs, outcomes, results, junit: str | Path | None = None, summary_md: str | Path | None = None) -> None:
    """Print the gate table; write the JUnit and Markdown files that were asked for."""
    print(format_table(gs, outcomes))
    if junit:
        write_text(junit, junit_xml(gs, outcomes), "--junit")
    if summary_md:
        write_text(summary_md, summary_markdown(gs, outcomes, results), "--summary-md")
