"""``ray-cml top``'s arithmetic on real exposition text: rates over a timeline of scrapes, latency
percentiles from histogram buckets (as Prometheus' histogram_quantile), per deployment and
per model. The figures against a live cluster and the vLLM twin are in test_llm_e2e.py."""

from __future__ import annotations

import math

import pytest

from ray_cml_provider.figures import (
    Scrape,
    Timeline,
    TopReport,
    model_figures,
    node_use,
    quantile,
    serve_figures,
)
from ray_cml_provider.ops.top import render


def serve_text(requests: float, errors: float, buckets: dict[str, float], healthy=(1, 1)) -> str:
    lines = [
        "# HELP ray_serve_deployment_request_counter_total The number of queries.",
        "# TYPE ray_serve_deployment_request_counter_total counter",
    ]
    for replica in ("r1", "r2"):
        labels = f'application="app",deployment="D",replica="{replica}",route="/v1"'
        lines.append(f"ray_serve_deployment_request_counter_total{{{labels}}} {requests / 2}")
    lines += [
        "# TYPE ray_serve_deployment_error_counter_total counter",
        f'ray_serve_deployment_error_counter_total{{application="app",deployment="D"}} {errors}',
        "# TYPE ray_serve_deployment_processing_latency_ms histogram",
    ]
    for le, count in buckets.items():
        lines.append(
            f'ray_serve_deployment_processing_latency_ms_bucket{{application="app",'
            f'deployment="D",le="{le}"}} {count}'
        )
    where = 'application="app",deployment="D"'
    lines.append(f"ray_serve_deployment_processing_latency_ms_count{{{where}}} {buckets['+Inf']}")
    lines.append(f"ray_serve_deployment_processing_latency_ms_sum{{{where}}} {requests}")
    lines += [
        "# TYPE ray_serve_deployment_replica_healthy gauge",
        *(
            f'ray_serve_deployment_replica_healthy{{application="app",deployment="D",'
            f'replica="r{i}"}} {h}'
            for i, h in enumerate(healthy)
        ),
        "# TYPE ray_node_cpu_utilization gauge",
        'ray_node_cpu_utilization{ray_cml_node="aaaa0001"} 42.0',
    ]
    return "\n".join(lines) + "\n"


def test_serve_rates_and_percentiles_over_the_window():
    first = Scrape.parse(serve_text(100, 1, {"10": 10, "100": 20, "+Inf": 20}), at=1000.0)
    # 200 requests in 10 s: 150 under 10 ms, 50 between 10 and 100 ms; 4 errors.
    second = Scrape.parse(
        serve_text(300, 5, {"10": 160, "100": 220, "+Inf": 220}, healthy=(1, 0)), at=1010.0
    )
    [figures] = serve_figures(Timeline([first, second]))
    assert (figures.application, figures.deployment) == ("app", "D")
    assert figures.requests_per_s == pytest.approx(20.0)
    assert figures.errors_per_s == pytest.approx(0.4)
    assert figures.latency_p50_ms == pytest.approx(10 * (100 / 150))  # inside the first bucket
    assert figures.latency_p95_ms == pytest.approx(10 + 90 * ((190 - 150) / 50))
    assert (figures.replicas_healthy, figures.replicas_unhealthy) == (1, 1)
    assert node_use(second) == {"aaaa0001": (42.0, None)}


def test_a_counter_that_restarted_counts_from_its_restart_and_nothing_is_nothing():
    first = Scrape.parse(serve_text(1000, 0, {"+Inf": 0}), at=0.0)
    second = Scrape.parse(serve_text(40, 0, {"+Inf": 0}), at=10.0)  # a replica restarted
    [figures] = serve_figures(Timeline([first, second]))
    assert figures.requests_per_s == pytest.approx(4.0)
    assert figures.latency_p50_ms is None  # no observation in the window


def test_quantile_follows_prometheus():
    assert quantile(0.5, {1.0: 0, 2.0: 10, math.inf: 10}) == pytest.approx(1.5)
    assert quantile(0.99, {1.0: 5, math.inf: 10}) == 1.0  # in the open bucket: its lower edge
    assert quantile(0.5, {}) is None


