"""Configuration: bad values stop start-up with a message that names the field."""

import socket

import pytest
from pydantic import ValidationError

from mosmedai.local import processes as local
from mosmedai.config import Settings


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("router_max_batch_size", 0, "router_max_batch_size"),
        ("router_batch_wait_ms", -1, "router_batch_wait_ms"),
        ("gateway_http_port", 70000, "gateway_http_port"),
        ("enabled_tools", ["cxr_opacity", "ct_brain_bleed"], "ct_brain_bleed"),
        ("enabled_tools", [], "at least one tool"),
    ],
)
def test_bad_settings_name_the_field(field, value, words):
    with pytest.raises(ValidationError) as caught:
        Settings(**{field: value})
    assert words in str(caught.value)


def test_bad_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("MOSMEDAI_TRITON_TIMEOUT_S", "soon")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "triton_timeout_s" in str(caught.value)


def test_clashing_ports_are_refused():
    with pytest.raises(ValidationError, match="ports must be distinct"):
        Settings(gateway_http_port=8100)


def test_settings_survive_the_trip_through_the_environment(monkeypatch):
    settings = Settings(enabled_tools=["cxr_nodule"], router_batch_wait_ms=7.5, gateway_http_port=8123)
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == settings


def test_up_refuses_a_port_taken_by_another_program(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # An external object store: no local one to start before Triton's port is checked.
        settings = Settings(run_dir=tmp_path, triton_http_port=port, triton_grpc_port=port + 1 if port < 65535 else 1,
                            s3_endpoint_url="http://127.0.0.1:9")
        with pytest.raises(RuntimeError, match=f"port {port} is taken"):
            local.up(settings)
    assert set(local.status(settings).values()) == {None}


def test_the_kuberay_application_builder_reads_the_environment(monkeypatch):
    from ray.serve.deployment import Application

    from mosmedai.ingress.app import app_from_env

    monkeypatch.setenv("MOSMEDAI_TRITON_URL", "ru-mow.mosmedai.svc:8001")
    application = app_from_env({"router_max_batch_size": 16})
    assert isinstance(application, Application)
    with pytest.raises(ValidationError, match="router_max_batch_size"):
        app_from_env({"router_max_batch_size": 0})


def test_triton_http_base_defaults_to_the_local_triton():
    assert Settings().triton_http_base == "http://127.0.0.1:8100"
    assert Settings(triton_http_url="http://ru-mow.mosmedai.svc:8000").triton_http_base.endswith(":8000")
