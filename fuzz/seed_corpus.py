#!/usr/bin/env python3
"""Writes the seed corpora for the fuzz targets into fuzz/corpus/<target>/.

Seeds come from testdata/vectors.json (every frame hex, the invalid frames,
the registration vector) and testdata/seal_vectors.json. Relay-to-relay
seeds (LINK_STATE, PRESENCE, FORWARD, FWD_RECEIPT, REDIRECT) are built here
(and every frame of testdata/s2s_vectors.json is added)
from the registration vector, with genuine Ed25519 signatures made by the
vector relay's key (a small RFC 8032 implementation below; no dependencies
beyond the Python 3 standard library).

Spacerifts seeds (target `spacerift`) are sequences of JSON HTTP bodies for
POST /spacerift, signed genuinely by the harness's four identities and with
the relay nonces the harness hands out, so they replay complete pairings.

Usage: python3 fuzz/seed_corpus.py   (from anywhere; idempotent)
"""

import hashlib
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")

# ----------------------------------------------------------------- Ed25519
# RFC 8032 section 5.1, signing only; slow but we sign a handful of records.
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def _recover_x(y, sign):
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P != 0:
        x = x * SQRT_M1 % P
    if x & 1 != sign:
        x = P - x
    return x


_GY = 4 * pow(5, P - 2, P) % P
G = (_recover_x(_GY, 0), _GY, 1, _recover_x(_GY, 0) * _GY % P)


def _add(a, b):
    A = (a[1] - a[0]) * (b[1] - b[0]) % P
    B = (a[1] + a[0]) * (b[1] + b[0]) % P
    C = 2 * a[3] * b[3] * D % P
    Dd = 2 * a[2] * b[2] % P
    E, F, Gg, H = B - A, Dd - C, Dd + C, B + A
    return (E * F % P, Gg * H % P, F * Gg % P, E * H % P)


def _mul(s, pt):
    q = (0, 1, 1, 0)
    while s:
        if s & 1:
            q = _add(q, pt)
        pt = _add(pt, pt)
        s >>= 1
    return q


def _compress(pt):
    zi = pow(pt[2], P - 2, P)
    x, y = pt[0] * zi % P, pt[1] * zi % P
    return int.to_bytes(y | ((x & 1) << 255), 32, "little")


def _h(*parts):
    return int.from_bytes(hashlib.sha512(b"".join(parts)).digest(), "little")


def ed25519_keypair(seed):
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:], _compress(_mul(a, G))


def ed25519_sign(seed, msg):
    a, prefix, pub = ed25519_keypair(seed)
    r = _h(prefix, msg) % L
    R = _compress(_mul(r, G))
    s = (r + _h(R, pub, msg) * a) % L
    return R + int.to_bytes(s, 32, "little")


# ----------------------------------------------------------------- helpers
def u16(n):
    return struct.pack(">H", n)


def u64(n):
    return struct.pack(">Q", n)


def string(s):
    b = s.encode()
    return u16(len(b)) + b


def op(kind, body=b""):
    return bytes([kind]) + u16(len(body)) + body


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ----------------------------------------------------------------- Spacerifts
# Mirrors fuzz/fuzz_targets/spacerift.rs: identities from seeds 0x11*(i+1),
# relay wall clock 1_700_000_000_000 ms + elapsed, relay nonce of operation
# i = 5a*8 || (i + 1) as u64 BE. Input: cfg (u8), then per operation flags
# (u8), dt (u16 BE), len (u16 BE), body.
RIFT_BASE_MS = 1_700_000_000_000
RIFT_SEEDS = [bytes([0x11 * (i + 1)]) * 32 for i in range(4)]
RIFT_KEYS = [ed25519_keypair(s)[2] for s in RIFT_SEEDS]
F_RESIGN, F_TS, F_NONCE, F_SECS, F_DROP, F_REPEAT = 0x01, 0x08, 0x10, 0x20, 0x40, 0x80


def rift_nonce(step):
    return b"\x5a" * 8 + u64(step + 1)


