"""Triton Python-backend entry point; the implementation is shared (mosmedai.serving.triton_models)."""

from mosmedai.serving.triton_models import OnnxNetworkModel as TritonPythonModel  # noqa: F401
