"""The one study service every door adapts to.

``service.StudyService`` takes a tenant, DICOM instances and options (tools, versions,
deadline, priority, synchronous or not) and returns results or an accepted job;
``runner.JobRunner`` runs accepted jobs; ``shadow`` runs candidate versions on live studies
after their answer. Knows no protocol: no FastAPI, gRPC or pynetdicom here.
May import results, pipeline, serving, phantoms, catalog and jobs; never a door.
"""
