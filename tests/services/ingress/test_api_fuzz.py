"""The HTTP API fuzzed against its own OpenAPI document (schemathesis) on the real
platform: whatever the generated request, the answer is never a server error."""

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

from mosmedai.ingress.tenants import auth_headers

#: Requests per operation: enough to walk every parameter and body shape, quick on CI.
EXAMPLES = 15


@schemathesis.serializer("application/dicom", "multipart/related")
def _binary(ctx, value) -> bytes:
    """The generated body as bytes, whatever its declared binary schema produced."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


def test_no_request_gets_a_server_error(platform):
    schema = schemathesis.openapi.from_url(f"{platform['gateway']}/openapi.json")
    auth = auth_headers()
    failures, operations = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            response = case.call(headers=auth, timeout=120)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

        fuzz()
    assert operations >= 10
    assert not failures, "\n".join(failures[:20])


def test_the_document_is_published_and_lists_the_study_api(platform):
    document = httpx.get(f"{platform['gateway']}/openapi.json", timeout=30).json()
    assert {"/v1/studies", "/v1/studies/{study_instance_uid}", "/v1/studies/{study_instance_uid}/sr"} <= set(document["paths"])
