"""Triton Python-backend entry point; the implementation is shared (mosmedai.triton_models)."""

from mosmedai.triton_models import ToolPostprocessModel as TritonPythonModel  # noqa: F401
