"""The report's generation view, from hand-made results dicts: escaping, the chart, missing fields."""

from __future__ import annotations

import copy

from evalsuite.report import generation as gen_report
from evalsuite.report.render import render_report

HOSTILE = "<script>alert(1)</script>"


def _results() -> dict:
    stats = {"gen_prompts": 4, "gen_identical": 0.5, "gen_first_div_median": 7.5, "gen_first_div_p10": 2.3,
             "gen_near_tie_share": 0.5, "gen_in_ref_topk": 1.0, "gen_ref_logprob_delta": -0.12,
             "gen_nonfinite_prompts": 0}
    floor = {**stats, "gen_identical": 1.0, "gen_first_div_median": 16.0, "gen_near_tie_share": None}
    example = {"index": 2, "origin": "line 3", "prompt": f"问{HOSTILE}", "first_divergence": 2, "margin": 0.031,
               "in_ref_topk": True, "nonfinite": False, "common": "共同<b>", "reference_rest": "参考&后", "test_rest": "测试</td>",
               "reference_top": [{"token": " ", "logprob": -0.7}, {"token": "<i>", "logprob": -0.73}]}
    return {"schema_version": 1, "reference": "fp32", "model": {"source": "m"}, "corpus": {}, "config": {},
            "provenance": {}, "noise_floor": {},
            "dtypes": {"fp32": {"name": "fp32", "role": "reference", "status": "ok", "metrics": {"noise_gen_identical": 1.0}},
                       "bf16": {"name": "bf16", "role": "test", "status": "ok",
                                "metrics": {**stats, "gen_tokens_per_s": 12.5, "gen_within_noise": False,
                                            "noise_gen_identical": 1.0}}},
            "generation": {"reference": "fp32", "dtypes": ["bf16"], "stats": {"bf16": stats, "noise": floor},
                           "settings": {"prompts": 4, "tokens": 16, "top_k": 5, "near_tie_nats": 0.1,
                                        "sources": {"file": 4}},
                           "survival": {"bf16": [1.0] * 3 + [0.75] * 8 + [0.5] * 6, "noise": [1.0] * 17},
                           "examples": {"bf16": [example]}, "records_file": "generations.jsonl", "failed": {}}}


def test_view_escapes_every_string_and_highlights_the_divergence():
    html = render_report(_results())
    gen = html[html.index('<section id="generation">'):]
    gen = gen[: gen.index("</section>")]
    assert "<script>" not in html and "问&lt;script&gt;alert(1)&lt;/script&gt;" in gen
    assert "共同&lt;b&gt;<mark>参考&amp;后</mark>" in gen and "共同&lt;b&gt;<mark>测试&lt;/td&gt;</mark>" in gen
    assert "␣ -0.7 · &lt;i&gt; -0.73" in gen  # the reference's top tokens there, whitespace made visible
    assert "50 %" in gen and "100 %" in gen and "7.5" in gen and "margin 0.031 nats" in gen
    assert 'href="#generation"' in html and "stroke-dasharray" in gen  # the floor's curve is dashed
    assert "<code>generation</code>" not in html  # not dumped raw under "other sections"
    more = html[html.index("<h3>More metrics</h3>"):] if "<h3>More metrics</h3>" in html else ""
    assert "gen_identical" not in more.split("</table>")[0]  # shown by the view, not listed again


def test_within_the_floor_is_said():
    r = _results()
    r["dtypes"]["bf16"]["metrics"]["gen_within_noise"] = True
    assert "within the floor" in render_report(r)


def test_missing_fields_show_as_dashes():
    r = copy.deepcopy(_results())
    r["generation"] = {"dtypes": ["bf16"], "stats": {"bf16": {}}, "examples": {"bf16": [{}]}, "survival": {"bf16": "x"}}
    c = gen_report.context(r)
    assert c["rows"][0]["identical"]["value"] == "-" and c["chart"] is None and c["floor"] is None
    render_report(r)  # renders
    assert gen_report.context({"generation": "nonsense"}) == {}
    del r["generation"]
    html = render_report(r)
    assert 'id="generation"' not in html and 'href="#generation"' not in html


def test_failed_generation_is_shown():
    r = _results()
    r["generation"]["failed"] = {"fp16": f"out of memory {HOSTILE}"}
    html = render_report(r)
    assert "fp16: generation failed (out of memory &lt;script&gt;" in html
