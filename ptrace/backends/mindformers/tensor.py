"""MindSpore tensors seen through :class:`EngineTensor`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from ptrace.backends.base import NativeTensor
from ptrace.bundle_spec.stats import row_stats

if TYPE_CHECKING:  # mindspore is imported where it is used, so listing backends stays cheap
    import mindspore as ms

NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def dtype_name(dtype: Any) -> str:
    """ptrace's name of a MindSpore dtype (MindSpore prints Float32, BFloat16, ...)."""
    return str(dtype).lower()


class MindSporeTensor(NativeTensor):
    native: ms.Tensor

    @property
    def dtype(self) -> str:
        return dtype_name(self.native.dtype)

    def numpy(self) -> np.ndarray:
        return np.ascontiguousarray(self.native.asnumpy())  # bfloat16 arrives as ml_dtypes.bfloat16

    def row_stats(self) -> np.ndarray:
        return row_stats(self.numpy())

    def replaced(self, array: np.ndarray) -> MindSporeTensor:
        import mindspore as ms

        host = np.ascontiguousarray(array).astype(NUMPY_DTYPES[self.dtype])
        return MindSporeTensor(ms.Tensor(host, dtype=self.native.dtype).reshape(self.native.shape))