VLLM = """# TYPE ray_vllm_time_to_first_token_seconds histogram
ray_vllm_time_to_first_token_seconds_bucket{{model_name="m",le="0.1"}} {fast}
ray_vllm_time_to_first_token_seconds_bucket{{model_name="m",le="1.0"}} {all}
ray_vllm_time_to_first_token_seconds_bucket{{model_name="m",le="+Inf"}} {all}
ray_vllm_time_to_first_token_seconds_sum{{model_name="m"}} {ttft_sum}
ray_vllm_time_to_first_token_seconds_count{{model_name="m"}} {all}
# TYPE ray_vllm_generation_tokens counter
ray_vllm_generation_tokens_total{{model_name="m"}} {generated}
# TYPE ray_vllm_prompt_tokens counter
ray_vllm_prompt_tokens_total{{model_name="m"}} {prompt}
# TYPE ray_vllm_num_requests_running gauge
ray_vllm_num_requests_running{{model_name="m"}} 2
# TYPE ray_vllm_num_requests_waiting gauge
ray_vllm_num_requests_waiting{{model_name="m"}} 1
# TYPE ray_vllm_kv_cache_usage_perc gauge
ray_vllm_kv_cache_usage_perc{{model_name="m"}} 0.25
"""


def test_model_figures_from_vllms_series():
    first = Scrape.parse(VLLM.format(fast=0, all=0, ttft_sum=0, generated=0, prompt=0), at=0.0)
    second = Scrape.parse(
        VLLM.format(fast=10, all=10, ttft_sum=0.7, generated=640, prompt=120), at=20.0
    )
    [model] = model_figures(Timeline([first, second]))
    assert model.model == "m"
    assert model.ttft_p50_s == pytest.approx(0.05)
    assert model.ttft_mean_s == pytest.approx(0.07)
    assert model.generated_tokens_per_s == pytest.approx(32.0)
    assert model.prompt_tokens_per_s == pytest.approx(6.0)
    assert (model.requests_running, model.requests_waiting, model.kv_cache_use) == (2, 1, 0.25)
    report = TopReport("c", 20.0, models=[model], decisions=["10:00:00 Adding 1 node(s)"])
    shown = render(report)
    assert "MODELS" in shown and "0.050 s" in shown and "25%" in shown and "Adding" in shown


GATEWAY = """# TYPE ray_cml_gateway_requests counter
ray_cml_gateway_requests_total{{route="v1",status="200"}} {ok}
ray_cml_gateway_requests_total{{route="v1",status="401"}} {refused}
ray_cml_gateway_requests_total{{route="dashboard",status="200"}} 99
# TYPE ray_cml_gateway_first_byte_seconds histogram
ray_cml_gateway_first_byte_seconds_bucket{{route="v1",streamed="true",le="0.1"}} {fast}
ray_cml_gateway_first_byte_seconds_bucket{{route="v1",streamed="true",le="+Inf"}} {ok}
ray_cml_gateway_first_byte_seconds_sum{{route="v1",streamed="true"}} {seconds}
ray_cml_gateway_first_byte_seconds_count{{route="v1",streamed="true"}} {ok}
"""


def test_what_callers_see_at_the_heads_door():
    from ray_cml_provider.figures import door_figures

    first = Scrape.parse(GATEWAY.format(ok=0, refused=0, fast=0, seconds=0), at=0.0)
    second = Scrape.parse(GATEWAY.format(ok=20, refused=5, fast=20, seconds=1.2), at=10.0)
    door = door_figures(Timeline([first, second]))
    assert door.requests_per_s == pytest.approx(2.5) and door.refused_per_s == pytest.approx(0.5)
    assert door.first_token_mean_s == pytest.approx(0.06)
    assert door.first_token_p50_s == pytest.approx(0.05)
    old_head = Timeline([Scrape.parse("", at=0.0), Scrape.parse("", at=10.0)])
    assert door_figures(old_head) is None  # a head from before the gateway counted


def test_a_counter_refreshed_in_steps_is_measured_between_its_own_moves():
    """Ray refreshes an export every 10 s: scraped every second, a counter growing 10 a
    second steps by 100 at 3 s, 13 s and 23 s. Between its first and last step it grew 200
    in 20 s: 10 a second, wherever the window began (first to last scrape: 200 in 25 s)."""
    text = "# TYPE ray_serve_deployment_request_counter_total counter\n" + (
        'ray_serve_deployment_request_counter_total{{application="a",deployment="D"}} {}\n'
    )
    values = [0 if t < 3 else 100 if t < 13 else 200 if t < 23 else 300 for t in range(26)]
    timeline = Timeline([Scrape.parse(text.format(v), at=float(t)) for t, v in enumerate(values)])
    [figures] = serve_figures(timeline)
    assert figures.requests_per_s == pytest.approx(10.0)
