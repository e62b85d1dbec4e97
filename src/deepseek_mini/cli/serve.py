"""``deepseek-mini serve``: a checkpoint behind an OpenAI-style HTTP API and a story page."""

from __future__ import annotations

import argparse
import importlib.util

from ..errors import UserError
from ..inference.batcher import Batcher
from ..inference.loading import load_for_inference
from ..train.precision import DTYPES, resolve_device
from .threads import print_note, use_threads

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_installed() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"serve needs {' and '.join(missing)}: "
                        "pip install 'deepseek-mini[serve]'")


def run(args: argparse.Namespace) -> None:
    check_installed()
    from ..serve.app import create_app
    from ..serve.params import Limits
    from ..serve.server import bind, make_server

    if args.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    for option, value in (("--max-request-bytes", args.max_request_bytes),
                          ("--max-prompts", args.max_prompts)):
        if value < 1:
            raise UserError(f"{option} must be >= 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    device = resolve_device(args.device, "--device")
    note = use_threads(args.threads, "decode", device)
    model, tok, _ = load_for_inference(args.checkpoint, device, DTYPES[args.dtype],
                                       args.tokenizer, quantize=args.quantize)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    batcher = Batcher(model, tok.eos_id, args.max_batch).start()
    where = ("local only; --host 0.0.0.0 listens on every interface"
             if args.host in LOCAL_HOSTS else "reachable from other machines")
    print(f"serving {args.model_name} on http://{host}:{port} ({where}); "
          f"API at http://{host}:{port}/v1, story page at http://{host}:{port}/", flush=True)
    print_note(note)
    try:
        limits = Limits(args.max_request_bytes, args.max_prompts)
        make_server(create_app(batcher, tok, args.model_name, limits)).run(sockets=[sock])
    finally:
        batcher.close()
        sock.close()
