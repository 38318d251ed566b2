"""The embedded server's proxy model: PyTriton's own, taught per-request errors.

Runs inside Triton's Python-backend stub, never in Tribune's process (it imports
``triton_python_backend_utils``, which exists only there). `tribune serve` writes it as
``model.py`` of every batched model in PyTriton's model store, next to PyTriton's own proxy
renamed ``pytriton_model.py`` (see ``tribune.services.serve.install_proxy``).

PyTriton answers an exception of the inference callable with one INTERNAL error, carrying
the Python traceback, for every request of the dynamic batch: one bad request fails the
good ones merged with it. The Python backend's own API has per-request errors with a code
(``InferenceResponse(error=TritonError(msg, TritonError.INVALID_ARG))``); this module routes
the callable's refusals there:

* a response holding only ``tribune_error`` (one UTF-8 sentence) becomes that request's
  INVALID_ARGUMENT, the others of the batch are answered as usual;
* a request with an empty tensor (e.g. a sequence of length 0), which PyTriton's transport
  cannot carry, is refused here before it reaches the callable;
* extra instances (--instances N) wait up to 60 s, not 1 s, for the first one's handshake.
"""
import numpy as np
import triton_python_backend_utils as pb_utils  # only inside Triton's Python backend

from . import pytriton_model

ERROR_OUTPUT = "tribune_error"       # tribune.services.serve.ERROR_OUTPUT: the same name on both sides
_wrap_response = pytriton_model._wrap_response


def _invalid(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def _wrap_or_refuse(response, requested_outputs_names, model_outputs_dict):
    if response.data is not None and ERROR_OUTPUT in response.data:
        return _invalid(bytes(response.data[ERROR_OUTPUT].reshape(-1)[0]).decode("utf-8", "replace"))
    return _wrap_response(response, requested_outputs_names, model_outputs_dict)


# BatchResponsesHandler looks the function up in its module's globals at every batch
pytriton_model._wrap_response = _wrap_or_refuse


# With --instances N, instances 1..N-1 read their config from instance 0's handshake socket,
# waiting 1 s for it; tritonserver loads the model store's instances in parallel at startup
# (before its endpoints open), so under load instance 0 may not be up yet: wait longer.
_get_config = pytriton_model.get_config_from_handshake_server


def _get_config_patiently(socket_path, timeout_s: float = 1.0):
    return _get_config(socket_path, timeout_s=max(timeout_s, 60.0))


pytriton_model.get_config_from_handshake_server = _get_config_patiently


def _empty_input(request) -> str | None:
    for tensor in request.inputs():
        shape = list(np.shape(tensor.as_numpy()))
        if 0 in shape:
            return f"{tensor.name()}: empty (shape {shape}); a sequence needs at least one token"
    return None


class TritonPythonModel(pytriton_model.TritonPythonModel):
    def execute(self, triton_requests):
        refusals = [_empty_input(r) for r in triton_requests]
        if not any(refusals):
            return super().execute(triton_requests)
        good = [r for r, why in zip(triton_requests, refusals) if why is None]
        answered = iter(super().execute(good) if good else [])
        return [_invalid(why) if why else next(answered) for why in refusals]