def rift_body(who, ty, signal, ts, ns="game", nonce=None):
    """A JSON body signed by identity `who` (crates/w2w-server/src/spacerift.rs
    signed_bytes: domain, type, namespace, nonce, signal, ts)."""
    n = nonce or b""
    msg = (b"w2w/v1 spacerift\0" + bytes([len(ty)]) + ty.encode() + string(ns)
           + bytes([len(n)]) + n + struct.pack(">I", len(signal.encode())) + signal.encode() + u64(ts))
    body = {"type": ty, "namespace": ns, "signal": signal, "key": RIFT_KEYS[who].hex(), "ts": ts,
            "sig": ed25519_sign(RIFT_SEEDS[who], msg).hex()}
    if nonce is not None:
        body["nonce"] = nonce.hex()
    return json.dumps(body, separators=(",", ":")).encode()


class Rift:
    """Builds one input; tracks elapsed time and operation index."""

    def __init__(self, cfg=0):
        self.data, self.ms, self.step = bytes([cfg]), 0, 0

    def op(self, body, dt_ms=0, flags=0):
        if dt_ms % 1000 == 0 and dt_ms >= 65536:
            flags |= F_SECS
            dt = dt_ms // 1000
        else:
            dt = dt_ms
        self.ms += dt_ms
        self.data += bytes([flags]) + u16(dt) + u16(len(body)) + body
        self.step += 1
        return self

    def signed(self, who, ty, signal, dt_ms=0, ns="game", nonce=None, flags=0):
        # the nonce the relay handed out at operation `nonce` (an int), if any
        n = rift_nonce(nonce) if isinstance(nonce, int) else nonce
        return self.op(rift_body(who, ty, signal, RIFT_BASE_MS + self.ms + dt_ms, ns, n), dt_ms, flags)

    def resigned(self, who, obj, dt_ms=0, flags=F_TS):
        body = json.dumps(obj, separators=(",", ":")).encode()
        return self.op(body, dt_ms, F_RESIGN | (who << 1) | flags)


