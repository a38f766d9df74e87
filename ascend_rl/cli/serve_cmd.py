from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ascend_rl.cli.argtypes import float_in, int_at_least

API_KEY_ENV = "ASCEND_RL_API_KEY"


def port_number(text: str) -> int:
    port = int_at_least(0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {port}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive = int_at_least(1)
    parser.add_argument("--model-path", required=True, help="HF model directory")
    parser.add_argument("--tokenizer-path", default=None, help="the tokenizer's directory (default: the model's)")
    parser.add_argument("--skip-tokenizer-init", action="store_true",
                        help="token ids in and out only: no text on /generate, no OpenAI API (what RL needs)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model's name in the OpenAI API (/v1/models; default: the model path)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=30000, help="0: any free port")
    parser.add_argument("--device", default=None, help="cpu | cuda | npu (default: what this machine has)")
    parser.add_argument("--dtype", choices=tuple(SERVE_DTYPES), default="auto",
                        help="weights and compute, as SGLang's --dtype (auto: the model config's torch_dtype; a "
                             "CPU without bf16/fp16 units computes in float32)")
    # SGLang's flag names, so a launch_server command line carries over
    parser.add_argument("--max-running-requests", type=positive, default=256,
                        help="rows decoded together (max_num_seqs)")
    parser.add_argument("--max-prefill-tokens", type=positive, default=8192,
                        help="prompt tokens prefilled per join (max_num_batched_tokens)")
    parser.add_argument("--mem-fraction-static", type=float_in(0, 1, low_open=True), default=None,
                        help="share of device memory (RAM on CPU) for weights and KV cache (gpu_memory_utilization); "
                             "default: no KV cache limit")
    parser.add_argument("--context-length", type=positive, default=None,
                        help="longest prompt + max_new_tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--enable-weights-cpu-backup", action="store_true",
                        help="keep a host copy of released weights; resume_memory_occupation(['weights']) restores "
                             "them (SGLang's flag)")
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="dummy: build the model without reading its weights; they arrive by a weight update")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' (health stays open); visible in ps: prefer "
                          f"--api-key-file or the environment variable {API_KEY_ENV}")
    key.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    # ours: the bounds of what a client can make this server do
    parser.add_argument("--weights-root", action="append", default=None, metavar="DIR",
                        help="/update_weights_from_disk reads only under this directory (repeatable; default: the "
                             "model path's parent)")
    parser.add_argument("--weights-group-timeout", type=float_in(0, 3600, low_open=True), default=30.0,
                        metavar="SECONDS",
                        help="how long /init_weights_update_group waits for its rendezvous (default: 30)")
    # defaults None: request_checks.Limits' (importing it here would load torch for every command)
    parser.add_argument("--max-request-bytes", type=positive, default=None,
                        help="largest request body (default: 64 MiB; beyond: 413)")
    parser.add_argument("--max-request-samples", type=positive, default=None,
                        help="most samples (prompts × n) in one /generate request (default: 65536)")
    parser.add_argument("--max-request-tokens", type=positive, default=None,
                        help="most tokens (prompt + max_new_tokens, summed over the samples) in one /generate "
                             "request (default: 2^27)")
    parser.set_defaults(run=run)


def api_key(args: argparse.Namespace, environ=os.environ) -> str | None:
    """--api-key or the first line of --api-key-file (argparse allows one), else $ASCEND_RL_API_KEY; None: no key."""
    from pathlib import Path

    from ascend_rl.errors import UserError

    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--api-key-file {args.api_key_file}: cannot read it ({err})") from None
        if not lines or not lines[0].strip():
            raise UserError(f"--api-key-file {args.api_key_file}: the first line is empty")
        return lines[0].strip()
    return args.api_key or environ.get(API_KEY_ENV) or None


SERVE_DTYPES = {"auto": None, "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
                "float32": "float32"}  # SGLang's --dtype choices


def engine_dtype(name: str, model_path: str, device: str):
    """`--dtype` as a torch dtype: auto is the model config's torch_dtype (float32 when it names none)."""
    from ascend_rl.platform import compute_dtype, dtype_named

    wanted, key = SERVE_DTYPES[name], "--dtype"
    if wanted is None:
        config = Path(model_path) / "config.json"
        fields = json.loads(config.read_text())
        wanted, key = fields.get("torch_dtype") or fields.get("dtype") or "float32", f"--dtype=auto: {config} torch_dtype"
    return compute_dtype(device, dtype_named(key, wanted), "--dtype")


def run(args: argparse.Namespace) -> int:
    from ascend_rl.cli.quiet import quiet_transformers
    from ascend_rl.data.model_dir import check_model_dir
    from ascend_rl.errors import UserError
    from ascend_rl.platform import usable_device
    from ascend_rl.rollout.http_server import make_server
    from ascend_rl.rollout.native import NativeEngine
    from ascend_rl.rollout.request_checks import Limits
    from ascend_rl.rollout.server_info import ServedModel
    from ascend_rl.rollout.text_codec import TextCodec

    check_model_dir(args.model_path, "--model-path", weights=args.load_format != "dummy")
    key = api_key(args)
    quiet_transformers()
    if not args.skip_tokenizer_init:  # a missing tokenizer stops here, before minutes of loading weights
        TextCodec.load(args.tokenizer_path or args.model_path,
                       "--tokenizer-path" if args.tokenizer_path else "--model-path")
    device = usable_device(args.device)
    engine = NativeEngine.from_pretrained(args.model_path, device, dtype=engine_dtype(args.dtype, args.model_path, device),
                                          max_num_seqs=args.max_running_requests,
                                          max_num_batched_tokens=args.max_prefill_tokens,
                                          memory_utilization=args.mem_fraction_static,
                                          context_length=args.context_length, load_format=args.load_format,
                                          enable_weights_cpu_backup=args.enable_weights_cpu_backup)
    given = {"max_body_bytes": args.max_request_bytes, "max_samples": args.max_request_samples,
             "max_tokens": args.max_request_tokens}
    limits = Limits(**{name: value for name, value in given.items() if value is not None})
    served = ServedModel(args.model_path, args.tokenizer_path, args.served_model_name, args.skip_tokenizer_init,
                         {name: value for name, value in vars(args).items() if name != "run"})
    try:
        server = make_server(engine, served, args.host, args.port, key, weights_roots=args.weights_root,
                             limits=limits, group_timeout_s=args.weights_group_timeout)
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    mode = "token in/out" if args.skip_tokenizer_init else "text and token ids; OpenAI API under /v1"
    print(f"serving {args.model_path} on http://{args.host}:{server.server_port} (SGLang endpoints, {mode})",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
