"""Write the task YAMLs of this folder (run from anywhere: `python tasks/_generate_configs.py`).

The offline CMMLU and C-Eval variants copy each subject's description from lm-eval's own
`cmmlu` and `ceval-valid` YAMLs (installed with lm-eval), so their prompts stay identical; the
shared prompt format lives in `_cmmlu_local_yaml` and `_ceval_local_yaml`, which sit beside
`csv_loaders.py` because lm-eval resolves `!function` relative to the YAML that names it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ZH_MC_SUBJECTS = {"common_sense": "常识", "geography": "地理", "math": "数学", "chinese": "语文",
                  "science": "科学", "history": "历史"}
AGGREGATE = [{"aggregation": "mean", "metric": "acc", "weight_by_size": True},
             {"aggregation": "mean", "metric": "acc_norm", "weight_by_size": True}]


class _Dumper(yaml.SafeDumper):
    """Strings with newlines as one double-quoted line ("...\\n\\n"), as lm-eval writes them."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))


def _dump(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(data, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=1000)
    path.write_text(text, encoding="utf-8")


def _upstream(folder: str, prefix: str) -> dict[str, str]:
    """subject -> description, from lm-eval's own per-subject YAMLs."""
    import lm_eval

    out = {}
    for path in sorted((Path(lm_eval.__file__).parent / "tasks" / folder).glob(f"{prefix}_*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        out[cfg["dataset_name"]] = cfg["description"]
    return out


def _family(group: str, folder: str, template: str, subjects: dict[str, str], version: float) -> None:
    for old in (HERE / folder).glob(f"{group}_*.yaml"):
        old.unlink()
    for subject, description in subjects.items():
        _dump(HERE / folder / f"{group}_{subject}.yaml",
              {"include": f"../{template}", "task": f"{group}_{subject}", "dataset_kwargs": {"subject": subject},
               "description": description})
    _dump(HERE / folder / f"_{group}.yaml",
          {"group": group, "task": [f"{group}_{s}" for s in subjects], "aggregate_metric_list": AGGREGATE,
           "metadata": {"version": version}})


def main() -> None:
    _family("cmmlu_local", "cmmlu_local", "_cmmlu_local_yaml", _upstream("cmmlu", "cmmlu"), 1.0)
    _family("ceval-valid_local", "ceval_local", "_ceval_local_yaml", _upstream("ceval", "ceval-valid"), 2.0)
    _family("zh_mc", "zh_mc", "_zh_mc_yaml",
            {s: f"以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n" for s, zh in ZH_MC_SUBJECTS.items()}, 1.0)


if __name__ == "__main__":
    main()
