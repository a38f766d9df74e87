from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="HF model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--device", default=None, help="cpu | cuda | npu (default: what this machine has)")
    # SGLang's flag names, so a launch_server command line carries over
    parser.add_argument("--max-running-requests", type=int, default=256, help="rows decoded together (max_num_seqs)")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192,
                        help="prompt tokens prefilled per join (max_num_batched_tokens)")
    parser.add_argument("--mem-fraction-static", type=float, default=None,
                        help="share of device memory (RAM on CPU) for weights and KV cache (gpu_memory_utilization); "
                             "default: no KV cache limit")
    parser.add_argument("--context-length", type=int, default=None,
                        help="longest prompt + max_new_tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="dummy: build the model without reading its weights; they arrive by a weight update")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (health stays open)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ascend_rl.cli.quiet import quiet_transformers
    from ascend_rl.errors import UserError
    from ascend_rl.platform import resolve_device
    from ascend_rl.rollout.http_server import make_server
    from ascend_rl.rollout.native import NativeEngine

    if not (Path(args.model_path) / "config.json").is_file():
        raise UserError(f"--model-path {args.model_path}: not a Hugging Face model directory (no config.json)")
    quiet_transformers()
    engine = NativeEngine.from_pretrained(args.model_path, resolve_device(args.device),
                                          max_num_seqs=args.max_running_requests,
                                          max_num_batched_tokens=args.max_prefill_tokens,
                                          memory_utilization=args.mem_fraction_static,
                                          context_length=args.context_length, load_format=args.load_format)
    try:
        server = make_server(engine, args.model_path, args.host, args.port, args.api_key)
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    print(f"serving {args.model_path} on http://{args.host}:{server.server_port} (SGLang endpoints, token in/out)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
