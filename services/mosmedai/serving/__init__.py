"""Inference: the Ray Serve router (``router``) that batches per tool and calls Triton, the
routing decision (``routing``), the pool directory and its discovery (``pools``,
``pool_discovery``), the router's metrics (``metrics``) and throughput window
(``throughput``), the Triton model repository and configs (``model_repo``), the Python-backend
models Triton runs (``triton_models``) and the TensorRT engine build (``tensorrt_build``).

May import phantoms, catalog and jobs.
"""
