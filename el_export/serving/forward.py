"""Inside Triton's Python-backend stub: requests in, responses out, each refused request answered alone.

`ForwardingModel` is the model `el-export serve` runs: it sends each batch to the serving process, where
`BatchRunner` answers it with the one loaded bundle that every instance shares, so this module imports
nothing heavy (each instance is a stub process of its own). `el_export.serving.triton_repo.TritonPythonModel`
uses the same two halves around a runner of its own.
"""

import json
from multiprocessing.connection import Client

INTERNAL_ERROR = "el-export failed on this batch (a bug: the serving process's stderr has the traceback)"
GONE = "el-export serve is unavailable: its process is gone (stopped or crashed); restart it"


def read_batch(pb_utils, requests: list, names: list[str]) -> list[tuple[dict, dict]]:
    """Per request, its input tensors by name (those it sent) and its parameters."""
    batch = []
    for request in requests:
        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in names}
        data = {name: t.as_numpy() for name, t in tensors.items() if t is not None}
        batch.append((data, json.loads(request.parameters() or "{}")))
    return batch


def responses(pb_utils, results: list, outputs: list[str]) -> list:
    """Per request, its outputs, or its error (a one-line message) as INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT."""
    return [
        pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, result[n]) for n in outputs])
        if isinstance(result, dict)
        else error_response(pb_utils, str(result), "INVALID_ARG")
        for result in results
    ]


def error_response(pb_utils, message: str, code: str):
    """A response that is `message` alone, with Triton's error `code` (INVALID_ARG: 400, UNAVAILABLE: 503,
    INTERNAL: 500). Raising from `execute` instead would append the stub's traceback, paths included."""
    code = getattr(pb_utils.TritonError, code, None)  # codes came with Triton 23.09; before: INTERNAL, a 500
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    )


class ForwardingModel:
    """Each batch to the serving process over its socket (address and key in the model's parameters)."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        self.connection = Client(parameters["el_export_address"], family="AF_UNIX",
                                 authkey=bytes.fromhex(parameters["el_export_authkey"]))  # fmt: skip

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils  # only inside the stub

        try:
            self.connection.send(read_batch(pb_utils, requests, self.inputs))
            results = self.connection.recv()
        except (EOFError, OSError):
            return [error_response(pb_utils, GONE, "UNAVAILABLE") for _ in requests]
        if results is None:
            return [error_response(pb_utils, INTERNAL_ERROR, "INTERNAL") for _ in requests]
        return responses(pb_utils, results, self.outputs)

    def finalize(self) -> None:
        self.connection.close()
