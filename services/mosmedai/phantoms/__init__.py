"""Synthetic studies without torch: a phantom image per tool family with its findings, and the
DICOM objects around them (``dicom_build``). The CLI's `example`, the bench, the load tests,
the engine build and the tests use them; the training package (``mosmedai_training``) trains
and evaluates on them.

May import catalog and jobs.
"""
