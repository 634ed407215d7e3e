"""Unit constants and formatting. Sizes are bytes, times seconds, rates per second."""

KiB = 1024
MiB = 1024**2
GiB = 1024**3
GB = 1e9
TFLOP = 1e12

#: bytes per element of each supported dtype name
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of `dtype` ('fp32', 'bf16', 'fp16', 'fp8', 'int8')."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}") \
            from None


def fmt_bytes(n_bytes: float) -> str:
    """Human-readable binary size, e.g. '41.2 GiB'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n_bytes) >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes:.0f} B"
