"""What the pipeline and the gateway share: the answer format (:mod:`distill_common.think`), the
task definition (:mod:`distill_common.task`) and YAML config loading
(:mod:`distill_common.yamlfile`).

Only pydantic and pyyaml besides the standard library, so the gateway image ships this package
and ``gateway/`` alone.
"""
