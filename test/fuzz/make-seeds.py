#!/usr/bin/env python3
"""test/fuzz/make-seeds.py DIR: writes the decode fuzzer's seed corpus into DIR.

The first byte of each input picks the harness's mode (see decode_fuzzer.cpp): 0 an encoded AMQP
message, 1 a JSON body for CheckJson, 2 deep nesting, 3 a message built from the bytes. The upper
bits pick the max JSON depth (index into 1, 2, 3, 8, 64, 1000, 100000)."""
import os, struct, sys

DEPTH_1000 = 5  # index of 1000 in the harness's depth table


def head(mode, depth=DEPTH_1000):
    return bytes([(depth << 2) | mode])


def sym(s):
    b = s.encode()
    return b"\xa3" + bytes([len(b)]) + b


def string(s):
    b = s.encode() if isinstance(s, str) else s
    return (b"\xa1" + bytes([len(b)]) + b) if len(b) < 256 else (b"\xb1" + struct.pack(">I", len(b)) + b)


def binary(b):
    return (b"\xa0" + bytes([len(b)]) + b) if len(b) < 256 else (b"\xb0" + struct.pack(">I", len(b)) + b)


def lst(items):
    body = b"".join(items)
    return b"\xd0" + struct.pack(">II", len(body) + 4, len(items)) + body


def mp(pairs):
    body = b"".join(k + v for k, v in pairs)
    return b"\xd1" + struct.pack(">II", len(body) + 4, len(pairs) * 2) + body


def section(code, value):
    return b"\x00\x53" + bytes([code]) + value


def message(body_section, content_type=None, props=None, annotations=True):
    out = section(0x70, lst([b"\x41", b"\x50\x04", b"\x40", b"\x42", b"\x52\x02"]))
    if annotations:
        out += section(0x72, mp([(sym("x-opt-sequence-number"), b"\x55\x07"),
                                 (sym("x-opt-enqueued-time"), b"\x83" + struct.pack(">q", 1700000000000)),
                                 (sym("x-opt-locked-until"), b"\x83" + struct.pack(">q", 1700000060000))]))
    p = [string("msg-1"), b"\x40", b"\x40", string("subject"), b"\x40", string("corr"),
         sym(content_type) if content_type else b"\x40"]
    out += section(0x73, lst(p))
    if props is not None:
        out += section(0x74, mp(props))
    return out + body_section


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "corpus"
    os.makedirs(d, exist_ok=True)
    seeds = {}
    order = b'{"id": 1, "amount": 12.5, "customer": "c\\u00e9", "tags": ["a", "b"], "ok": true, "n": null}'
    seeds["json-order"] = head(1) + order
    seeds["json-escapes"] = head(1) + b'["\\ud83d\\ude00", "\\udc00", "\\u0000", "\\/\\b\\f\\n\\r\\t"]'
    seeds["json-numbers"] = head(1) + b"[0, -0, 1e131071, 1e131072, 0.1e-16382, 1.0e-16383, 123456789012345678901234567890]"
    seeds["json-utf8"] = head(1) + b'"\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xed\xa0\x80 \xc0\xaf \xf4\x90\x80\x80"'
    seeds["json-trailing"] = head(1) + b'{"a": 1} x'
    seeds["json-truncated"] = head(1) + b'{"id": 3,'
    seeds["deep-array"] = head(2) + b"\x00" + struct.pack("<I", 100000) + b"\x00\x01"
    seeds["deep-object"] = head(2) + b"\x01" + struct.pack("<I", 2000) + b"\x01\x00true"
    ap = [(string("k"), string("v")), (string("n"), b"\x55\x05"), (sym("sym"), b"\x83" + struct.pack(">q", -1))]
    seeds["msg-data-json"] = head(0) + message(section(0x75, binary(order)), "application/json", ap)
    seeds["msg-data-binary"] = head(0) + message(section(0x75, binary(b"\xff\xfe\x00\x01")), "application/json")
    seeds["msg-data-two"] = head(0) + message(section(0x75, binary(b'{"id":')) + section(0x75, binary(b' 2}')))
    seeds["msg-value-map"] = head(0) + message(section(0x77, mp([(string("id"), b"\x55\x01"), (string("amount"), b"\x55\x02")])))
    seeds["msg-value-string"] = head(0) + message(section(0x77, string(order)), "text/json")
    seeds["msg-value-double"] = head(0) + message(section(0x77, b"\x82" + struct.pack(">d", float("nan"))))
    seeds["msg-sequence"] = head(0) + message(section(0x76, lst([b"\x55\x01", string("x")])) + section(0x76, lst([b"\x40"])))
    seeds["msg-no-body"] = head(0) + message(b"", annotations=False)
    seeds["msg-props-bad-utf8"] = head(0) + message(section(0x75, binary(b"{}")), None, [(string(b"\xed\xa0\x80"), string(b"\xc0\xaf"))])
    seeds["msg-text-plain"] = head(0) + message(section(0x75, binary(b"hello")), "text/plain")
    seeds["built-1"] = head(3) + bytes(range(256))
    seeds["built-2"] = head(3) + b"\x01" * 64 + order
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {d}")


if __name__ == "__main__":
    main()
