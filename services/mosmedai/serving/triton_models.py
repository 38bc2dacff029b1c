"""Triton Python-backend models: the preprocess, network and postprocess steps of a tool.

Each ``model_repository/<model>/1/model.py`` imports one class from here, so every step of
every tool shares one implementation. ``triton_python_backend_utils`` exists only inside
Triton's Python stub, hence the imports inside the methods.

Failures answer the request with a TritonError naming the model and the cause; the gateway
turns that into a 502 naming the tool, never a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _pb():
    import triton_python_backend_utils as pb_utils  # provided by Triton's Python stub

    return pb_utils


def _parameter(model_config: dict, key: str, default: str | None = None) -> str | None:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


class _Model:
    def initialize(self, args: dict) -> None:
        self.model_config = json.loads(args["model_config"])
        self.name = self.model_config["name"]
        self.version_dir = Path(args["model_repository"]) / args["model_version"]

    def _error(self, error: Exception):
        pb = _pb()
        return pb.InferenceResponse(error=pb.TritonError(f"{self.name}: {type(error).__name__}: {error}"))


class PreprocessModel(_Model):
    """pixels [B,H,W] uint16, params [B,8], voi_lut [B,L] -> image [B,1,S,S], geometry [B,5]."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.size = int(_parameter(self.model_config, "network_size", "256"))
        # A tool package's own preprocess (mosmedai.catalog.byo) may set windowing and normalisation.
        if any(_parameter(self.model_config, key) is not None for key in ("windowing", "mean", "std")):
            from mosmedai.catalog.byo import PreprocessSettings, preprocess_image

            settings = PreprocessSettings.from_parameters(
                lambda key, default: _parameter(self.model_config, key, default))
            self.preprocess_frame = lambda frame, params: preprocess_image(frame, params, settings)
        else:
            from mosmedai.catalog.imaging import preprocess

            self.preprocess_frame = lambda frame, params: preprocess(frame, params, self.size)

    def execute(self, requests):
        from mosmedai.catalog.imaging import GrayscaleParams

        pb = _pb()
        responses = []
        for request in requests:
            try:
                pixels = pb.get_input_tensor_by_name(request, "pixels").as_numpy()
                params = pb.get_input_tensor_by_name(request, "params").as_numpy()
                lut_tensor = pb.get_input_tensor_by_name(request, "voi_lut")
                luts = lut_tensor.as_numpy() if lut_tensor is not None else None
                images = np.empty((len(pixels), 1, self.size, self.size), np.float32)
                geometry = np.empty((len(pixels), 5), np.float32)
                for index, frame in enumerate(pixels):
                    lut = luts[index] if luts is not None else None
                    image, box = self.preprocess_frame(frame, GrayscaleParams.from_vector(params[index], lut))
                    images[index, 0] = image
                    geometry[index] = box.as_vector()
                responses.append(
                    pb.InferenceResponse([pb.Tensor("image", images), pb.Tensor("geometry", geometry)])
                )
            except Exception as error:  # answer this request, keep serving the others
                responses.append(self._error(error))
        return responses


class OnnxNetworkModel(_Model):
    """The network on CPU: ONNX Runtime, one intra-op thread, no spinning (DESIGN.md).

    On a GPU pool the same step is a TensorRT plan built from the same ONNX file.
    """

    def initialize(self, args: dict) -> None:
        import onnxruntime

        super().initialize(args)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        # Spinning threads burn the core another instance needs on a small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        path = self.version_dir / "model.onnx"
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def execute(self, requests):
        pb = _pb()
        try:
            # Triton's dynamic batcher hands over every request that queued up meanwhile:
            # run them as one batch.
            inputs = [pb.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
            sizes = [len(batch) for batch in inputs]
            outputs = self.session.run(self.output_names, {self.input_name: np.concatenate(inputs)})
        except Exception as error:
            return [self._error(error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb.Tensor(name, np.ascontiguousarray(value[start : start + size]))
                       for name, value in zip(self.output_names, outputs)]
            responses.append(pb.InferenceResponse(tensors))
            start += size
        return responses


class VolumePreprocessModel(_Model):
    """volume INT16 [B,D,H,W] (HU on the family grid) -> image FP32 [B,1,D,H,W] through the family's window."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.low = float(_parameter(self.model_config, "window_low"))
        self.high = float(_parameter(self.model_config, "window_high"))

    def execute(self, requests):
        from mosmedai.catalog.volumes import window

        pb = _pb()
        responses = []
        for request in requests:
            try:
                volume = pb.get_input_tensor_by_name(request, "volume").as_numpy()
                image = window(volume, self.low, self.high)[:, None]
                responses.append(pb.InferenceResponse([pb.Tensor("image", np.ascontiguousarray(image))]))
            except Exception as error:
                responses.append(self._error(error))
        return responses


class ToolPostprocessModel(_Model):
    """Network outputs, geometry (+ volume) -> probability, positive, location (+ measurements).

    The tool's family module (``mosmedai.catalog.families``) does the work, so the served numbers are
    those of the held-out evaluation.
    """

    def initialize(self, args: dict) -> None:
        from mosmedai.catalog.tools import CATALOG, family_module

        super().initialize(args)
        self.spec = CATALOG[_parameter(self.model_config, "tool")]
        self.postprocess = family_module(self.spec.name).postprocess
        path = self.version_dir / "calibration.json"
        self.calibration = json.loads(path.read_text()) if path.exists() else {}
        # MOSMEDAI_THRESHOLD_<MODEL> overrides the repository's value for one deployment.
        override = os.environ.get(f"MOSMEDAI_THRESHOLD_{self.name.upper()}")
        self.threshold = float(override or _parameter(self.model_config, "threshold", "0.5"))
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{self.name}: threshold {self.threshold} is not a probability in [0, 1]")
        self.network_outputs = [t.name for t in self.spec.network_outputs]
        self.n_measurements = len(self.spec.measurements)

    def execute(self, requests):
        pb = _pb()
        responses = []
        for request in requests:
            try:
                outputs = {name: pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.network_outputs}
                geometry = pb.get_input_tensor_by_name(request, "geometry").as_numpy()
                volume_tensor = pb.get_input_tensor_by_name(request, "volume")
                volumes = volume_tensor.as_numpy() if volume_tensor is not None else None
                items = [
                    self.postprocess(self.spec, {name: value[i] for name, value in outputs.items()}, geometry[i],
                                     None if volumes is None else volumes[i], self.calibration, self.threshold)
                    for i in range(len(geometry))
                ]
                tensors = [
                    pb.Tensor("probability", np.array([[item.probability] for item in items], np.float32)),
                    pb.Tensor("positive", np.array([[item.positive] for item in items], bool)),
                    pb.Tensor("location", np.stack([item.location for item in items]).astype(np.float32)),
                ]
                if self.n_measurements:
                    measurements = np.stack([item.measurements for item in items]).astype(np.float32)
                    if measurements.shape[1] != self.n_measurements:
                        raise ValueError(f"postprocess gave {measurements.shape[1]} measurements, "
                                         f"the tool declares {self.n_measurements}")
                    tensors.append(pb.Tensor("measurements", measurements))
                responses.append(pb.InferenceResponse(tensors))
            except Exception as error:
                responses.append(self._error(error))
        return responses
