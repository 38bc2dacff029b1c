"""Tenant configuration: validation names tenant and field, demo tenants only locally, lookups."""

import json

import pytest

from mosmedai.ingress.tenants import TenantConfigError, hash_token, load_tenants, valid_ae_title


def entry(**over):
    base = {"id": "kazan-rkb", "region": "RU-TA", "institution": "RKB", "token_sha256": hash_token("secret-1"),
            "dimse": {"called_ae_title": "MOSMEDAI_RKB", "allowed_calling_aes": ["RKB_PACS"],
                      "result_destination": {"ae_title": "RKB_PACS", "host": "10.0.0.5", "port": 104}}}
    base.update(over)
    return base


def load(entries, profile="cluster", demo=False):
    return load_tenants(json.dumps(entries), profile, demo)


def test_valid_file_and_lookups(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(
        "tenants:\n"
        f"  - {{id: kazan-rkb, region: RU-TA, institution: RKB, token_sha256: {hash_token('secret-1')},\n"
        "      dimse: {called_ae_title: MOSMEDAI_RKB, allowed_calling_aes: [RKB_PACS],\n"
        "              result_destination: {ae_title: RKB_PACS, host: 10.0.0.5, port: 104}}}\n")
    registry = load_tenants(str(path), "cluster", False)
    tenant = registry.get("kazan-rkb")
    assert tenant.region == "RU-TA" and tenant.dimse.result_destination.port == 104
    assert registry.by_token("secret-1") is tenant
    assert registry.by_token("secret-2") is None and registry.by_token("") is None
    assert registry.by_called_ae("MOSMEDAI_RKB") is tenant and registry.by_called_ae("OTHER") is None
    assert "secret-1" not in repr(registry.all())


@pytest.mark.parametrize("over, field", [
    ({"region": "RU-XX"}, "region"),
    ({"region": "US-CA"}, "region"),
    ({"id": "Bad Id"}, "id"),
    ({"token_sha256": "abc"}, "token_sha256"),
    ({"dimse": {"called_ae_title": "A" * 17, "allowed_calling_aes": ["X"]}}, "dimse.called_ae_title"),
    ({"dimse": {"called_ae_title": "OK", "allowed_calling_aes": ["BAD\\AE"]}}, "dimse.allowed_calling_aes"),
    ({"dimse": {"called_ae_title": "OK", "allowed_calling_aes": ["X"],
                "result_destination": {"ae_title": "X", "host": "h", "port": 0}}}, "dimse.result_destination.port"),
    ({"token": "plain"}, "token"),
    ({"extra_field": 1}, "extra_field"),
])
def test_errors_name_tenant_and_field(over, field):
    with pytest.raises(TenantConfigError) as err:
        load([entry(**over)])
    assert f"field '{field}'" in str(err.value)
    assert "tenants[0]" in str(err.value)


def test_duplicates_are_refused():
    other = entry(id="kazan-2", token_sha256=hash_token("secret-2"),
                  dimse={"called_ae_title": "MOSMEDAI_2", "allowed_calling_aes": ["X"]})
    with pytest.raises(TenantConfigError, match="tenant 'kazan-rkb': field 'id': duplicate"):
        load([entry(), entry()])
    with pytest.raises(TenantConfigError, match="tenant 'kazan-2': field 'token_sha256': same token as tenant 'kazan-rkb'"):
        load([entry(), {**other, "token_sha256": hash_token("secret-1")}])
    with pytest.raises(TenantConfigError, match="field 'dimse.called_ae_title': 'MOSMEDAI_RKB' is already"):
        load([entry(), {**other, "dimse": {"called_ae_title": "MOSMEDAI_RKB", "allowed_calling_aes": ["X"]}}])
    assert len(load([entry(), other])) == 2


def test_demo_tenants_local_only():
    with pytest.raises(TenantConfigError, match="demo tenants are for the local profile only"):
        load_tenants(None, "cluster", True)
    registry = load_tenants(None, "local", True)
    moscow, tatarstan = registry.get("demo-moscow"), registry.get("demo-tatarstan")
    assert registry.by_token("demo-moscow-token") is moscow and moscow.region == "RU-MOW"
    assert registry.by_token("demo-tatarstan-token") is tatarstan and tatarstan.region == "RU-TA"
    assert moscow.dimse.called_ae_title == "MOSMEDAI_MOW" and moscow.dimse.allowed_calling_aes == ("MOW_PACS", "STORESCU")
    assert tatarstan.dimse.called_ae_title == "MOSMEDAI_TA" and moscow.dimse.result_destination is None
    assert moscow.token_sha256 == hash_token("demo-moscow-token")
    # configured tenants and demo tenants together; a clash with a demo id is a duplicate
    assert len(load([entry()], profile="local", demo=True)) == 3
    with pytest.raises(TenantConfigError, match="duplicate"):
        load([entry(id="demo-moscow")], profile="local", demo=True)


def test_no_tenants_is_an_error_and_bad_sources():
    with pytest.raises(TenantConfigError, match="no tenants configured"):
        load_tenants(None, "local", False)
    with pytest.raises(TenantConfigError, match="cannot read"):
        load_tenants("/nonexistent/tenants.yaml", "cluster", False)
    with pytest.raises(TenantConfigError, match="expected a list"):
        load_tenants('{"id": "x"}', "cluster", False)


def test_ae_title_rules():
    assert valid_ae_title(" PACS ") == "PACS"
    for bad in ("", "   ", "A" * 17, "A\\B", "A\nB", "ПАКС"):
        with pytest.raises(ValueError):
            valid_ae_title(bad)
