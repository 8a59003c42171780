"""Why is the ms backend slow on CPU where ptrace cannot help?

The single MindSpore ops one decode step of ``bench_ms_decode.py``'s model runs, timed alone
against the same op in torch, in float32 and float16: the matrix products of one new position
(and of a 40-token prefill), an elementwise op, and the float16 <-> float32 casts MindFormers
puts around its float32 RMSNorm and softmax. Sizes from one element up show whether a cost is
per element or per call. PyNative, synchronous, as the backend runs it.

    .venvs/ms/bin/python benchmarks/bench_ms_kernels.py

Each figure is the fastest of 5 rounds of the mean over N calls (a shared machine slows some
rounds).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

#: (rows, inner, outputs, calls): a decode step's q/o, gate/up and down projections, a prefill's
#: gate projection, the LM head.
MATMULS = ((1, 576, 576, 200), (1, 576, 1536, 200), (1, 1536, 576, 200), (40, 576, 1536, 50), (1, 576, 49152, 10))
CAST_SIZES = (1, 576, 576 * 256, 576 * 1536)


def fastest_us(call: Callable[[], object], calls: int) -> float:
    call()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            result = call()
        if hasattr(result, "asnumpy"):
            result.asnumpy()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    import mindspore as ms
    import torch
    from mindspore import ops

    ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=True)
    ms.set_device("CPU")
    print(f"mindspore {ms.__version__} ({ms.get_context('runtime_num_threads')} threads), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); microseconds per call")
    rng = np.random.default_rng(0)
    matmul = ops.MatMul(transpose_b=True)  # MindFormers' Linear: weight [out, in]
    print(f"{'x @ w^T':26} {'ms fp32':>9} {'torch fp32':>10} {'ms fp16':>9} {'torch fp16':>10} {'ms fp16/fp32':>13}")
    for rows, inner, outputs, calls in MATMULS:
        x = rng.standard_normal((rows, inner), np.float32)
        w = rng.standard_normal((outputs, inner), np.float32) * 0.05
        times = []
        for dtype in (np.float32, np.float16):
            mx, mw = ms.Tensor(x.astype(dtype)), ms.Tensor(w.astype(dtype))
            tx, tw = torch.from_numpy(x.astype(dtype)), torch.from_numpy(w.astype(dtype))
            times += [fastest_us(lambda mx=mx, mw=mw: matmul(mx, mw), calls),
                      fastest_us(lambda tx=tx, tw=tw: torch.nn.functional.linear(tx, tw), calls)]
        print(f"{f'{rows}x{inner} @ ({outputs}x{inner})^T':26} {times[0]:9.0f} {times[1]:10.0f} "
              f"{times[2]:9.0f} {times[3]:10.0f} {times[2] / times[0]:12.1f}x")
    hidden = rng.standard_normal((1, 1, 576), np.float32)
    th = torch.from_numpy(hidden)
    for dtype in (ms.float32, ms.float16):
        mh = ms.Tensor(hidden).astype(dtype)
        print(f"mul [1,1,576] {dtype}: ms {fastest_us(lambda mh=mh: ops.mul(mh, mh), 300):.0f}, "
              f"torch float32 {fastest_us(lambda: th * th, 300):.1f}")
    for size in CAST_SIZES:
        half, single = ms.Tensor(np.ones(size, np.float16)), ms.Tensor(np.ones(size, np.float32))
        torch_half = torch.ones(size, dtype=torch.float16)
        calls = 20 if size > 10_000 else 100
        print(f"cast {size:7d} elements: ms float16->float32 {fastest_us(lambda half=half: ops.cast(half, ms.float32), calls):6.0f}, "
              f"float32->float16 {fastest_us(lambda single=single: ops.cast(single, ms.float16), calls):6.0f}; torch "
              f"{fastest_us(torch_half.float, calls):6.0f}")


if __name__ == "__main__":
    main()
