"""compose/prometheus/alerts.example.yml: valid rules, and the agreement alert fires when and only
when it should (``promtool test rules`` over synthetic shadow counters)."""

from __future__ import annotations

import subprocess

import yaml

from tests.conftest import ROOT
from tests.test_prometheus import promtool

RULES = ROOT / "compose" / "prometheus" / "alerts.example.yml"


def _series(model: str, per_minute: dict[str, float]) -> list[dict]:
    return [
        {
            "series": f'gateway_shadow_total{{model="{model}",outcome="{outcome}"}}',
            "values": f"0+{rate}x180",
        }
        for outcome, rate in per_minute.items()
    ]


def test_promtool_accepts_the_rules():
    proc = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_agreement_alert_fires_only_for_a_drifted_student(tmp_path):
    series = (
        # 95 % agreement: fine
        _series("good", {"agree": 19, "disagree": 1, "teacher_error": 5})
        # 60 % agreement (student_invalid counts as a miss): alert
        + _series(
            "drifted", {"agree": 6, "disagree": 3, "student_invalid": 1, "teacher_invalid": 9}
        )
        # 0 % but only 6 answers an hour: too few to alert on
        + _series("quiet", {"agree": 0, "disagree": 0.1})
    )
    alert = "StudentTeacherAgreementLow"
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": alert, "exp_alerts": []},  # `for` not met
                    {
                        "eval_time": "120m",
                        "alertname": alert,
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "model": "drifted"},
                                "exp_annotations": {
                                    "summary": "Student drifted agrees with the teacher on 60% "
                                    "of shadowed requests (1 h)",
                                    "description": yaml.safe_load(RULES.read_text())["groups"][0][
                                        "rules"
                                    ][0]["annotations"]["description"],
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "shadow_test.yml"
    path.write_text(yaml.safe_dump(tests, allow_unicode=True))
    proc = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_rule_test_can_fail(tmp_path):
    """The check above can fail: expecting no alert for the drifted student is refused."""
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": _series("drifted", {"agree": 6, "disagree": 4}),
                "alert_rule_test": [
                    {
                        "eval_time": "120m",
                        "alertname": "StudentTeacherAgreementLow",
                        "exp_alerts": [],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "shadow_test.yml"
    path.write_text(yaml.safe_dump(tests))
    proc = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0
