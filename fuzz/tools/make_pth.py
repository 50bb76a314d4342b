"""Writes small PyTorch state dicts (torch.save's zip layout) without PyTorch.

Used for the fuzz seeds and the regression files: the pickle is emitted opcode by
opcode as torch.save writes it (protocol 2, _rebuild_tensor_v2, persistent storages).

    python3 fuzz/tools/make_pth.py OUT.pth NAME=SHAPE[:STRIDE][@STORAGE_ELEMENTS] ...

SHAPE and STRIDE are comma-separated (e.g. features.0.weight=4,1,3,3); the storage holds
STORAGE_ELEMENTS float32 values (default: the elements the view reaches), values i/100.
"""

import struct
import sys
import zipfile


def binint(n):
    if n < 256:
        return b"K" + bytes([n])
    if n < 65536:
        return b"M" + struct.pack("<H", n)
    return b"J" + struct.pack("<i", n)


def text(s):
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def tuple_of(values):
    return b"(" + b"".join(binint(v) for v in values) + b"t"


def pickle_state_dict(entries):
    out = bytearray(b"\x80\x02}(")
    for key, (name, shape, stride, elements) in enumerate(entries):
        out += text(name)
        out += b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"(" + text("storage") + b"ctorch\nFloatStorage\n"
        out += text(str(key)) + text("cpu") + binint(elements) + b"tQ"
        out += binint(0) + tuple_of(shape) + tuple_of(stride)
        out += b"\x89ccollections\nOrderedDict\n)Rt" + b"R"
    out += b"u."
    return bytes(out)


def contiguous(shape):
    stride, step = [], 1
    for dim in reversed(shape):
        stride.insert(0, step)
        step *= dim
    return stride


def parse(arg):
    name, spec = arg.split("=", 1)
    spec, _, elements = spec.partition("@")
    shape_text, _, stride_text = spec.partition(":")
    shape = [int(v) for v in shape_text.split(",")] if shape_text else []
    stride = [int(v) for v in stride_text.split(",")] if stride_text else contiguous(shape)
    reach = 1 + sum((d - 1) * s for d, s in zip(shape, stride))
    return name, shape, stride, int(elements) if elements else reach


def main():
    out, args = sys.argv[1], sys.argv[2:]
    entries = [parse(arg) for arg in args]
    root = "archive/"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(root + "data.pkl", pickle_state_dict(entries))
        archive.writestr(root + "byteorder", "little")
        for key, (_, _, _, elements) in enumerate(entries):
            values = struct.pack(f"<{elements}f", *[i / 100 for i in range(elements)])
            archive.writestr(root + f"data/{key}", values)
        archive.writestr(root + "version", "3\n")


if __name__ == "__main__":
    main()
