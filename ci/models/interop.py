#!/usr/bin/env python3
"""Checks a KServe V2 (Open Inference Protocol) server with the stock client.

    interop.py [--rtol R] [--atol A] [--model-version V] URL MODEL REF_JSON

URL is the server's HTTP address (http://127.0.0.1:8000 or 127.0.0.1:8000);
REF_JSON a reference file written by make_models.py. Through
tritonclient.http, as any user of the protocol would, it asks whether the
server is live and ready, whether MODEL is ready, reads its metadata and
checks it against the reference tensors, then infers the reference input
twice: with binary tensors (the client's default) and with JSON tensors
(binary_data=False on inputs and outputs). Every output element must be
within rtol * |reference| + atol of the reference; integer outputs must be
equal. Exits 0 when all holds, 1 with a message naming the first failure.
"""

import argparse
import json
import sys

import numpy as np

try:
    import tritonclient.http as httpclient
except ImportError as e:  # pragma: no cover
    sys.exit(f"interop: cannot import tritonclient.http ({e}); run ci/setup.sh and use .cache/venv/bin/python")

NUMPY_OF = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class Failure(Exception):
    pass


def load_reference(path):
    try:
        with open(path) as f:
            ref = json.load(f)
    except (OSError, ValueError) as e:
        raise Failure(f"cannot read reference {path}: {e}")
    tensors = {}
    for side in ("inputs", "outputs"):
        tensors[side] = {}
        for name, t in ref.get(side, {}).items():
            dtype = NUMPY_OF.get(t["datatype"])
            if dtype is None:
                raise Failure(f"{path}: {side} {name}: unknown datatype {t['datatype']}")
            array = np.array(t["data"], dtype=dtype).reshape(t["shape"])
            tensors[side][name] = (t["datatype"], array)
        if not tensors[side]:
            raise Failure(f"{path}: no {side}")
    return tensors


def split_url(url):
    """tritonclient takes host:port, and ssl=True for https."""
    if url.startswith("https://"):
        return url[len("https://"):].rstrip("/"), True
    if url.startswith("http://"):
        return url[len("http://"):].rstrip("/"), False
    return url.rstrip("/"), False


