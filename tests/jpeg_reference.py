"""An exact baseline-JPEG bit counter written from T.81 and libjpeg for the tests, independent of the surrogate's code.

Its tables come from a JPEG file that Pillow (libjpeg) writes: the quantization tables of its DQT segments and
the Huffman tables of its DHT segments; colour conversion and downsampling are libjpeg's integer arithmetic
(jccolor.c, jcsample.c), the DCT is scipy's, the zigzag order T.81 Figure A.6 as printed, the coding loop plain
Python over the blocks in MCU order (4:2:0: four luma blocks, then Cb, then Cr).
"""

import io

import numpy as np
from PIL import Image
from scipy import fft

# T.81 Figure A.6: the zigzag sequence as row-major indices.
ZIGZAG = (
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14,
    21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60,
    61, 54, 47, 55, 62, 63,
)


def pillow_jpeg(array, quality):
    """Bytes of the JPEG Pillow writes for a uint8 [H, W, 3] array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def segments(data):
    """(marker, payload) of each segment before the scan, and the entropy-coded data (without EOI)."""
    out, i = [], 2
    while True:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        out.append((marker, data[i + 4 : i + 2 + length]))
        i += 2 + length
        if marker == 0xDA:
            return out, data[i:-2]


def tables(data):
    """Quantization tables {id: [64] natural order} and Huffman code lengths {(class, id): {symbol: bits}}."""
    quant, huffman = {}, {}
    for marker, payload in segments(data)[0]:
        j = 0
        while marker == 0xDB and j < len(payload):  # 8-bit tables: precision/id byte + 64 zigzag entries
            table = np.zeros(64)
            table[list(ZIGZAG)] = list(payload[j + 1 : j + 65])
            quant[payload[j] & 15] = table
            j += 65
        while marker == 0xC4 and j < len(payload):
            counts, n = payload[j + 1 : j + 17], sum(payload[j + 1 : j + 17])
            lengths = [length for length, count in enumerate(counts, 1) for _ in range(count)]
            huffman[(payload[j] >> 4, payload[j] & 15)] = dict(zip(payload[j + 17 : j + 17 + n], lengths))
            j += 17 + n
    return quant, huffman


def _category(value):
    return int(abs(value)).bit_length()


def _blocks(plane, mcu):
    """8x8 blocks of a plane in MCU order."""
    h, w = plane.shape
    for top in range(0, h, 8 * mcu):
        for left in range(0, w, 8 * mcu):
            for dy in range(mcu):
                for dx in range(mcu):
                    y, x = top + 8 * dy, left + 8 * dx
                    yield plane[y : y + 8, x : x + 8]


def component_bits(plane, quant, dc_code, ac_code, mcu):
    """Bits of one component coded with `quant` and the code lengths `dc_code`, `ac_code` (T.81 F.1.2)."""
    bits, previous = 0, 0
    for block in _blocks(plane, mcu):
        coefficients = np.round(fft.dctn(block, norm="ortho").flatten() / quant).astype(int)[list(ZIGZAG)]
        diff = coefficients[0] - previous
        previous = coefficients[0]
        bits += dc_code[_category(diff)] + _category(diff)
        run = 0
        for value in coefficients[1:]:
            if value == 0:
                run += 1
                continue
            while run > 15:
                bits += ac_code[0xF0]
                run -= 16
            size = _category(value)
            bits += ac_code[(run << 4) | size] + size
            run = 0
        if run:
            bits += ac_code[0x00]
    return bits


def ycbcr_like_libjpeg(rgb):
    """libjpeg's rgb_ycc_convert (jccolor.c): 16-bit fixed point, integer YCbCr in 0..255; int [H, W, 3]."""
    def fix(x):
        return int(x * 65536 + 0.5)

    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    half, offset = 1 << 15, 128 << 16
    y = (fix(0.299) * r + fix(0.587) * g + fix(0.114) * b + half) >> 16
    cb = (-fix(0.16874) * r - fix(0.33126) * g + fix(0.5) * b + offset + half - 1) >> 16
    cr = (fix(0.5) * r - fix(0.41869) * g - fix(0.08131) * b + offset + half - 1) >> 16
    return np.stack([y, cb, cr], -1)


def downsample_like_libjpeg(plane):
    """libjpeg's h2v2_downsample (jcsample.c): (sum of 2x2 + bias) >> 2, bias 1, 2, 1, 2, ... along a row."""
    sums = plane.reshape(plane.shape[0] // 2, 2, plane.shape[1] // 2, 2).sum((1, 3))
    bias = 1 + np.arange(sums.shape[1]) % 2
    return (sums + bias) >> 2


def jpeg_bits(array, quality):
    """Entropy-coded bits of a uint8 [H, W, 3] image as libjpeg codes it at `quality` (4:2:0): libjpeg's integer
    colour conversion and downsampling, then a float DCT (libjpeg's default is a 13-bit integer one)."""
    quant, huffman = tables(pillow_jpeg(array, quality))
    h, w = array.shape[:2]
    rgb = np.pad(array.astype(np.int64), ((0, -h % 16), (0, -w % 16), (0, 0)), mode="edge")
    ycc = ycbcr_like_libjpeg(rgb)
    bits = component_bits(ycc[..., 0] - 128.0, quant[0], huffman[(0, 0)], huffman[(1, 0)], 2)
    for plane in (ycc[..., 1], ycc[..., 2]):
        chroma = downsample_like_libjpeg(plane) - 128.0
        bits += component_bits(chroma, quant[1], huffman[(0, 1)], huffman[(1, 1)], 1)
    return bits


def entropy_bytes(array, quality):
    """(header bytes, entropy-coded bytes less the zero bytes stuffed after 0xFF) of Pillow's JPEG."""
    data = pillow_jpeg(array, quality)
    scan = segments(data)[1]
    return len(data) - len(scan), len(scan) - scan.count(b"\xff\x00")
