"""The bytes of one memory block: K and V of every KV head in one fixed-size record.

Every tier stores a block as one record (a row of uint8), so a block moves between RAM, disk and the device
as one contiguous copy, and the disk tier's files are arrays of records. A record holds, in order:

    k        (Hkv, block_size, head_dim)  storage dtype (16/32-bit float, or int8)
    v        (Hkv, block_size, head_dim)
    k_scale  (Hkv,) float32               int8 only: per-(block, head) scales (`inf_llm.storage.quantization`)
    v_scale  (Hkv,) float32

Each field starts at a multiple of `ALIGN` bytes and the record is padded to one, so that a row of a record
array can be reinterpreted as any of these dtypes in place (`Tensor.view(dtype)` needs aligned offsets).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from inf_llm.storage.dtypes import DTYPES, NAMES
from inf_llm.storage.quantization import dequantize_int8, quantize_int8

ALIGN = 16


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class BlockRecord:
    """Typed views into records: k, v (n, Hkv, B, D); k_scale, v_scale (n, Hkv) float32 or None (16-bit)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


@dataclass(frozen=True)
class BlockLayout:
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype  # the storage dtype; torch.int8 means quantised with scales

    def __post_init__(self) -> None:
        if self.dtype not in NAMES:
            raise ValueError(f"block storage dtype {self.dtype} is not supported: use one of {', '.join(DTYPES)}")

    # Derived sizes are cached: they are read for every block moved (cached_property works on a frozen
    # dataclass because it writes the instance __dict__ directly).
    @cached_property
    def quantized(self) -> bool:
        return self.dtype == torch.int8

    @cached_property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_kv_heads, self.block_size, self.head_dim)

    @cached_property
    def _payload_bytes(self) -> int:
        return self.num_kv_heads * self.block_size * self.head_dim * self.dtype.itemsize

    @cached_property
    def _offsets(self) -> dict[str, int]:
        payload, scales = _aligned(self._payload_bytes), _aligned(4 * self.num_kv_heads)
        offsets = {"k": 0, "v": payload}
        if self.quantized:
            offsets.update(k_scale=2 * payload, v_scale=2 * payload + scales)
        return offsets

    @cached_property
    def record_bytes(self) -> int:
        payload = 2 * _aligned(self._payload_bytes)
        return payload + (2 * _aligned(4 * self.num_kv_heads) if self.quantized else 0)

    # --- records <-> tensors ----------------------------------------------------------------------------------

    def unpack(self, records: torch.Tensor) -> BlockRecord:
        """Views of records (n, record_bytes) uint8 (any device) as typed fields; nothing is copied."""
        if records.dtype != torch.uint8 or records.dim() != 2 or records.shape[1] != self.record_bytes:
            raise ValueError(f"expected block records (n, {self.record_bytes}) uint8, got {tuple(records.shape)} "
                             f"{records.dtype}")
        n, off = records.shape[0], self._offsets
        payload = self._payload_bytes

        def field(name: str, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            return records[:, off[name] : off[name] + nbytes].view(dtype).view(n, *shape)

        k = field("k", payload, self.dtype, self.shape)
        v = field("v", payload, self.dtype, self.shape)
        if not self.quantized:
            return BlockRecord(k, v, None, None)
        scales = 4 * self.num_kv_heads
        return BlockRecord(k, v, field("k_scale", scales, torch.float32, (self.num_kv_heads,)),
                           field("v_scale", scales, torch.float32, (self.num_kv_heads,)))

    def empty(self, n: int, device: torch.device | str = "cpu", pin_memory: bool = False) -> torch.Tensor:
        """n uninitialised records (n, record_bytes) uint8."""
        return torch.empty((n, self.record_bytes), dtype=torch.uint8, device=device, pin_memory=pin_memory)

    @cached_property
    def _gaps(self) -> list[tuple[int, int]]:
        """Byte ranges of a record that no field covers (alignment padding)."""
        sizes = {"k": self._payload_bytes, "v": self._payload_bytes, "k_scale": 4 * self.num_kv_heads,
                 "v_scale": 4 * self.num_kv_heads}
        gaps, end = [], 0
        for name, start in sorted(self._offsets.items(), key=lambda item: item[1]):
            if start > end:
                gaps.append((end, start))
            end = start + sizes[name]
        return gaps + ([(end, self.record_bytes)] if end < self.record_bytes else [])

    def _new_records(self, n: int, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        # Padding is zeroed so that identical blocks are identical bytes (on disk too); fields are overwritten.
        records = self.empty(n, device) if out is None else out
        for start, end in self._gaps:
            records[:, start:end] = 0
        return records

    def pack(self, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """k, v: (n, Hkv, B, D) any float dtype and device -> records (n, record_bytes) uint8 on that device
        (written into `out` if given, e.g. a reused buffer).

        16-bit storage casts; int8 storage quantises (per block and KV head) on the source device.
        """
        if k.shape != v.shape or tuple(k.shape[1:]) != self.shape:
            raise ValueError(f"expected k and v of shape (n, {', '.join(map(str, self.shape))}), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        records = self._new_records(k.shape[0], k.device, out)
        out = self.unpack(records)
        if self.quantized:
            (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)
            out.k.copy_(qk), out.v.copy_(qv), out.k_scale.copy_(sk), out.v_scale.copy_(sv)
        else:
            out.k.copy_(k), out.v.copy_(v)
        return records

    def pack_stored(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """Records from already-stored fields (what `fields_of` returns): exact, nothing is re-quantised."""
        names = ("k", "v", "k_scale", "v_scale") if self.quantized else ("k", "v")
        missing = [name for name in names if name not in fields]
        if missing:
            raise ValueError(f"stored blocks ({NAMES[self.dtype]}) need fields {', '.join(missing)}")
        records = self._new_records(fields["k"].shape[0], fields["k"].device)
        out = self.unpack(records)
        for name in names:
            target = getattr(out, name)
            if fields[name].dtype != target.dtype or fields[name].shape != target.shape:
                raise ValueError(f"stored field {name!r} is {tuple(fields[name].shape)} {fields[name].dtype}, "
                                 f"expected {tuple(target.shape)} {target.dtype}")
            target.copy_(fields[name])
        return records

    def fields_of(self, records: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored fields of records as separate tensors (copies), e.g. for a state dict."""
        rec = self.unpack(records)
        fields = {"k": rec.k.clone(), "v": rec.v.clone()}
        if self.quantized:
            fields.update(k_scale=rec.k_scale.clone(), v_scale=rec.v_scale.clone())
        return fields

    def values(self, records: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of records as (n, Hkv, B, D) in `dtype`: cast, or dequantised for int8 storage."""
        rec = self.unpack(records)
        if self.quantized:
            return dequantize_int8(rec.k, rec.k_scale, dtype), dequantize_int8(rec.v, rec.v_scale, dtype)
        return rec.k.to(dtype), rec.v.to(dtype)

    # --- description, for files -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"num_kv_heads": self.num_kv_heads, "block_size": self.block_size, "head_dim": self.head_dim,
                "dtype": NAMES[self.dtype], "record_bytes": self.record_bytes}

    @classmethod
    def from_dict(cls, data: dict) -> BlockLayout:
        try:
            layout = cls(int(data["num_kv_heads"]), int(data["block_size"]), int(data["head_dim"]), DTYPES[data["dtype"]])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a block layout: {data!r} ({error})") from error
        if data.get("record_bytes") != layout.record_bytes:
            raise ValueError(f"block layout {data!r} was written with another record format "
                             f"(record_bytes {data.get('record_bytes')}, expected {layout.record_bytes})")
        return layout
