"""Union / intersect / exclude of two 10M-member packs via gRPC CreatePack vs raw pyroaring.

    .venv/bin/python bench/setops_grpc.py [--members 10000000] [--universe 20000000] [--repeat 3]

Two packs of ``--members`` random users out of ``--universe`` are published to a temporary local
store (beside a tiny generated event dataset, which every build reads for its statistics); a real
``python -m services.audience`` process serves them. For each operation a client sends CreatePack
with a spec of two pack references (``include_bots`` so that only the set algebra runs) and waits
for the operation (WaitOperation): that wall time covers validation, reference checks, queueing,
loading both inputs (cached after the first build), the Roaring operation, serialising and
publishing the result (data, manifest, pointer) and the operation bookkeeping. The raw figures are
pyroaring in this process: the operation alone on in-memory bitmaps, and deserialise both inputs +
operation + serialise the result (what a build has to do at least).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from audience_proc import AudienceProcess
from pyroaring import BitMap

from services.audience.packstore import PackStore
from services.events.generator import GenConfig, generate
from services.storage import LocalObjectStore

TENANT = "bench"


def _spec(op: str, a: str, b: str):
    from flashcrowd.audience.v1 import spec_pb2

    refs = [spec_pb2.PackSpec(pack=spec_pb2.PackReference(pack=name)) for name in (a, b)]
    if op == "exclude":
        return spec_pb2.PackSpec(exclude=spec_pb2.ExcludeOperands(base=refs[0], subtract=refs[1:]))
    operands = spec_pb2.SetOperands(operands=refs)
    return spec_pb2.PackSpec(union=operands) if op == "union" else spec_pb2.PackSpec(intersect=operands)


def _grpc_build(target: str, op: str, a: str, b: str, pack_id: str) -> tuple[float, float, int]:
    """(client wall seconds, server build seconds, size) of one CreatePack + WaitOperation."""
    import grpc
    from flashcrowd.audience.v1 import audience_service_pb2 as api
    from flashcrowd.audience.v1 import audience_service_pb2_grpc, pack_pb2, spec_pb2
    from google.longrunning import operations_pb2, operations_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = audience_service_pb2_grpc.AudienceServiceStub(channel)
        ops = operations_pb2_grpc.OperationsStub(channel)
        stub.ListPacks(api.ListPacksRequest(parent=f"tenants/{TENANT}", page_size=1))  # connect
        t0 = time.perf_counter()
        op_ = stub.CreatePack(
            api.CreatePackRequest(
                parent=f"tenants/{TENANT}",
                pack_id=pack_id,
                pack=pack_pb2.Pack(spec=_spec(op, a, b), options=spec_pb2.BuildOptions(include_bots=True)),
            )
        )
        while not op_.done:
            op_ = ops.WaitOperation(
                operations_pb2.WaitOperationRequest(name=op_.name, timeout={"seconds": 60})
            )
        wall = time.perf_counter() - t0
        if op_.HasField("error"):
            raise RuntimeError(f"{op} failed: {op_.error}")
        pack = pack_pb2.Pack()
        op_.response.Unpack(pack)
        return wall, pack.build_stats.duration.ToTimedelta().total_seconds(), pack.size


def _raw(op: str, a: BitMap, b: BitMap, a_bytes: bytes, b_bytes: bytes) -> tuple[float, float, int]:
    fn = {"union": BitMap.__or__, "intersect": BitMap.__and__, "exclude": BitMap.__sub__}[op]
    t0 = time.perf_counter()
    result = fn(a, b)
    op_only = time.perf_counter() - t0
    t0 = time.perf_counter()
    result2 = fn(BitMap.deserialize(a_bytes), BitMap.deserialize(b_bytes))
    result2.serialize()
    end_to_end = time.perf_counter() - t0
    assert result == result2
    return op_only, end_to_end, len(result)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=10_000_000)
    parser.add_argument("--universe", type=int, default=20_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="flashcrowd-bench-setops-"))
    try:
        from flashcrowd.audience.v1 import pack_pb2

        store = LocalObjectStore(root)
        generate(store, GenConfig(users=2000, days=1, seed=3))
        rng = np.random.default_rng(2)
        packs = PackStore(store)
        bitmaps: list[BitMap] = []
        for name in ("a", "b"):
            bm = BitMap(np.sort(rng.choice(args.universe, args.members, replace=False)).astype(np.uint32))
            packs.publish_version(TENANT, name, bm, pack_pb2.Pack(source=pack_pb2.Pack.SOURCE_UPLOAD))
            bitmaps.append(bm)
        a_name, b_name = (f"tenants/{TENANT}/packs/{n}" for n in ("a", "b"))
        a_bytes, b_bytes = (bytes(bm.serialize()) for bm in bitmaps)

        rows = []
        with AudienceProcess(root.as_uri()) as server:
            for op in ("union", "intersect", "exclude"):
                runs = [
                    _grpc_build(server.target, op, a_name, b_name, f"{op}-{i}") for i in range(args.repeat)
                ]
                raws = [_raw(op, bitmaps[0], bitmaps[1], a_bytes, b_bytes) for _ in range(args.repeat)]
                assert {r[2] for r in runs} == {r[2] for r in raws}, op
                rows.append((op, runs, raws))

        print(f"data        two packs of {args.members:,} random members out of {args.universe:,} users "
              f"({len(a_bytes) / 1e6:.1f} MB serialized each); {args.repeat} runs each")  # fmt: skip
        print(f"machine     {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
        print(f"{'op':10s} {'size':>11s} | {'gRPC cold':>9s} {'gRPC warm':>9s} {'build':>7s} | "
              f"{'raw op':>7s} {'raw e2e':>7s} | {'gRPC/raw op':>11s} {'gRPC/raw e2e':>12s}")  # fmt: skip
        for op, runs, raws in rows:
            cold = runs[0][0]
            warm = statistics.median(r[0] for r in runs[1:]) if len(runs) > 1 else cold
            build = statistics.median(r[1] for r in runs)
            raw_op = statistics.median(r[0] for r in raws)
            raw_e2e = statistics.median(r[1] for r in raws)
            grpc_part = f"{cold * 1e3:>7.0f}ms {warm * 1e3:>7.0f}ms {build * 1e3:>5.0f}ms"
            raw_part = f"{raw_op * 1e3:>5.1f}ms {raw_e2e * 1e3:>5.0f}ms"
            ratios = f"{warm / raw_op:>10.0f}x {warm / raw_e2e:>11.1f}x"
            print(f"{op:10s} {runs[0][2]:>11,} | {grpc_part} | {raw_part} | {ratios}")
        print("gRPC = CreatePack -> operation done (client wall); build = the server's own build duration;")
        print(
            "raw op = pyroaring operation on in-memory bitmaps; raw e2e = deserialize both + op + serialize"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
