"""Graceful drain in the chart: preStop sleeps while endpoints update, the servers' own
timeouts, and terminationGracePeriodSeconds derived from both (values.yaml `drain`)."""
from __future__ import annotations

import pytest

from mosmedai_operator.config import OperatorConfig
from tests.charts.test_chart import CHART, NAMESPACE, helm, load_all


def render(*sets: str) -> list[dict]:
    args = [a for s in sets for a in ("--set", s)]
    return load_all(helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, *args).stdout)


def deployment(docs: list[dict], component: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == "Deployment"
                and d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    return found


def operator_env(docs: list[dict]) -> dict[str, str]:
    (container,) = deployment(docs, "operator")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize(("sets", "gateway_grace", "triton"), [
    ((), 30, ("5", "30", "40")),
    (("drain.endpointPropagationSeconds=10", "drain.gateway.shutdownSeconds=60", "drain.triton.exitTimeoutSeconds=120",
      "drain.killMarginSeconds=2"), 72, ("10", "120", "132")),
    (("drain.endpointPropagationSeconds=0",), 25, ("0", "30", "35")),
])
def test_grace_periods_are_derived_from_the_drain_values(sets, gateway_grace, triton, monkeypatch) -> None:
    docs = render(*sets)
    pod = deployment(docs, "gateway")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == gateway_grace
    propagation = int(triton[0])
    (container,) = pod["containers"]
    if propagation:
        assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": propagation}}}
    else:
        assert "lifecycle" not in container
    env = operator_env(docs)
    assert (env["MOSMEDAI_OPERATOR_TRITON_PRE_STOP_SECONDS"], env["MOSMEDAI_OPERATOR_TRITON_EXIT_TIMEOUT_SECONDS"],
            env["MOSMEDAI_OPERATOR_TRITON_TERMINATION_GRACE_PERIOD_SECONDS"]) == triton
    # The operator accepts what the chart gives it (its own check: grace > preStop + exit).
    for key, value in env.items():
        if key.startswith("MOSMEDAI_OPERATOR_TRITON_"):
            monkeypatch.setenv(key, value)
    config = OperatorConfig()
    assert config.triton_termination_grace_period_seconds > config.triton_pre_stop_seconds + config.triton_exit_timeout_seconds


@pytest.mark.parametrize(("value", "named"), [
    ("drain.killMarginSeconds=0", "killMarginSeconds"),
    ("drain.triton.terminationGracePeriodSeconds=20", "terminationGracePeriodSeconds"),
    ("drain.gateway.terminationGracePeriodSeconds=10", "terminationGracePeriodSeconds"),
    ("drain.endpointPropagationSeconds=-1", "endpointPropagationSeconds"),
    ("drain.triton.exitTimeoutSeconds=0", "exitTimeoutSeconds"),
])
def test_the_schema_refuses_values_that_contradict_the_drain(value: str, named: str) -> None:
    """A grace period cannot be set apart from the timeouts it must cover, nor a margin that
    would let the kubelet kill a server inside its own timeout."""
    result = helm("template", "mosmedai", str(CHART), "-n", NAMESPACE, "--set", value, check=False)
    assert result.returncode != 0
    assert named in result.stderr and "schema" in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("sets", [(), ("drain.gateway.shutdownSeconds=45",)])
def test_the_gateway_drains_within_the_chart_value(sets) -> None:
    """The code's drain (Ray Serve's graceful_shutdown_timeout_s of the gateway and router
    replicas) is the value the pod's grace period was derived from; in plain mode the
    replica waits after SIGTERM only for what is in flight (preStop did the propagation)."""
    from mosmedai.config import Settings
    from mosmedai.ingress.app import build_app

    docs = render(*sets)
    values = {"drain.gateway.shutdownSeconds": 20, **{k: int(v) for k, v in (s.split("=") for s in sets)}}
    shutdown = values["drain.gateway.shutdownSeconds"]
    (container,) = deployment(docs, "gateway")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert env["MOSMEDAI_GATEWAY_SHUTDOWN_S"] == str(shutdown)
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < shutdown
    app = build_app(Settings(gateway_shutdown_s=env["MOSMEDAI_GATEWAY_SHUTDOWN_S"]))
    gateway = app._bound_deployment
    router = gateway._replica_config.init_args[0]._bound_deployment
    for bound in (gateway, router):
        assert bound._deployment_config.graceful_shutdown_timeout_s == shutdown
    kuberay = render("ray.kuberay.enabled=true", *sets)
    (service,) = [d for d in kuberay if d["kind"] == "RayService"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in head["env"]}["MOSMEDAI_GATEWAY_SHUTDOWN_S"] == str(shutdown)
