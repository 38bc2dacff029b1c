"""Graceful drain of the Triton pods the operator makes: preStop sleep while the endpoint
removal propagates, then SIGTERM and Triton's own exit timeout, all inside the pod's
terminationGracePeriodSeconds (which the kubelet counts from the start of preStop)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from mosmedai_operator.children import deployment
from mosmedai_operator.spec import GpuPoolSpec
from mosmedai_operator.testing import gpupool as _gpupool


def gpupool(name: str, namespace: str) -> dict:
    body = _gpupool(name, namespace)
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"  # the API server sets it
    return body


def test_triton_pods_drain_within_their_grace_period(make_config) -> None:
    body = gpupool("ru-mow", "mosmedai")
    config = make_config(triton_pre_stop_seconds=7, triton_exit_timeout_seconds=45,
                         triton_termination_grace_period_seconds=60)
    pod = deployment(body, GpuPoolSpec.model_validate(body["spec"]), config, 1)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": 7}}}
    assert "--exit-timeout-secs=45" in container["args"]
    assert pod["terminationGracePeriodSeconds"] == 60


def test_no_prestop_when_its_sleep_is_zero(make_config) -> None:
    body = gpupool("ru-mow", "mosmedai")
    config = make_config(triton_pre_stop_seconds=0, triton_exit_timeout_seconds=30,
                         triton_termination_grace_period_seconds=31)
    (container,) = deployment(body, GpuPoolSpec.model_validate(body["spec"]), config, 1)["spec"]["template"]["spec"]["containers"]
    assert container["lifecycle"] is None  # None: absent from the merge patch


@pytest.mark.parametrize(("pre_stop", "exit_timeout", "grace"), [(5, 30, 35), (5, 30, 20), (0, 60, 60)])
def test_a_grace_period_that_cuts_the_drain_short_is_refused(make_config, pre_stop, exit_timeout, grace) -> None:
    with pytest.raises(ValidationError, match="triton_termination_grace_period_seconds"):
        make_config(triton_pre_stop_seconds=pre_stop, triton_exit_timeout_seconds=exit_timeout,
                    triton_termination_grace_period_seconds=grace)


def test_triton_pods_run_the_rate_limiter_the_model_configs_name(make_config) -> None:
    from mosmedai.serving.model_repo import RATE_LIMIT_RESOURCE

    body = gpupool("ru-mow", "mosmedai")
    config = make_config(triton_execution_slots=6)
    pod = deployment(body, GpuPoolSpec.model_validate(body["spec"]), config, 1)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--rate-limit=execution_count" in container["args"]
    assert f"--rate-limit-resource={RATE_LIMIT_RESOURCE}:6" in container["args"]
