"""The files a CI system reads from gate outcomes: JUnit XML and a Markdown job summary.

JUnit is the one report format every CI system renders (GitHub, GitLab, Jenkins, Azure): one
test case per (dtype, gate), a failed gate a <failure>, a skipped dtype a <skipped>; value and
bound are in the message so the CI page says what failed without opening results.json.
ElementTree does the escaping. The Markdown is what `$GITHUB_STEP_SUMMARY` shows on a job page.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from evalsuite.gates.rules import counts, notes, passed, show, shown, verdict_line
from evalsuite.report.table import fmt


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
