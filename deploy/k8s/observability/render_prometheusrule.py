"""Writes prometheusrule.yaml (the Prometheus Operator's PrometheusRule) from the plain rule
file rules/ragline.rules.yml, which promtool checks and unit-tests: the rules live in one
place. Run after editing the rule file (tests/test_observability.py fails until then):

    .venv/bin/python deploy/k8s/observability/render_prometheusrule.py          # write
    .venv/bin/python deploy/k8s/observability/render_prometheusrule.py --check  # compare
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules" / "ragline.rules.yml"
OUT = HERE / "prometheusrule.yaml"

HEADER = (
    "# Generated from rules/ragline.rules.yml by render_prometheusrule.py: edit the rule\n"
    "# file, not this one. `release` is the label kube-prometheus-stack's Prometheus selects\n"
    "# rules by (its Helm release name; docs/observing.md).\n"
)


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rule: dict[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "ragline",
            "labels": {"release": "kube-prometheus-stack"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100)


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
