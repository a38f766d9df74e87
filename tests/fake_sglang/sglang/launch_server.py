"""`python -m sglang.launch_server --model-path M --port P [--any-server-arg V]`: flags must be 0.5.8 field
names; serves our native engine over SGLang's HTTP API."""

import argparse

from sglang.srt.server_args import ServerArgs

if __name__ == "__main__":
    import dataclasses

    parser = argparse.ArgumentParser()
    for f in dataclasses.fields(ServerArgs):
        parser.add_argument("--" + f.name.replace("_", "-"), nargs="?", const=True, default=None)
    args = vars(parser.parse_args())  # an unknown flag exits 2, like SGLang
    from ascend_rl.rollout.http_server import make_server
    from ascend_rl.rollout.native import NativeEngine

    engine = NativeEngine.from_pretrained(args["model_path"], "cpu")
    # real SGLang loads weights from any path a client names
    make_server(engine, args["model_path"], args["host"], int(args["port"]), weights_roots=["/"]).serve_forever()
