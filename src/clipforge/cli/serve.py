"""``clipforge serve``: search embedded collections over HTTP, with a web page.

Examples::

    clipforge serve photos-out/ --model ckpt/              # http://127.0.0.1:1234/
    clipforge serve coco-out/ laion-out/ --model ViT-B-32.pt --port 8080

Each OUT is a folder written by ``clipforge embed`` (and ``clipforge index``); its folder name is
its ``indice_name`` in clip-retrieval's API. The server binds 127.0.0.1 unless ``--host`` says
otherwise, and serves only indexed images, by id.
"""
from __future__ import annotations

import argparse
import sys

from . import CliError
from ._common import add_model_arguments

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve``."""
    parser = subparsers.add_parser("serve", help="search collections by text or image: HTTP API and web page",
                                   description="Serve embedded collections: clip-retrieval's API "
                                   "(/knn-service, /metadata, /indices-list), /search and a page at /.")
    parser.add_argument("collections", nargs="+", metavar="OUT", help="collection folders from clipforge embed")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=1234, help="port (default: 1234)")
    parser.add_argument("--max-k", type=int, default=1000, metavar="K", help="most results per query (default: 1000)")
    parser.add_argument("--batch-wait-ms", type=float, default=3.0, metavar="MS",
                        help="how long the encoder waits to batch concurrent queries (default: 3)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser pages from ORIGIN to call the API (e.g. a hosted clip-retrieval "
                        "front); repeatable; none by default")
    parser.set_defaults(func=run)


def build_app(args: argparse.Namespace):
    """The app for ``args``: collections read, model loaded, fingerprints compared (warned)."""
    from ..evaluate import model_fingerprint
    from ..runtime import resolve_device
    from ..search._batcher import QueryEncoder
    from ..search._guard import LOOPBACK_HOSTS
    from ..search.collection import load_collections
    from ..search.service import create_app
    from ._common import load_model_arg

    if not 1 <= args.port <= 65535:
        raise CliError(f"--port must be 1..65535, got {args.port}")
    if args.max_k < 1:
        raise CliError(f"--max-k must be at least 1, got {args.max_k}")
    collections = load_collections(args.collections)
    device = resolve_device(args.device)
    model, preprocess = load_model_arg(args.model, device, args.seed)
    fingerprint = model_fingerprint(model)
    for collection in collections.values():
        if collection.dim != model.config.embed_dim:
            raise CliError(f"{collection.root}: embeddings have dim {collection.dim}, but --model {args.model} "
                           f"embeds to {model.config.embed_dim}; serve it with the model that embedded it")
        if not collection.manifest:
            print(f"warning: {collection.name}: no manifest.json, so the model that embedded it is unknown",
                  file=sys.stderr)
        elif collection.manifest.get("complete") is False:
            print(f"warning: {collection.name}: manifest says the embedding did not finish; serving the "
                  f"{collection.count} rows written so far", file=sys.stderr)
        expected = collection.manifest.get("model", {}).get("fingerprint")
        if expected and expected != fingerprint:
            print(f"warning: {collection.name}: --model {args.model} is not the model that embedded it "
                  f"(fingerprint {fingerprint[:12]} != {str(expected)[:12]}); text and image queries "
                  "will not match the stored embeddings", file=sys.stderr)
    encoder = QueryEncoder(model, device, args.precision, wait_ms=args.batch_wait_ms)
    # bound to loopback, answer loopback names only (no DNS rebinding); otherwise the operator decides
    allowed_hosts = LOOPBACK_HOSTS if args.host in LOOPBACK else ()
    return create_app(collections, encoder, preprocess, max_k=args.max_k, cors_origins=tuple(args.cors_origin),
                      allowed_hosts=allowed_hosts)


def run(args: argparse.Namespace) -> int:
    """``clipforge serve``."""
    import uvicorn

    app = build_app(args)
    if args.host not in LOOPBACK:
        print(f"warning: binding {args.host}: anyone who can reach this machine can search these collections "
              "and read their indexed images", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    names = ", ".join(app.state.service.collections)
    print(f"serving {names} on http://{host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