def call(what, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # tritonclient raises its own and socket errors alike
        kind = type(e).__name__
        raise Failure(f"{what} failed: {kind}: {e}") from None


def check_metadata(meta, model, tensors):
    if not isinstance(meta, dict):
        raise Failure(f"model metadata is not a JSON object: {meta!r}")
    if meta.get("name") != model:
        raise Failure(f"model metadata: name is {meta.get('name')!r}, want {model!r}")
    for key in ("versions", "platform"):
        if key not in meta:
            print(f"interop: note: model metadata has no {key!r}", file=sys.stderr)
    for side in ("inputs", "outputs"):
        listed = {t.get("name"): t for t in meta.get(side, [])}
        for name, (datatype, array) in tensors[side].items():
            t = listed.get(name)
            if t is None:
                raise Failure(f"model metadata: {side} has no {name!r} (has {sorted(listed)})")
            if t.get("datatype") != datatype:
                raise Failure(f"model metadata: {side} {name}: datatype {t.get('datatype')!r}, want {datatype!r}")
            shape = t.get("shape", [])
            if len(shape) != array.ndim or any(d != -1 and d != n for d, n in zip(shape, array.shape)):
                raise Failure(f"model metadata: {side} {name}: shape {shape} does not admit {list(array.shape)}")
        if len(listed) != len(tensors[side]):
            raise Failure(f"model metadata: {side} are {sorted(listed)}, want {sorted(tensors[side])}")


def compare(label, name, datatype, want, got, rtol, atol):
    if got is None:
        raise Failure(f"{label}: no output {name!r} in the response")
    if list(got.shape) != list(want.shape):
        raise Failure(f"{label}: output {name}: shape {list(got.shape)}, want {list(want.shape)}")
    if got.dtype != want.dtype:
        raise Failure(f"{label}: output {name}: numpy dtype {got.dtype}, want {want.dtype} ({datatype})")
    if np.issubdtype(want.dtype, np.floating):
        w = want.astype(np.float64)
        g = got.astype(np.float64)
        if not np.all(np.isfinite(g)):
            i = int(np.argmax(~np.isfinite(g.ravel())))
            raise Failure(f"{label}: output {name}: element {i} is {g.ravel()[i]}")
        err = np.abs(g - w)
        bound = rtol * np.abs(w) + atol
        bad = err > bound
        worst_rel = float(np.max(err / np.maximum(np.abs(w), atol)))
        if bad.any():
            i = int(np.argmax((err - bound).ravel()))
            idx = tuple(int(k) for k in np.unravel_index(i, want.shape))
            raise Failure(
                f"{label}: output {name}: {int(bad.sum())} of {want.size} elements off; worst at {list(idx)}: "
                f"got {float(g.ravel()[i])!r}, want {float(w.ravel()[i])!r} (|diff| {err.ravel()[i]:.3g} > "
                f"{rtol:g}*|want|+{atol:g} = {bound.ravel()[i]:.3g})"
            )
        return f"max |diff| {float(err.max()):.3g}, max rel {worst_rel:.3g}"
    if not np.array_equal(got, want):
        i = int(np.argmax((got != want).ravel()))
        raise Failure(f"{label}: output {name}: element {i} is {got.ravel()[i]}, want {want.ravel()[i]}")
    return "equal"


def infer(client, model, version, tensors, binary, rtol, atol):
    label = f"infer ({'binary' if binary else 'JSON'} tensors)"
    inputs = []
    for name, (datatype, array) in tensors["inputs"].items():
        inp = httpclient.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=binary)
        inputs.append(inp)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in tensors["outputs"]]
    result = call(label, client.infer, model, inputs, model_version=version, outputs=outputs)
    notes = []
    for name, (datatype, want) in tensors["outputs"].items():
        out = result.get_output(name)
        if out is None:
            raise Failure(f"{label}: no output {name!r} in the response {result.get_response()}")
        if out.get("datatype") != datatype:
            raise Failure(f"{label}: output {name}: datatype {out.get('datatype')!r}, want {datatype!r}")
        sent_binary = "binary_data_size" in (out.get("parameters") or {})
        if binary and not sent_binary:
            raise Failure(f"{label}: output {name} came as JSON, binary was asked for")
        if not binary and (sent_binary or "data" not in out):
            raise Failure(f"{label}: output {name} did not come as JSON data, binary_data=False was asked for")
        got = call(f"{label}: decoding output {name}", result.as_numpy, name)
        notes.append(f"{name} {compare(label, name, datatype, want, got, rtol, atol)}")
    print(f"interop: {label}: ok ({'; '.join(notes)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("ref_json")
    ap.add_argument("--model-version", default="", help="a version of MODEL (default: the server's choice)")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--atol", type=float, default=1e-5)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for connecting and for each call")
    args = ap.parse_args()

    try:
        tensors = load_reference(args.ref_json)
        host, ssl = split_url(args.url)
        client = call(
            f"connecting to {args.url}",
            httpclient.InferenceServerClient,
            host,
            ssl=ssl,
            connection_timeout=args.timeout,
            network_timeout=args.timeout,
        )
        try:
            where = f"{args.url}"
            if not call(f"is_server_live ({where}/v2/health/live)", client.is_server_live):
                raise Failure(f"server at {where} says it is not live")
            if not call(f"is_server_ready ({where}/v2/health/ready)", client.is_server_ready):
                raise Failure(f"server at {where} says it is not ready")
            if not call(f"is_model_ready ({args.model})", client.is_model_ready, args.model, args.model_version):
                raise Failure(f"server at {where} says model {args.model!r} is not ready")
            meta = call(f"get_model_metadata ({args.model})", client.get_model_metadata, args.model, args.model_version)
            check_metadata(meta, args.model, tensors)
            print(f"interop: {where}: live, ready, model {args.model} ready, metadata matches the reference")
            for binary in (True, False):
                infer(client, args.model, args.model_version, tensors, binary, args.rtol, args.atol)
        finally:
            try:
                client.close()
            except Exception:
                pass
    except Failure as e:
        print(f"interop: FAIL: {args.model} at {args.url}: {e}", file=sys.stderr)
        return 1
    print(f"interop: {args.model}: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
