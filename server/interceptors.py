"""gRPC server interceptors: cross-cutting concerns kept out of the servicer."""
from __future__ import annotations

import grpc


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class RpcCounter(grpc.ServerInterceptor):
    """Counts every RPC by method and final status code into `counter` (a labelled
    prometheus Counter with labels method, code)."""

    def __init__(self, counter):
        self.counter = counter

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        count = lambda context, failed: self.counter.labels(method, _code_name(context, failed)).inc()

        def unary(behavior):
            def wrapped(request, context):
                try:
                    response = behavior(request, context)
                except BaseException:
                    count(context, True)
                    raise
                count(context, False)
                return response
            return wrapped

        def streaming(behavior):
            def wrapped(request, context):
                try:
                    yield from behavior(request, context)
                except BaseException:
                    count(context, True)
                    raise
                count(context, False)
            return wrapped

        wrap = streaming if handler.response_streaming else unary
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)
        return factory(wrap(behavior), request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
