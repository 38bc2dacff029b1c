"""Triton Python-backend entry point; the implementation is shared (mosmedai.serving.triton_models)."""

from mosmedai.serving.triton_models import ToolPostprocessModel as TritonPythonModel  # noqa: F401
