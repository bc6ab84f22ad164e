#!/usr/bin/env python3
"""Python grpcio clients the serving tests drive (stubs generated from proto/ at run time).

    stream_tools.py cancel SERVER MODEL N     stream a long generation, cancel after N tokens
    stream_tools.py raw SERVER                send malformed and oversized Generate messages

Each prints one JSON object on stdout.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "python"))
from chat_client import load_stubs  # noqa: E402

import grpc  # noqa: E402


def cancel(server, model, n):
    pb, rpc = load_stubs()
    req = pb.GenerateRequest(
        model=model,
        prompt="Once upon a time",
        params=pb.GenerationParams(max_new_tokens=2000, ignore_eos=True),
    )
    with grpc.insecure_channel(server) as ch:
        call = rpc.LlmServiceStub(ch).Generate(req)
        got = 0
        for msg in call:
            if msg.HasField("token_id"):
                got += 1
            if got >= n:
                call.cancel()
                break
        code = call.code()
    print(json.dumps({"tokens": got, "code": code.name if code else None}))


def raw(server):
    out = {}
    with grpc.insecure_channel(server) as ch:
        # Bytes that are not a GenerateRequest: field 1 (model) claims a length past the end.
        gen = ch.unary_stream("/llm.v1.LlmService/Generate",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for name, payload in [("malformed", b"\x0a\xff\xff\xff\x0f\x01"),
                              ("oversized", b"\x0a" + b"\x80\x80\x80\x03" + b"m" * (6 << 20))]:
            try:
                list(gen(payload, timeout=30))
                out[name] = {"code": "OK"}
            except grpc.RpcError as e:
                out[name] = {"code": e.code().name, "details": e.details()}
    print(json.dumps(out))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "cancel":
        cancel(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif mode == "raw":
        raw(sys.argv[2])
    else:
        sys.exit(f"unknown mode {mode}")
