"""NCCL's ncclAlltoAll called directly on a process group's communicator.

Why: NCCL >= 2.28 runs ncclAlltoAll on the copy engines, with no CTAs, when the communicator has the
zero-CTA policy and both buffers are symmetric windows (the "Zero-CTA" path of NCCL's user guide). torch's
all_to_all_single does not reach it: with upstream NCCL, ProcessGroupNCCL issues an equal-split
all-to-all as grouped ncclSend/ncclRecv (it calls ncclAllToAll only for builds that define
NCCL_ALLTOALL_SUPPORTED, a flag of Meta's NCCLX fork). On 2 x H200 at 64K tokens the exchanger that went
through all_to_all_single on a zero-CTA group measured the same as plain NCCL (96.0% of one GPU at equal
work, BENCHMARKS.md "Session 14") and NCCL's log never named the copy-engine path. So
`ZeroCtaExchanger` calls ncclAlltoAll itself, through ctypes, on the communicator torch made for its group
(`ProcessGroupNCCL._comm_ptr()`), on the stream it chooses.

The library is the libnccl this process already loaded with torch (same soname: dlopen returns it), so the
communicator pointer and the library agree.
"""

from __future__ import annotations

import ctypes

import torch
import torch.distributed as dist

# ncclDataType_t (nccl.h)
NCCL_DATA_TYPES = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}
NCCL_LIBRARY = "libnccl.so.2"


def nccl_data_type(dtype: torch.dtype) -> int:
    """ncclDataType_t of `dtype`; ValueError naming the dtypes NCCL has."""
    if dtype not in NCCL_DATA_TYPES:
        raise ValueError(
            f"ncclAlltoAll has no data type for {dtype}; it takes {', '.join(map(str, NCCL_DATA_TYPES))}"
        )
    return NCCL_DATA_TYPES[dtype]


def load_alltoall(library: str = NCCL_LIBRARY):
    """(ncclAlltoAll, ncclGetErrorString) from `library`, typed; RuntimeError saying what is missing."""
    try:
        nccl = ctypes.CDLL(library)
    except OSError as error:
        raise RuntimeError(
            f"exchange='nccl_zero_cta' calls ncclAlltoAll in {library}, which could not be loaded ({error}); "
            "it needs a CUDA build of torch with NCCL >= 2.28: use exchange='nccl'"
        ) from error
    alltoall = getattr(nccl, "ncclAlltoAll", None)
    if alltoall is None:
        raise RuntimeError(
            f"{library} has no ncclAlltoAll (NCCL < 2.28): exchange='nccl_zero_cta' needs NCCL >= 2.28; "
            "use exchange='nccl'"
        )
    alltoall.restype = ctypes.c_int
    # sendbuff, recvbuff, count (elements per rank), datatype, comm, stream
    alltoall.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    error_string = nccl.ncclGetErrorString
    error_string.restype, error_string.argtypes = ctypes.c_char_p, [ctypes.c_int]
    return alltoall, error_string


def communicator_pointer(group: dist.ProcessGroup, device: torch.device) -> int:
    """The ncclComm_t torch made for `group` on `device` (created now if torch had not yet)."""
    backend = group._get_backend(device)
    comm_pointer = getattr(backend, "_comm_ptr", None)
    if comm_pointer is None:
        raise RuntimeError(
            f"{type(backend).__name__} does not expose _comm_ptr() (this torch): exchange='nccl_zero_cta' "
            "needs the group's NCCL communicator; use exchange='nccl'"
        )
    pointer = int(comm_pointer())
    if pointer == 0:  # torch creates communicators lazily: one collective makes it
        index = device.index if device.index is not None else torch.cuda.current_device()
        dist.barrier(group=group, device_ids=[index])
        pointer = int(comm_pointer())
    if pointer == 0:
        raise RuntimeError("torch gave a null NCCL communicator for the zero-CTA group: use exchange='nccl'")
    return pointer


class NcclAlltoAll:
    """ncclAlltoAll over `group`'s communicator: row p of `send` goes to rank p, row p of `receive` comes
    from rank p (as all_to_all_single with equal splits)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.alltoall, self.error_string = load_alltoall()
        self.world = dist.get_world_size(group)
        self.comm = communicator_pointer(group, device)

    def __call__(self, send: torch.Tensor, receive: torch.Tensor, stream: torch.cuda.Stream) -> None:
        if send.shape != receive.shape or send.dtype != receive.dtype or send.shape[0] != self.world:
            raise ValueError(
                f"ncclAlltoAll needs send and receive of one shape [P={self.world}, ...] and dtype; got "
                f"{tuple(send.shape)} {send.dtype} and {tuple(receive.shape)} {receive.dtype}"
            )
        if not (send.is_contiguous() and receive.is_contiguous()):
            raise ValueError("ncclAlltoAll reads and writes whole rows: send and receive must be contiguous")
        result = self.alltoall(
            send.data_ptr(),
            receive.data_ptr(),
            send.numel() // self.world,
            nccl_data_type(send.dtype),
            self.comm,
            stream.cuda_stream,
        )
        if result != 0:
            raise RuntimeError(
                f"ncclAlltoAll failed: {self.error_string(result).decode()} (ncclResult {result})"
            )