def spacerift_seeds(put):
    A, B, C, D = 0, 1, 2, 3
    s = "spacerift"
    # CONNECT -> DEMOTE -> CONNECT(nonce) -> DELIVERED / ANSWER.
    put(s, "link", Rift().signed(A, "CONNECT", "offer-a").signed(B, "CONNECT", "offer-b", 10)
        .signed(B, "CONNECT", "answer-b", 10, nonce=1).data)
    put(s, "link-no-namespace", Rift().signed(A, "CONNECT", "offer-a", ns="")
        .signed(B, "CONNECT", "offer-b", 10, ns="").signed(B, "CONNECT", "answer-b", 10, ns="", nonce=1).data)
    # The same pairing from unsigned bodies the harness re-signs.
    put(s, "link-resigned", Rift()
        .resigned(A, {"type": "CONNECT", "namespace": "game", "signal": "offer-a"})
        .resigned(B, {"type": "CONNECT", "namespace": "game", "signal": "offer-b"}, 10)
        .resigned(B, {"type": "CONNECT", "namespace": "game", "signal": "answer-b"}, 10, F_TS | F_NONCE).data)
    # BOUNCE: Bob gives Alice's offer back and waits; Carol gets an offer.
    put(s, "bounce", Rift().signed(A, "CONNECT", "offer-a").signed(B, "CONNECT", "offer-b", 10)
        .signed(B, "BOUNCE", "offer-b2", 10, nonce=1).signed(C, "CONNECT", "offer-c", 2000).data)
    # Lease expiry: Bob never answers, Dave gets the offer; Bob's nonce is dead.
    put(s, "lease-expiry", Rift().signed(A, "CONNECT", "offer-a").signed(B, "CONNECT", "offer-b", 10)
        .signed(D, "CONNECT", "offer-d", 5100).signed(B, "CONNECT", "late", 10, nonce=1)
        .signed(D, "CONNECT", "answer-d", 10, nonce=2).signed(A, "CONNECT", "offer-a2", 6000)
        .signed(D, "CONNECT", "offer-d2", 10).data)
    # Two leases of the same offerer's two offers to one answerer, both answered.
    put(s, "double-lease", Rift().signed(A, "CONNECT", "offer-a1").signed(B, "CONNECT", "offer-b", 10)
        .signed(A, "CONNECT", "offer-a2", 1000).signed(B, "CONNECT", "offer-b2", 10)
        .signed(B, "CONNECT", "answer-1", 10, nonce=1).signed(B, "CONNECT", "answer-2", 10, nonce=3).data)
    # Request timeout (NO_PEER to the waiting offerer), namespaces.
    put(s, "timeout", Rift().signed(A, "CONNECT", "offer-a", ns="x").signed(B, "CONNECT", "offer-b", 10, ns="y")
        .signed(C, "CONNECT", "offer-c", 16000, ns="x").data)
    # RTT reports steer the choice between two waiting offers (A and B were
    # just linked, so they do not pair again and both wait).
    pa, pb = RIFT_KEYS[A].hex(), RIFT_KEYS[B].hex()
    put(s, "rtt", Rift().signed(C, "RTT", pa + ":200", ns="").signed(C, "RTT", pb + ":20", 1000, ns="")
        .signed(A, "CONNECT", "offer-a", 10, ns="").signed(B, "CONNECT", "offer-b", 10, ns="")
        .signed(B, "CONNECT", "answer-b", 10, ns="", nonce=3)
        .signed(A, "CONNECT", "offer-a2", 5100, ns="").signed(B, "CONNECT", "offer-b2", 10, ns="")
        .signed(C, "CONNECT", "offer-c", 10, ns="").data)
    # Rate limits, a replaced offer, an offerer that goes away, repeated nonces.
    put(s, "rate-limited", Rift().signed(A, "CONNECT", "offer-a").signed(A, "CONNECT", "again", 1)
        .signed(A, "CONNECT", "replaces", 1000).data)
    put(s, "offerer-gone", Rift().signed(A, "CONNECT", "offer-a").signed(B, "CONNECT", "offer-b", 10)
        .signed(B, "CONNECT", "answer-b", 1000, nonce=1, flags=F_DROP).data)
    put(s, "repeated-nonce", Rift().signed(A, "CONNECT", "offer-a").signed(B, "CONNECT", "offer-b", 10, ns="z")
        .signed(C, "CONNECT", "offer-c", 10).signed(D, "CONNECT", "offer-d", 10, ns="z", flags=F_REPEAT).data)
    # Clock skew: the widest policy accepts ts 0; the narrowest only now.
    put(s, "skew-max", Rift(3).op(rift_body(A, "CONNECT", "offer-a", 0)).data)
    put(s, "skew-zero", Rift(1).signed(A, "CONNECT", "offer-a").op(rift_body(B, "CONNECT", "x", RIFT_BASE_MS), 5).data)
    # Single bodies the parser refuses, one per check.
    key, sig = RIFT_KEYS[A].hex(), "00" * 64
    bad = {
        "not-json": b"not json",
        "not-object": b"[1,2,3]",
        "no-type": b'{"signal":"x"}',
        "bad-type": b'{"type":"HELLO","signal":"x"}',
        "no-signal": b'{"type":"CONNECT"}',
        "ns-not-string": b'{"type":"CONNECT","signal":"x","namespace":7}',
        "bad-key": b'{"type":"CONNECT","signal":"x","key":"zz"}',
        "no-ts": ('{"type":"CONNECT","signal":"x","key":"%s"}' % key).encode(),
        "float-ts": ('{"type":"CONNECT","signal":"x","key":"%s","ts":1.5e12,"sig":"%s"}' % (key, sig)).encode(),
        "bad-sig": ('{"type":"CONNECT","signal":"x","key":"%s","ts":%d,"sig":"%s"}' % (key, RIFT_BASE_MS, sig)).encode(),
        "bounce-no-nonce": ('{"type":"BOUNCE","signal":"x","key":"%s","ts":%d,"sig":"%s"}' % (key, RIFT_BASE_MS, sig)).encode(),
        "bad-nonce": ('{"type":"CONNECT","signal":"x","key":"%s","ts":%d,"sig":"%s","nonce":"xyz"}' % (key, RIFT_BASE_MS, sig)).encode(),
        "rtt-no-colon": rift_body(A, "RTT", "nocolon", RIFT_BASE_MS),
        "rtt-bad-ms": rift_body(A, "RTT", pb + ":-1", RIFT_BASE_MS),
    }
    for name, body in bad.items():
        put(s, "body-" + name, Rift().op(body).data)


