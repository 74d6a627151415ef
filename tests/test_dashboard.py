"""deploy/grafana/loraplex.json queries only what a running server exports: every metric name in its
panels' and variables' PromQL is a sample name on /metrics once the server has served some traffic."""
from __future__ import annotations

import json
import re

from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "loraplex.json"
METRIC = re.compile(r"\b((?:loraplex|process)_[a-z0-9_]+)\b")


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_metric_the_dashboard_queries_is_exported(fp32_server):
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = {name for expr in queries(dashboard) for name in METRIC.findall(expr)}
    for topic in ("requests and tokens per adapter", "time_to_first_token", "inter_token", "queue_wait",
                  "kv_blocks", "adapter_memory", "adapter_loads", "adapter_evictions", "rejected"):
        key = {"requests and tokens per adapter": "completion_tokens"}.get(topic, topic)
        assert any(key in name for name in wanted), f"the dashboard shows no {topic}"

    # traffic that makes every labelled series appear: an adapter upload and request, a refusal
    assert fp32_server.upload("dashboard-pirate", REPO / "examples" / "pirate-adapter").status_code == 201
    fp32_server.complete("dashboard-pirate", "The capital of Peru is", max_tokens=4, ignore_eos=True)
    assert fp32_server.client.post("/v1/completions", json={"model": "no-such-adapter", "prompt": "hi",
                                                             "max_tokens": 2}).status_code == 404
    exported = {sample.name for family in text_string_to_metric_families(fp32_server.client.get("/metrics").text)
                for sample in family.samples}
    assert not wanted - exported, f"queried but not exported: {sorted(wanted - exported)}"
