"""The doors: every way a study or a request comes in, and nothing else.

- ``app``: the HTTP gateway (FastAPI ingress of the Ray Serve app), assembled from one router per
  API (``http_studies``, ``http_feedback``, ``http_tools``, ``http_pools``, ``http_oip``,
  ``dicomweb``); it also hosts the gRPC door (``grpc_door``) in the same replica.
- ``dimse``: DICOM C-STORE/C-ECHO in; ``dimse_delivery``: results C-STOREd back to a tenant's PACS.
- ``grpc_door``: ``mosmedai.v1.Studies`` and the Open Inference Protocol over gRPC (``grpc_oip``).
- ``tenants`` and ``auth``: who calls; ``admission``: the gate that sheds load at the first hop;
  ``drain``: a replica that stops; ``metrics``: the gateway's Prometheus metrics.

Each door translates its own protocol into calls of the one study service
(``mosmedai.studies``) and maps its domain errors (``mosmedai.pipeline.errors``) to its own
status codes. A door never calls another door. May import every layer below: studies,
results, pipeline, serving, phantoms, catalog, jobs.
"""