def main():
    with open(os.path.join(ROOT, "testdata", "vectors.json")) as f:
        v = json.load(f)
    with open(os.path.join(ROOT, "testdata", "seal_vectors.json")) as f:
        sv = json.load(f)
    counts = {}

    def put(target, name, data):
        write(target, name, data)
        counts[target] = counts.get(target, 0) + 1

    # Frame decoders: every vector frame for its direction(s).
    for fr in v["frames"]:
        b = bytes.fromhex(fr["hex"])
        if fr["direction"] in ("c2r", "both"):
            put("client_to_relay", fr["name"], b)
        if fr["direction"] in ("r2c", "both"):
            put("relay_to_client", fr["name"], b)
    for fr in v["invalid_frames"]:
        b = bytes.fromhex(fr["hex"])
        target = "client_to_relay" if fr["direction"] == "c2r" else "relay_to_client"
        put(target, "invalid-" + fr["name"], b)
    for chk in v["registration_checks"]:
        for k in ("register", "confirm"):
            if chk.get(k):
                put("client_to_relay", "check-%s-%s" % (chk["name"], k), bytes.fromhex(chk[k]))

    frames = {fr["name"]: bytes.fromhex(fr["hex"]) for fr in v["frames"]}
    reg = v["registration"]
    relay_seed = bytes.fromhex(reg["relay_seed"])
    relay_key = bytes.fromhex(reg["relay_key"])
    register = frames["register"]

    # Relay-to-relay frames (crates/w2w-proto/src/s2s.rs), signed genuinely.
    url = "ws://127.0.0.1:7777/"
    neighbors = sorted(bytes.fromhex(i["address"]) for i in v["identities"] if i["name"] != "relay")
    seq = 1_700_000_000_123
    ls_signed = (b"w2w/v1 link-state\0" + relay_key + string(url) + u64(seq)
                 + u16(len(neighbors)) + b"".join(neighbors))
    ls = (b"\x01\x40" + relay_key + string(url) + u64(seq) + u16(len(neighbors))
          + b"".join(neighbors) + ed25519_sign(relay_seed, ls_signed))
    put("relay_to_relay", "link_state", ls)
    # PRESENCE: the vector REGISTER's proof fields, then online + relay sig.
    # REGISTER body: role(1) relay_key(32) client_key(32) client_nonce(32)
    # timestamp(8) url(2+n) sig_a(64).
    body = register[2:]
    client_key, client_nonce = body[33:65], body[65:97]
    timestamp = struct.unpack(">Q", body[97:105])[0]
    (ulen,) = struct.unpack(">H", body[105:107])
    reg_url = body[107:107 + ulen]
    sig_a = body[107 + ulen:107 + ulen + 64]
    relay_nonce = bytes.fromhex(reg["relay_nonce"])
    for online in (1, 0):
        relay_sig = ed25519_sign(
            relay_seed, b"w2w/v1 presence\0" + client_key + u64(timestamp) + bytes([online]))
        pres = (b"\x01\x41" + client_key + relay_key + relay_nonce + client_nonce
                + u64(timestamp) + u16(len(reg_url)) + reg_url + sig_a + bytes([online]) + relay_sig)
        put("relay_to_relay", "presence_%s" % ("online" if online else "left"), pres)
    msg = frames["msg_a2g"]
    put("relay_to_relay", "forward_relay",
        b"\x01\x42" + relay_key + b"\x02" + b"\x01" + relay_key + u16(2)
        + neighbors[0] + neighbors[1] + msg)
    put("relay_to_relay", "forward_broadcast",
        b"\x01\x42" + relay_key + b"\x00" + b"\x02" + frames["msg_a2n_federation"])
    entries = neighbors[0] + b"\x00" + u16(0) + neighbors[1] + b"\x02" + u16(16)
    put("relay_to_relay", "fwd_receipt",
        b"\x01\x43" + relay_key + neighbors[0] + bytes(range(16)) + b"\x03"
        + struct.pack(">I", 1) + u16(2) + entries)
    put("relay_to_relay", "redirect",
        b"\x01\x44" + b"\x02" + string("ws://127.0.0.2:7777/") + string("wss://relay.example/"))
    # The s2s vectors: every relay-to-relay type, the directory frames too.
    with open(os.path.join(ROOT, "testdata", "s2s_vectors.json")) as f:
        for v in json.load(f)["vectors"]:
            put("relay_to_relay", "vector_" + v["name"], bytes.fromhex(v["frame"]))

    # Named groups (crates/w2w-proto/src/group.rs): signed GROUP ops in a
    # REQUEST (op 4), GROUP_INFO (op 5), a MSG to a group (route 5), and the
    # RESPONSE carrying a group.
    client_seed = bytes.fromhex(reg["client_seed"])
    client_key = bytes.fromhex(reg["client_key"])
    bob = neighbors[0]
    actions = [b"\x01", b"\x02" + bob, b"\x03" + bob, b"\x04" + bob + b"\x01"]
    for i, action in enumerate(actions):
        name = b"team"
        seq = 7 + i
        sig = ed25519_sign(client_seed, b"w2w/v1 group\0" + bytes([len(name)]) + name + action + u64(seq))
        body = u16(len(name)) + name + action + u64(seq) + client_key + sig
        put("client_to_relay", "group_op_%d" % (action[0]), b"\x01\x20" + struct.pack(">I", 40 + i) + b"\x04" + body)
    put("client_to_relay", "group_info", b"\x01\x20" + struct.pack(">I", 50) + b"\x05" + string("team"))
    group_msg = (b"\x01\x10\x05\x01" + bytes(range(16)) + client_key + b"\x04team" + b"sealed payload")
    put("client_to_relay", "msg_group", group_msg)
    put("relay_to_client", "msg_group", group_msg)
    info = string("team") + client_key + u16(2) + client_key + b"\x01" + bob + b"\x00"
    for op_byte in (4, 5):
        put("relay_to_client", "response_group_op%d" % op_byte,
            b"\x01\x21" + struct.pack(">I", 40) + bytes([op_byte]) + u16(0) + info)

    # Handshake: cfg, dt (i16 seconds), then (op, len, bytes)*.
    z = u16(0)
    put("handshake", "relay-vector",
        b"\x00" + z + op(0, register) + op(0, frames["confirm"]))
    put("handshake", "relay-vector-replay",
        b"\x04" + z + op(0, register) + op(0, register) + op(0, frames["confirm"]))
    put("handshake", "relay-honest", b"\x00" + z + op(1) + op(2))
    put("handshake", "relay-honest-role-relay", b"\x12" + z + op(1) + op(2))
    put("handshake", "relay-honest-tampered", b"\x00" + z + op(1, b"\x00\x40\x01") + op(2))
    put("handshake", "relay-stale", b"\x00" + u16(61) + op(1) + op(2))
    put("handshake", "client-vector",
        b"\x01" + z + op(0, frames["challenge"]) + op(0, frames["countersign"])
        + op(0, frames["reply_back"]))
    put("handshake", "client-vector-pinned",
        b"\x03" + z + op(0, frames["challenge"]) + op(0, frames["countersign"])
        + op(0, frames["reply_back"]))
    put("handshake", "client-honest", b"\x01" + z + op(1) + op(2) + op(3))
    put("handshake", "client-honest-long-url", b"\x21" + z + op(1) + op(2) + op(3))
    put("handshake", "client-honest-tampered", b"\x03" + z + op(1, b"\x00\x03\x01") + op(2) + op(3))

    # Seal: mode (me = mode & 3: alice bob carol eve; from = (mode >> 2) & 3:
    # alice bob carol input), [id], [from], payload.
    for i, s in enumerate(sv["sealed"]):
        sealed = bytes.fromhex(s["sealed"])
        put("seal_open", "sealed%d-bob" % i, b"\x01" + sealed)
        put("seal_open", "sealed%d-carol" % i, b"\x02" + sealed)
        put("seal_open", "sealed%d-eve" % i, b"\x03" + sealed)
        put("seal_open", "sealed%d-bob-id" % i, b"\x11" + bytes.fromhex(s["msg_id"]) + sealed)
        put("seal_open", "sealed%d-bob-from" % i,
            b"\x0d" + bytes.fromhex(sv["identities"]["alice"]["address"]) + sealed)
    for i, s in enumerate(sv["signed"]):
        put("seal_open", "signed%d" % i, b"\x01" + bytes.fromhex(s["payload"]))
        put("seal_open", "signed%d-from" % i,
            b"\x0d" + bytes.fromhex(s["from"]) + bytes.fromhex(s["payload"]))
    put("seal_open", "roundtrip", b"\x40\x00hello")
    put("seal_open", "roundtrip-extra",
        b"\x40\x01" + bytes.fromhex(sv["identities"]["alice"]["address"]) + b"hi")

    spacerift_seeds(put)

    for t in sorted(counts):
        print("%-16s %3d seeds -> %s" % (t, counts[t], os.path.relpath(os.path.join(CORPUS, t), ROOT)))


if __name__ == "__main__":
    sys.exit(main())
