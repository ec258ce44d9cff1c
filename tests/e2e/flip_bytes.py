"""flip_bytes.py FILE DATASET MODE: damages 8 bytes of DATASET's stored data in the HDF5 file FILE, in place.

MODE is a byte mask such as 0x5A: XOR the 8 bytes in the middle of the dataset's data (its first chunk when
chunked) with it. MODE zero-row: find the last row of a 2-D float32 dataset that is all zeros and overwrite its
first 8 bytes with 0xFF (two NaNs). HDF5's Fletcher-32 adds 16-bit words modulo 65535, where 0x0000 and 0xFFFF
are the same number, so that damage passes the checksum; a 0x5A mask is always caught."""
import sys

import h5py
import numpy as np


def data_extent(ds):
    if ds.chunks is not None:
        if ds.id.get_num_chunks() != 1 and sys.argv[3] == "zero-row":
            sys.exit(f"{ds.name}: zero-row needs a single-chunk dataset")
        info = ds.id.get_chunk_info(0)
        return info.byte_offset, info.size
    return ds.id.get_offset(), ds.id.get_storage_size()


def main(path, name, mode):
    with h5py.File(path, "r") as f:
        ds = f[name]
        start, size = data_extent(ds)
        assert start is not None and size >= 16, (name, start, size)
        if mode == "zero-row":
            v = ds[()]
            assert v.ndim == 2 and v.dtype == np.float32, (v.shape, v.dtype)
            rows = np.flatnonzero((v == 0).all(axis=1))
            if len(rows) == 0:
                sys.exit(f"{name}: no all-zero row")
            off, new = start + int(rows[-1]) * v.shape[1] * 4, None
        else:
            off, new = start + size // 2, int(mode, 0)
    with open(path, "r+b") as fh:
        fh.seek(off)
        old = fh.read(8)
        if new is None:
            assert old == bytes(8), old
            damaged = b"\xff" * 8
        else:
            damaged = bytes(b ^ new for b in old)
        fh.seek(off)
        fh.write(damaged)
    print(f"{name}: bytes {old.hex()} -> {damaged.hex()} at file offset {off} (data at {start}, {size} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
