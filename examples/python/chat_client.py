#!/usr/bin/env python3
"""Stream a chat answer from llm-server with plain grpcio.

The stubs are generated from proto/llm/v1/llm.proto at startup with grpcio-tools (nothing
generated is committed):

    pip install grpcio grpcio-tools
    python examples/python/chat_client.py --model smol \
        --system "You are a helpful assistant" \
        --user "Tell a light-hearted joke for a room of Data Scientists"
"""
import argparse
import os
import sys
import tempfile


def load_stubs():
    from grpc_tools import protoc

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
    out = tempfile.mkdtemp(prefix="llm-stubs-")
    rc = protoc.main(
        ["protoc", f"-I{root}", f"--python_out={out}", f"--grpc_python_out={out}", "llm/v1/llm.proto"]
    )
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    from llm.v1 import llm_pb2, llm_pb2_grpc

    return llm_pb2, llm_pb2_grpc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="127.0.0.1:50051")
    ap.add_argument("--model", required=True)
    ap.add_argument("--system")
    ap.add_argument("--user", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--stats", action="store_true", help="print the completion summary to stderr")
    args = ap.parse_args()

    import grpc

    pb, rpc = load_stubs()
    messages = []
    if args.system:
        messages.append(pb.ChatMessage(role="system", content=args.system))
    messages.append(pb.ChatMessage(role="user", content=args.user))
    params = pb.GenerationParams(max_new_tokens=args.max_new_tokens)
    if args.temperature is not None:
        params.temperature = args.temperature
    if args.seed is not None:
        params.seed = args.seed
    request = pb.GenerateRequest(model=args.model, chat=pb.Chat(messages=messages), params=params)

    with grpc.insecure_channel(args.server) as channel:
        stub = rpc.LlmServiceStub(channel)
        try:
            for msg in stub.Generate(request):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.HasField("done"):
                    d = msg.done
                    sys.stdout.write("\n")
                    if args.stats:
                        reason = pb.FinishReason.Name(d.finish_reason)
                        print(
                            f"[{reason}] {d.completion_tokens} tokens, TTFT {d.time_to_first_token_ms:.1f} ms, "
                            f"{d.decode_tokens_per_second:.1f} tok/s",
                            file=sys.stderr,
                        )
        except grpc.RpcError as e:
            sys.exit(f"error: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
