"""cupy.cuda.runtime of the test double."""
from cupy._engine import POOL, TOTAL_MEMORY, CUDARuntimeError, copy, stream_of, synchronize_all

memcpyHostToDevice = 1
memcpyDeviceToHost = 2
memcpyDeviceToDevice = 3


def getDeviceCount() -> int:
    return 1


def getDeviceProperties(device: int) -> dict:
    return {"name": b"CuPy test double (host emulation)", "totalGlobalMem": TOTAL_MEMORY,
            "major": 9, "minor": 0}


def memGetInfo() -> tuple[int, int]:
    return TOTAL_MEMORY - POOL.used, TOTAL_MEMORY


def driverGetVersion() -> int:
    return 13000


def runtimeGetVersion() -> int:
    return 13000


def deviceSynchronize() -> None:
    synchronize_all()


def memcpyAsync(dst: int, src: int, size: int, kind: int, stream: int) -> None:
    if kind not in (memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice):
        raise CUDARuntimeError(21, f"memcpy kind {kind} is not one the double knows")
    copy(dst, src, size, kind != memcpyDeviceToHost, stream_of(stream),
         from_device=kind != memcpyHostToDevice)


__all__ = ["CUDARuntimeError", "deviceSynchronize", "driverGetVersion", "getDeviceCount",
           "getDeviceProperties", "memGetInfo", "memcpyAsync", "memcpyDeviceToDevice", "memcpyDeviceToHost",
           "memcpyHostToDevice", "runtimeGetVersion"]
