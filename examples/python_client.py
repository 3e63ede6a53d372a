"""Call a specdec cluster from another Python service with the client package.

    pip install specdec                     # or: pip install path/to/specdec-*.whl
    python examples/python_client.py --address 127.0.0.1:50051 --prompt "def fibonacci(n):"

TLS and the bearer token: --tls-ca certs/ca.pem --token-file certs/token (or SPECDEC_TLS_CA and
SPECDEC_AUTH_TOKEN_FILE). --json prints what it got as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

from specdec.client import AsyncClient, Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("SPECDEC_ORCHESTRATOR", "127.0.0.1:50051"))
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--mode", default="tree", help="tree, sequential or autoregressive")
    parser.add_argument("--tls-ca", default=os.environ.get("SPECDEC_TLS_CA", ""), help="CA bundle (PEM): TLS on")
    parser.add_argument("--token-file", default=os.environ.get("SPECDEC_AUTH_TOKEN_FILE", ""), help="file holding the bearer token")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    connection = dict(tls=args.tls_ca or False, token_file=args.token_file or None, timeout_s=120)

    with Client(args.address, **connection) as client:
        info = client.info()
        # One call: the whole text, the finish reason and the statistics.
        reply = client.generate(args.prompt, max_new_tokens=args.max_tokens, mode=args.mode)
        # The same prompt streamed: each round's accepted tokens as they come.
        streamed = []
        for chunk in client.stream(args.prompt, max_new_tokens=args.max_tokens, mode=args.mode):
            streamed.extend(chunk.token_ids)
            if not args.json:
                print(chunk.text, end="", flush=True)

    async def sampled():  # the asyncio client: a sampled generation (a fixed seed replays it)
        async with AsyncClient(args.address, **connection) as client:
            return await client.generate(args.prompt, max_new_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=7)

    sample = asyncio.run(sampled())

    if args.json:
        print(json.dumps({
            "model": info.model,
            "text": reply.text,
            "token_ids": list(reply.token_ids),
            "finish_reason": reply.finish_reason,
            "tokens_per_second": reply.stats.tokens_per_second,
            "streamed_token_ids": streamed,
            "sampled_token_ids": list(sample.token_ids),
        }))
    else:
        print(f"\n\n{info.model}: {reply.stats.tokens_generated} tokens, {reply.stats.tokens_per_second:.2f} tokens/s "
              f"({reply.stats.mean_accepted_per_round:.2f} per round)")
        print(f"sampled: {sample.text!r}")


if __name__ == "__main__":
    main()
