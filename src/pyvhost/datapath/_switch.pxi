# The switch's forward step, compiled: included by _native.pyx (it shares its ring walk,
# copy and publish functions, inlined). pyvhost.switch.forward is its pure-Python
# reference; the differential test (tests/datapath/test_switch_differential.py) holds
# them equal. The API is described there; in short, per burst of one transmit queue:
#
#   pull(mem, tx, hdr_len, limit)   take chains, read each frame's MACs (no copy)
#   macs()                          the distinct MACs, for the Python MAC table
#   push(mem, start, masks, same_at, slow, outs)
#                                   copy each frame from the transmitting guest's buffers
#                                   straight into the receive buffers of its egress ports
#                                   (of a port with several enabled receive queues, the
#                                   one its flow hash picks: switch.flow, in C here)
#   frame(k)                        the bytes of frame k, for the Python path
#   finish(mem, tx)                 return the transmitted chains, decide the notification
#   again(mem, tx, limit, bursts, masks, same_at, slow, outs)
#                                   after a burst pushed whole: finish it, then more bursts
#                                   of the same MACs with the same routes, each pulled,
#                                   pushed and finished here, without Python in between
#
# Offload headers (issue 12): a header with flags or gso_type set is checked in pull by
# vnet_check, switch.offload.check_ingress's checks for a driver, and the frame is kept
# with its header (or dropped as malformed); push writes that header to a port that takes
# it as it is (its negotiated GUEST_CSUM / GUEST_TSO4/6: switch.offload.needs) and stops
# at the frame otherwise (checksum completion or segmentation: the Python path).
#
# Memory safety: as in the reflector. Chains are walked by walk() (every guest number
# bounded there), frames are read through the pieces walk() stored, each inside one
# region; each egress port's receive chains are walked against that port's own table.

cdef enum:
    MAX_MACS = 16           # distinct destination (and source) MACs per burst
    NEVER = 0x7FFFFFFF
    MAX_OUTS = 64           # egress ports per push (a route is a 64-bit mask)
    HASHED = 14 + 60 + 4    # bytes of a frame the flow hash reads (switch.flow.HASHED)
    # Bytes of an Ethernet frame vnet_check reads at most: an Ethernet header, one VLAN
    # tag, an IPv4 header of 60 bytes, a TCP header of 60 (its data offset's largest).
    CHECKED = 14 + 4 + 60 + 60
    # Offloads (switch.offload.Offload) and the header's values (virtio 1.2, 5.1.6).
    OFF_CSUM = 1
    OFF_TSO4 = 2
    OFF_TSO6 = 4
    F_NEEDS_CSUM = 1
    GSO_NONE = 0
    GSO_TCPV4 = 1
    GSO_TCPV6 = 4
    MAX_SEGMENTS = 1400     # switch.offload.MAX_SEGMENTS

# What pull and push count (Forwarder.stats, forward.STATS order).
cdef enum:
    F_MALFORMED, F_TOO_BIG, F_SAME_PORT, F_FRAMES, F_BYTES
    NFSTATS

# What push counts per egress port (forward.OUT_STATS order).
cdef enum:
    O_SENT, O_BYTES, O_TOO_BIG, O_NO_RX, O_BAD
    NOSTATS

_FSTATS = ("malformed", "too_big", "same_port", "frames", "bytes")


cdef struct Frame:          # a frame pull kept, its chain not yet returned
    uint16_t head
    size_t start            # its first piece in Fwd.allp
    size_t npieces
    uint64_t total          # readable bytes: in_hdr + the Ethernet frame (checked)
    uint8_t dst             # < ndst
    uint8_t src             # < nsrc
    uint8_t need            # the offloads a receiver needs to take it as it is (or 0)
    uint8_t vnet[10]        # its header's flags .. csum_offset, checked (zero if need 0)


cdef struct OutPort:        # one receive queue of an egress port during one push
    Burst b                 # its table, ring, scratch arrays
    uint64_t st[NOSTATS]
    uint64_t routed, done
    uint64_t max_eth        # the largest Ethernet frame it takes (mtu + overhead)
    uint64_t acc[NOSTATS]   # again(): st summed over the call's bursts
    Ring snap               # again(): the ring as the burst in progress found it


cdef struct Fwd:
    Burst b                 # the ingress side: its table, tx ring, tx used elements
    Pieces allp             # the readable pieces of every kept frame
    Frame *frames
    size_t nframes, frames_cap
    uint8_t dsts[MAX_MACS][6]
    uint8_t srcs[MAX_MACS][6]
    uint32_t src_first[MAX_MACS]
    size_t ndst, nsrc
    int more                # pull stopped before the ring was empty
    uint32_t offload        # what the sender negotiated (OFF_*): pull checks against it
    uint64_t st[NFSTATS]
    OutPort *outs           # the egress ports' receive queues: port o's are
    size_t nouts, outs_cap  # outs[lane0[o] .. lane0[o] + nq[o]), nouts ports
    size_t nlanes           # receive queues in all
    uint32_t lane0[MAX_OUTS]
    uint32_t nq[MAX_OUTS]   # >= 1
    uint64_t masks[MAX_MACS]
    uint32_t same_at[MAX_MACS]
    uint8_t slowr[MAX_MACS]
    uint8_t accepts[MAX_OUTS]   # each egress port's negotiated receive offloads (OFF_*)
    size_t k                # push's position
    pv_table tables[MAX_OUTS + 1]   # push and again: the ingress's, then each port's
    # A frame for several ports is read once, into fan (BOUNCE bytes), before any of them
    # is written: a receive buffer of one port may overlap the transmitted buffer (the
    # same guest's memory), and the next port must get the frame as it was sent, as the
    # reference reads it once (forward.Forwarder.push). fanp is the one piece over it.
    uint8_t *fan
    Piece fanp
    # again(): a closed pull (only the last burst's MACs, no offload header), the bursts
    # allowed and done, the chains taken in all and by the last pull, and what a fault
    # in the burst in progress goes back to.
    int closed
    int in_burst
    uint32_t bursts, done_bursts, last_taken
    uint64_t taken_total, snap_taken
    Ring snap_tx
    uint64_t snap_st[NFSTATS]


cdef inline int mac_index(uint8_t (*macs)[6], size_t n, const uint8_t *mac) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if memcmp(macs[i], mac, 6) == 0:
            return <int>i
    return -1


# -- the flow hash (switch.flow.flow_hash, zlib's CRC-32) -------------------------------------
# Eight tables, for eight bytes per step ("slicing-by-8"): the same CRC-32 as zlib's, with
# eight independent lookups per step instead of a chain of eight dependent ones. Profiled
# at 2 queue pairs (64 B), the hash was a quarter of the back-end's samples, the first
# touch of each frame's IP header included (BENCHMARKS.md, "a cheaper flow hash"). The
# fields are hashed where they lie, each a short run (12, 8, 1, 4 bytes): a tail of four
# bytes takes one step of four lookups (slicing by 4, the same tables), not four
# dependent one-byte steps; profiled again, the hash fell from 40% of the samples to 11%
# (BENCHMARKS.md, issue 12, 2026-12-07 evening).
cdef uint32_t CRC32[8][256]


cdef void crc32_init() noexcept:
    """The tables of the reflected CRC-32 polynomial zlib uses (0xEDB88320): CRC32[0] for
    one byte, CRC32[k] for a byte followed by k zero bytes."""
    cdef uint32_t i, c, k
    for i in range(256):
        c = i
        for k in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        CRC32[0][i] = c
    for i in range(256):
        for k in range(1, 8):
            CRC32[k][i] = (CRC32[k - 1][i] >> 8) ^ CRC32[0][CRC32[k - 1][i] & 0xFF]


crc32_init()


cdef inline uint32_t le32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint32_t crc32_add(uint32_t crc, const uint8_t *p, size_t n) noexcept nogil:
    """zlib.crc32(p[:n], crc): reads p[0] .. p[n - 1] and nothing else."""
    cdef uint32_t one, two
    crc = ~crc
    while n >= 8:
        one = le32(p) ^ crc
        two = le32(p + 4)
        crc = (CRC32[7][one & 0xFF] ^ CRC32[6][(one >> 8) & 0xFF]
               ^ CRC32[5][(one >> 16) & 0xFF] ^ CRC32[4][one >> 24]
               ^ CRC32[3][two & 0xFF] ^ CRC32[2][(two >> 8) & 0xFF]
               ^ CRC32[1][(two >> 16) & 0xFF] ^ CRC32[0][two >> 24])
        p += 8
        n -= 8
    if n >= 4:                               # slicing by 4: the same tables' low half
        one = le32(p) ^ crc
        crc = (CRC32[3][one & 0xFF] ^ CRC32[2][(one >> 8) & 0xFF]
               ^ CRC32[1][(one >> 16) & 0xFF] ^ CRC32[0][one >> 24])
        p += 4
        n -= 4
    while n:
        crc = CRC32[0][(crc ^ p[0]) & 0xFF] ^ (crc >> 8)
        p += 1
        n -= 1
    return ~crc


cdef inline uint32_t crc_slice(uint32_t crc, const uint8_t *e, size_t a, size_t b,
                               size_t n) noexcept nogil:
    """The CRC ``crc`` continued over e[a:b] where e holds n bytes (Python's slice, cut
    at the end: nothing past e[n - 1] is read)."""
    if b > n:
        b = n
    if a >= b:
        return crc
    return crc32_add(crc, e + a, b - a)


cdef uint32_t flow_hash(const Pieces *frame, uint64_t total, uint32_t h) noexcept nogil:
    """switch.flow.flow_hash of the frame in ``frame`` (``total`` bytes: an ``h``-byte
    header, then the Ethernet frame), step for step: the fields it hashes go through
    the CRC one after another, where they lie (a CRC over pieces in turn is the CRC of
    their concatenation: no key is built, no byte copied).

    It reads the first HASHED bytes of the Ethernet frame at most (no field it hashes
    lies further): in place when the first piece holds them (``got`` bytes, one
    descriptor's buffer inside one region), else gathered into ``buf``. ``total >= h +
    14`` (pull), the pieces hold ``total`` bytes, and every index below is checked
    against ``n``, the bytes there, as Python's slices cut at the end. Read in place, a
    byte the guest changes meanwhile changes only the hash (``ihl`` is read once, and no
    index depends on a byte read twice), never where it reads."""
    cdef uint8_t buf[12 + HASHED]
    cdef uint64_t soff
    cdef uint64_t got = total if total < h + HASHED else h + HASHED
    cdef const uint8_t *e
    cdef size_t n, ihl
    cdef uint8_t proto
    cdef uint32_t crc
    if frame.len and frame.v[0].n >= got:
        e = frame.v[0].p + h
    else:
        gather(frame, buf, got, &soff)
        e = buf + h
    n = <size_t>(got - h)                    # 14 .. HASHED; the frame's length if shorter
    if e[12] == 0x08 and e[13] == 0x00 and n >= 14 + 20:
        ihl = (e[14] & 0xF) * 4
        proto = e[23]                        # read once: the byte hashed is the byte tested
        crc = crc32_add(0, e, 12)            # the Ethernet addresses
        crc = crc32_add(crc, e + 26, 8)      # the IP addresses
        crc = crc32_add(crc, &proto, 1)      # the protocol
        # The ports only where they are: TCP or UDP, not a fragment (offset 0, no MF).
        if (proto == 6 or proto == 17) and not ((e[20] & 0x3F) | e[21]):
            crc = crc_slice(crc, e, 14 + ihl, 14 + ihl + 4, n)
        return crc
    if e[12] == 0x86 and e[13] == 0xdd and n >= 14 + 40:
        proto = e[20]                        # next header
        crc = crc32_add(0, e, 12)
        crc = crc32_add(crc, e + 22, 32)     # the IPv6 addresses
        crc = crc32_add(crc, &proto, 1)
        if proto == 6 or proto == 17:
            crc = crc_slice(crc, e, 54, 58, n)
        return crc
    return crc32_add(0, e, 14)


def frame_flow_hash(frame: bytes, size_t start, size_t cut=0) -> int:
    """The compiled flow hash of ``frame`` (a ``start``-byte header, 10 or 12, then an
    Ethernet frame of 14 bytes or more): for tests against switch.flow.flow_hash. With
    ``cut`` (0 < cut < len(frame)) the frame is seen as two pieces, split there, as a
    chain of two descriptors would give it."""
    cdef Piece piece[2]
    cdef Pieces view
    cdef size_t n = len(frame)
    if (start != 10 and start != 12) or n < start + 14 or n > 0xFFFFFFFF:
        raise ValueError("a 10- or 12-byte header, then 14 bytes or more")
    if cut >= n:
        raise ValueError("cut must be inside the frame")
    piece[0].p = <uint8_t *>PyBytes_AS_STRING(frame)
    piece[0].n = <uint32_t>(cut if cut else n)
    piece[0].region = 0
    piece[1].p = piece[0].p + cut
    piece[1].n = <uint32_t>(n - cut)
    piece[1].region = 0
    view.v = piece
    view.len = 2 if cut else 1
    view.cap = 2
    return flow_hash(&view, n, <uint32_t>start)


cdef inline uint32_t le16(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8)


cdef inline uint32_t be16(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef int vnet_check(const uint8_t *hd, const uint8_t *e, uint64_t n,
                    uint32_t allowed) noexcept nogil:
    """switch.offload.check_ingress for a driver (``kernel`` false), of a header whose
    flags or gso_type are not zero: -1 if it refuses the frame (malformed), else what a
    receiver needs to take the frame as it is (switch.offload.needs).

    ``hd`` is the header (10 bytes read), ``e`` the first min(n, CHECKED) bytes of the
    Ethernet frame, ``n`` its length (14 .. MAX_FRAME: pull). Memory safety: every field
    of ``hd`` is guest-controlled and is only compared, never used as an index; every
    index into ``e`` is a constant or an offset bounded by the layout (l3 <= 18, an IPv4
    header length <= 60, l4 <= 78, a TCP header <= 60: each below CHECKED) and is read
    only after a check that ``n`` is past it, so it lies inside the bytes gathered."""
    cdef uint32_t flags = hd[0], gso = hd[1]
    cdef uint64_t hdr_len = le16(hd + 2), gso_size = le16(hd + 4)
    cdef uint64_t csum_start = le16(hd + 6), csum_offset = le16(hd + 8)
    cdef uint64_t l3 = 14, l4, ihl, doff, payload
    cdef uint32_t ethertype, need
    cdef int needs_csum
    # "The driver MUST NOT set the VIRTIO_NET_HDR_F_DATA_VALID and
    # VIRTIO_NET_HDR_F_RSC_INFO bits in flags."
    if flags & ~F_NEEDS_CSUM:
        return -1
    needs_csum = flags & F_NEEDS_CSUM
    if needs_csum:
        # "If VIRTIO_NET_F_CSUM is not negotiated, the driver MUST set flags to zero".
        if not allowed & OFF_CSUM:
            return -1
        # The checksum field lies inside the frame (both fields < 2**16: no overflow).
        if csum_start + csum_offset + 2 > n:
            return -1
    if hdr_len > n:
        return -1
    if gso == GSO_NONE:
        return OFF_CSUM                      # flags is NEEDS_CSUM here
    if gso == GSO_TCPV4:
        need = OFF_TSO4
    elif gso == GSO_TCPV6:
        need = OFF_TSO6
    else:
        return -1                            # UDP or the ECN bit: never offered
    # "If none of the VIRTIO_NET_F_HOST_TSO4, TSO6 or UFO options have been negotiated,
    # the driver MUST set gso_type to VIRTIO_NET_HDR_GSO_NONE."
    if not allowed & need:
        return -1
    # "If gso_type differs from VIRTIO_NET_HDR_GSO_NONE, then the driver MUST also set
    # the VIRTIO_NET_HDR_F_NEEDS_CSUM bit in flags and MUST set gso_size to indicate the
    # desired MSS."
    if not needs_csum:
        return -1
    # switch.offload.tcp_layout, on Ethernet offsets (n >= 14: e[12], e[13] are there).
    ethertype = be16(e + 12)
    if ethertype == 0x8100:
        l3 = 18
        if n < l3:
            return -1
        ethertype = be16(e + 16)
    if gso == GSO_TCPV4:
        if ethertype != 0x0800 or n < l3 + 20 or e[l3] >> 4 != 4:
            return -1
        ihl = (e[l3] & 0xF) * 4
        if ihl < 20 or n < l3 + ihl:
            return -1
        if be16(e + l3 + 2) != n - l3:
            return -1
        if be16(e + l3 + 6) & 0x3FFF:        # a fragment
            return -1
        if e[l3 + 9] != 6:                   # not TCP
            return -1
        l4 = l3 + ihl
    else:
        if ethertype != 0x86DD or n < l3 + 40 or e[l3] >> 4 != 6:
            return -1
        if e[l3 + 6] != 6:                   # not TCP (no extension headers)
            return -1
        if be16(e + l3 + 4) != n - l3 - 40:
            return -1
        l4 = l3 + 40
    if n < l4 + 20:
        return -1
    doff = (e[l4 + 12] >> 4) * 4
    if doff < 20 or n < l4 + doff:
        return -1
    if csum_start != l4 or csum_offset != 16:    # the TCP checksum
        return -1
    payload = n - l4 - doff
    if gso_size == 0 or gso_size > MAX_FRAME:
        return -1
    if payload == 0:
        return -1
    if (payload + gso_size - 1) // gso_size > MAX_SEGMENTS:
        return -1
    return need


cdef void unpull(Fwd *f, size_t start) noexcept nogil:
    """Give the chain just taken back to the ring (SplitQueue.unpop(1)): it is walked
    again by the next pull."""
    f.b.tx.last_avail -= 1
    f.b.taken -= 1
    f.b.tx_used_len -= 1
    f.allp.len = start
    f.more = 1


cdef int pull_fn(void *arg) noexcept nogil:
    """forward.Forwarder.pull, step for step."""
    cdef Fwd *f = <Fwd *>arg
    cdef Burst *b = &f.b
    cdef uint64_t total, soff
    cdef uint16_t head
    cdef uint32_t n, h = b.in_hdr
    cdef size_t start, i
    cdef int rc, di, si, need
    cdef uint8_t hdr[24]
    cdef uint8_t whole[12 + CHECKED]
    cdef uint64_t got
    cdef Pieces view
    cdef Frame *fr
    enable_kicks(&b.tx, 0)
    while b.taken < b.limit:
        start = f.allp.len
        rc = pop(b, &b.tx, 0, &f.allp, h + MAX_FRAME + 1, &total, &head)
        if rc == EMPTY:
            enable_kicks(&b.tx, 1)
            pv_fence()                       # as in reflect(): the kick request first
            rc = pending(b, &b.tx, &n)
            if rc:
                b.err = rc
                break
            if n == 0:
                break
            enable_kicks(&b.tx, 0)
            continue
        if rc:
            b.err = rc
            break
        b.taken += 1
        if reserve(<void **>&b.tx_used, &b.tx_used_cap, b.tx_used_len + 1, sizeof(Used)):
            b.err = E_NOMEM
            break
        b.tx_used[b.tx_used_len].id = head
        b.tx_used[b.tx_used_len].len = 0
        b.tx_used_len += 1
        # total is the chain's readable length (guest-controlled, a sum of u32s): only a
        # frame between a header plus an Ethernet header and the largest frame is kept.
        if total < h + 14:
            f.st[F_MALFORMED] += 1
            f.allp.len = start
            continue
        if total > h + MAX_FRAME:
            f.st[F_TOO_BIG] += 1
            f.allp.len = start
            continue
        # The header and both MACs: h + 12 < total bytes, inside the stored pieces.
        view.v = f.allp.v + start
        view.len = f.allp.len - start
        view.cap = view.len
        gather(&view, hdr, h + 12, &soff)
        if f.closed and (hdr[0] or hdr[1]):
            unpull(f, start)                 # again(): an offload header is Python's
            break
        need = 0
        if hdr[0] or hdr[1]:
            # An offload header (flags, gso_type): check_ingress's checks on the header
            # and the frame's first min(total, h + CHECKED) bytes (inside the pieces,
            # which hold total bytes; whole holds 12 + CHECKED >= h + CHECKED).
            got = total if total < h + CHECKED else h + CHECKED
            gather(&view, whole, got, &soff)
            need = vnet_check(whole, whole + h, total - h, f.offload)
            if need < 0:
                f.st[F_MALFORMED] += 1
                f.allp.len = start
                continue
        # Flags and gso_type zero: no offload; the other fields are not kept (zeroed).
        di = mac_index(f.dsts, f.ndst, hdr + h)
        si = mac_index(f.srcs, f.nsrc, hdr + h + 6)
        if (f.closed and (di < 0 or si < 0)) or \
                (di < 0 and f.ndst == MAX_MACS) or (si < 0 and f.nsrc == MAX_MACS):
            unpull(f, start)
            break
        if di < 0:
            memcpy(f.dsts[f.ndst], hdr + h, 6)
            di = <int>f.ndst
            f.ndst += 1
        if si < 0:
            memcpy(f.srcs[f.nsrc], hdr + h + 6, 6)
            f.src_first[f.nsrc] = <uint32_t>f.nframes
            si = <int>f.nsrc
            f.nsrc += 1
        if reserve(<void **>&f.frames, &f.frames_cap, f.nframes + 1, sizeof(Frame)):
            b.err = E_NOMEM
            break
        fr = &f.frames[f.nframes]
        fr.head = head
        fr.start = start
        fr.npieces = f.allp.len - start
        fr.total = total
        fr.dst = <uint8_t>di
        fr.src = <uint8_t>si
        fr.need = <uint8_t>need
        if need:
            memcpy(fr.vnet, hdr, 10)
        else:
            memset(fr.vnet, 0, 10)
        f.nframes += 1
        f.st[F_FRAMES] += 1
        f.st[F_BYTES] += total - h
    return 0


cdef int push_fn(void *arg) noexcept nogil:
    """forward.Forwarder.push, step for step."""
    cdef Fwd *f = <Fwd *>arg
    cdef size_t k = f.k, o
    cdef Frame *fr
    cdef OutPort *out
    cdef uint64_t eth, mask, m
    cdef uint32_t hashed, lane
    cdef Pieces view
    cdef Piece *src
    cdef size_t nsrc
    cdef uint64_t soff
    cdef int rc, drop, j, have_hash
    while k < f.nframes:
        fr = &f.frames[k]
        j = fr.dst                           # < ndst <= MAX_MACS (pull)
        if k >= f.same_at[j]:
            f.st[F_SAME_PORT] += 1
            k += 1
            continue
        if f.slowr[j]:
            break
        mask = f.masks[j]                    # bits below nouts only (push's Python side)
        if fr.need:
            # "If VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set flags to
            # zero and SHOULD supply a fully checksummed packet to the driver"; "If none
            # of the VIRTIO_NET_F_GUEST_TSO4, TSO6 ... options have been negotiated, the
            # device MUST set gso_type to VIRTIO_NET_HDR_GSO_NONE": a port without what
            # the header needs gets the frame from the Python path (adapt_egress).
            m = mask
            o = 0
            while m:
                if m & 1 and fr.need & ~f.accepts[o]:   # o < nouts <= MAX_OUTS
                    break
                m >>= 1
                o += 1
            if m:
                break
        eth = fr.total - f.b.in_hdr          # 14 .. MAX_FRAME (pull)
        src = f.allp.v + fr.start
        nsrc = fr.npieces
        if mask & (mask - 1):
            # Several ports: the frame as sent, read once before any of them is written
            # (see Fwd.fan). Its pieces hold fr.total bytes (pull stored them up to more
            # than the largest frame), and fr.total <= in_hdr + MAX_FRAME < BOUNCE, the
            # size of fan.
            view.v = src
            view.len = nsrc
            view.cap = nsrc
            gather(&view, f.fan, fr.total, &soff)
            f.fanp.p = f.fan
            f.fanp.n = <uint32_t>fr.total
            f.fanp.region = 0                # read only: no write counted, no mark
            f.fanp.gpa = 0
            f.fanp.first = 1
            src = &f.fanp
            nsrc = 1
        have_hash = 0
        hashed = 0
        o = 0
        while mask:
            if mask & 1:
                # The port's receive queue for this frame: its flow's, if it has several.
                lane = f.lane0[o]
                if f.nq[o] > 1:
                    if not have_hash:
                        view.v = src
                        view.len = nsrc
                        view.cap = nsrc
                        hashed = flow_hash(&view, fr.total, f.b.in_hdr)
                        have_hash = 1
                    lane += hashed % f.nq[o]     # < lane0[o] + nq[o] <= nlanes
                out = &f.outs[lane]
                # A GSO frame is not held to the mtu: the receive buffers decide (as
                # SwitchPort._egress).
                if eth > out.max_eth and not fr.vnet[1]:
                    out.st[O_TOO_BIG] += 1
                else:
                    out.routed += 1
                    if not out.b.err:
                        out.b.txp.v = src
                        out.b.txp.len = nsrc
                        out.b.txp.cap = nsrc
                        memcpy(out.b.vnet, fr.vnet, 10)
                        rc = write_frame(&out.b, out.b.hdr_len + eth, &drop)
                        if rc:
                            out.b.err = rc
                        else:
                            out.done += 1
                            if drop == DROP_NO_RX:
                                out.st[O_NO_RX] += 1
                            elif drop:
                                out.st[O_TOO_BIG] += 1
                            else:
                                out.st[O_SENT] += 1
                                out.st[O_BYTES] += eth
            mask >>= 1
            o += 1
        k += 1
    f.k = k
    for o in range(f.nlanes):
        out = &f.outs[o]
        if out.b.err:
            # _fill's rule: the frames of this call not written and those written but
            # never returned (the queue is broken) count as bad_descriptor.
            out.st[O_BAD] += out.routed - out.done + out.st[O_SENT]
            out.st[O_SENT] = 0
            out.st[O_BYTES] = 0
        elif out.b.rx_used_len:
            publish(&out.b.rx, out.b.rx_used, out.b.rx_used_len)
            decide(&out.b.rx)
    return 0


cdef int finish_fn(void *arg) noexcept nogil:
    cdef Fwd *f = <Fwd *>arg
    publish(&f.b.tx, f.b.tx_used, f.b.tx_used_len)
    decide(&f.b.tx)
    return 0


cdef int again_fn(void *arg) noexcept nogil:
    """forward.Forwarder.again, step for step: finish the caller's burst, then up to
    ``bursts`` closed pulls, each pushed whole (no slow route, no offload header: push_fn
    never stops early) and finished. Before each burst the state it started from is
    kept (snap_*): a guest-memory fault inside it puts that state back (again's
    wrapper), so the burst's chains go back to their rings unreturned and unwritten."""
    cdef Fwd *f = <Fwd *>arg
    cdef Burst *b = &f.b
    cdef size_t o, i
    cdef OutPort *out
    cdef int stop
    if b.tx_used_len:
        publish(&b.tx, b.tx_used, b.tx_used_len)
        decide(&b.tx)
        b.tx_used_len = 0
    while f.done_bursts < f.bursts:
        f.snap_tx = b.tx
        f.snap_taken = f.taken_total
        memcpy(f.snap_st, f.st, sizeof(f.st))
        for o in range(f.nlanes):
            f.outs[o].snap = f.outs[o].b.rx
        f.in_burst = 1
        pv_fence()              # the state kept is in memory before any guest access
        b.taken = 0
        f.allp.len = 0
        f.nframes = 0
        f.more = 0
        pull_fn(f)
        f.taken_total += b.taken
        f.last_taken = b.taken
        stop = 0
        if f.nframes:
            for o in range(f.nlanes):
                out = &f.outs[o]
                out.b.rx_used_len = 0
                out.routed = out.done = 0
                memset(out.st, 0, sizeof(out.st))
            f.k = 0
            push_fn(f)
            for o in range(f.nlanes):
                out = &f.outs[o]
                for i in range(NOSTATS):
                    out.acc[i] += out.st[i]
                if out.b.err:
                    stop = 1
        pv_fence()
        f.in_burst = 0
        f.done_bursts += 1
        if b.err:
            break               # the queue broke: the frames before went, none returned
        if b.tx_used_len:
            publish(&b.tx, b.tx_used, b.tx_used_len)
            decide(&b.tx)
            b.tx_used_len = 0
        if stop or b.taken < b.limit:
            break
    return 0


cdef void free_burst(Burst *b) noexcept nogil:
    free(b.rxp.v)
    free(b.rxc)
    free(b.rx_used)
    free(b.tx_used)
    free(b.bounce)


cdef object _first(list errors, size_t start, size_t n):
    """The first error of ``errors[start:start + n]`` that is not None, or None."""
    cdef size_t i
    for i in range(start, start + n):
        e = errors[i]
        if e is not None:
            return e
    return None


def _fault(fault: int) -> MemoryFaultError:
    return MemoryFaultError(
        f"SIGBUS at host address {fault:#x} in guest memory: a region's file shrank "
        "under its mapping (ftruncate by the front-end?)")


cdef class Forwarder:
    """The switch's forward step (see forward.Forwarder for the API and its rules).

    Not re-entrant: one burst at a time per instance (a port owns one per transmit
    queue). Between pull and finish the transmitted chains stay taken: their buffers are
    read by push and frame, under the ingress port's memory hold.
    """

    cdef Fwd f
    cdef RegionTable table
    cdef public dict stats
    cdef public list out_stats
    cdef public list out_queue_stats
    cdef public list out_errors
    cdef public object in_fault
    cdef public bint more

    def __cinit__(self) -> None:
        memset(&self.f, 0, sizeof(Fwd))
        self.f.fan = <uint8_t *>malloc(BOUNCE)
        if self.f.fan == NULL:
            raise MemoryError()
        self.stats = dict.fromkeys(_FSTATS, 0)
        self.out_stats = []
        self.out_queue_stats = []
        self.out_errors = []
        self.in_fault = None
        install_guard()

    def __dealloc__(self) -> None:
        cdef size_t o
        free(self.f.fan)
        free(self.f.allp.v)
        free(self.f.frames)
        free(self.f.b.tx_used)
        for o in range(self.f.outs_cap):
            free_burst(&self.f.outs[o].b)
        free(self.f.outs)

    @property
    def frames(self) -> int:
        return self.f.nframes

    cdef _ingress(self, mem: object):
        """The ingress port's table (``mem``'s snapshot), for pull's and again's burst."""
        cdef Burst *b = &self.f.b
        self.table = region_table(mem)
        b.regions = self.table.regions
        b.nregions = self.table.n
        b.writes = self.table.writes
        b.written = self.table.written

    def pull(self, mem: object, tx: object, int hdr_len, int limit,
             int offload=0) -> tuple:
        """See forward.Forwarder.pull."""
        cdef Fwd *f = &self.f
        cdef Burst *b = &f.b
        cdef uintptr_t fault = 0
        cdef int rc, which = 0, i
        cdef pv_table tables[1]
        if hdr_len != 10 and hdr_len != 12:
            raise ValueError(f"virtio-net header length {hdr_len}: 10 or 12")
        self._ingress(mem)
        load_ring(&b.tx, tx, self.table)
        b.in_hdr = hdr_len
        b.hdr_len = hdr_len
        b.limit = limit if limit > 0 else 0
        b.taken = 0
        b.err = b.err_rx = 0
        b.err_a = b.err_b = 0
        b.tx_used_len = 0
        f.allp.len = 0
        f.nframes = f.ndst = f.nsrc = 0
        f.k = 0
        f.more = 0
        f.offload = <uint32_t>(offload & 7)
        memset(f.st, 0, sizeof(f.st))
        tables[0].r = b.regions
        tables[0].n = b.nregions
        with nogil:
            rc = pv_guarded(pull_fn, f, tables, 1, &fault, &which)
        if rc == PV_FAULT:
            raise _fault(fault)
        store_ring(tx, &b.tx)
        self.more = f.more
        st = self.stats
        for i in range(NFSTATS):
            st[_FSTATS[i]] = f.st[i]
        if b.err == E_NOMEM:
            raise MemoryError("data path scratch arrays")
        error = tx.break_(reason(b.err, b.err_a, b.err_b)) if b.err else None
        return b.taken, error

    def macs(self) -> tuple:
        """See forward.Forwarder.macs."""
        cdef Fwd *f = &self.f
        cdef size_t j, s
        cdef list srcs = [bytes(f.srcs[s][:6]) for s in range(f.nsrc)]
        cdef list dsts = [bytes(f.dsts[j][:6]) for j in range(f.ndst)]
        src_at = []
        for j in range(f.ndst):
            at = NEVER
            if not f.dsts[j][0] & 1:
                for s in range(f.nsrc):
                    if memcmp(f.srcs[s], f.dsts[j], 6) == 0:
                        at = f.src_first[s]
                        break
            src_at.append(at)
        return srcs, dsts, src_at

    def frame(self, mem: object, size_t k) -> bytes:
        """See forward.Forwarder.frame."""
        cdef Fwd *f = &self.f
        cdef Frame *fr
        cdef Pieces view
        cdef uint64_t soff
        cdef uintptr_t fault = 0
        cdef int which = 0
        if k >= f.nframes:
            raise IndexError(k)
        fr = &f.frames[k]
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>fr.total)
        view.v = f.allp.v + fr.start
        view.len = fr.npieces
        view.cap = fr.npieces
        if copy_guarded(&view, <uint8_t *>PyBytes_AS_STRING(out), fr.total, self.table,
                        &fault):
            raise _fault(fault)
        if not fr.need:                      # the header as the switch carries it
            memset(PyBytes_AS_STRING(out), 0, 10)
        return out

    cdef tuple _load_outs(self, masks: list, same_at: list, slow: list, outs: list):
        """push's and again's set-up: the routes, and each egress port's receive queues,
        one lane each (port o's are lanes lane0[o] .. lane0[o] + nq[o] - 1, so a lane
        chosen by push_fn is below nlanes), with their tables in f.tables (one per port:
        a fault in table o + 1 is port o's). Returns the queues per port, the tables to
        keep alive and flush, and each lane's error so far."""
        cdef Fwd *f = &self.f
        cdef size_t o, j, q, lane, nouts = len(outs), ndst = f.ndst, nlanes = 0
        cdef OutPort *out
        cdef RegionTable t
        cdef size_t old
        if len(masks) != ndst or len(same_at) != ndst or len(slow) != ndst:
            raise ValueError("one route per destination MAC")
        if nouts > MAX_OUTS:
            raise ValueError("at most 64 egress ports per push")
        for j in range(ndst):
            m = masks[j]
            if m < 0 or m >> nouts:
                raise ValueError(f"route {j} names an egress port out of range")
            f.masks[j] = m
            f.same_at[j] = min(<uint64_t>same_at[j], <uint64_t>NEVER)
            f.slowr[j] = bool(slow[j])
        for o in range(nouts):
            f.accepts[o] = <uint8_t>(outs[o].accepts & 7)
        queues = []
        for o in range(nouts):
            spec = outs[o]
            qs = spec.queues        # Out.queues: rx, then more_rx
            queues.append(qs)
            f.lane0[o] = <uint32_t>nlanes
            f.nq[o] = <uint32_t>len(qs)
            nlanes += len(qs)
        old = f.outs_cap
        if reserve(<void **>&f.outs, &f.outs_cap, nlanes, sizeof(OutPort)):
            raise MemoryError()
        if f.outs_cap > old:
            memset(&f.outs[old], 0, (f.outs_cap - old) * sizeof(OutPort))
        errors = [None] * nlanes
        self.in_fault = None
        keep = [self.table]
        f.tables[0].r = f.b.regions
        f.tables[0].n = f.b.nregions
        for o in range(nouts):
            spec = outs[o]
            t = region_table(spec.mem)
            keep.append(t)
            f.tables[o + 1].r = t.regions
            f.tables[o + 1].n = t.n
            hdr = spec.hdr_len
            if hdr != 10 and hdr != 12:
                raise ValueError(f"virtio-net header length {hdr}: 10 or 12")
            for q, rxq in enumerate(queues[o]):
                lane = f.lane0[o] + q
                out = &f.outs[lane]
                if out.b.bounce == NULL:
                    out.b.bounce = <uint8_t *>calloc(BOUNCE, 1)
                    if out.b.bounce == NULL:
                        raise MemoryError()
                out.b.regions = t.regions
                out.b.nregions = t.n
                out.b.writes = t.writes
                out.b.written = t.written
                out.b.hdr_len = hdr
                out.b.in_hdr = f.b.in_hdr
                out.b.swap = 0
                out.b.mrg_rxbuf = spec.mrg_rxbuf
                out.max_eth = spec.max_eth
                out.b.rx_used_len = 0
                out.b.err = 0
                out.b.err_a = out.b.err_b = 0
                out.routed = out.done = 0
                memset(out.st, 0, sizeof(out.st))
                memset(out.acc, 0, sizeof(out.acc))
                if rxq.broken is not None:
                    out.b.err = -1           # broken before: its frames count bad
                    continue
                try:
                    load_ring(&out.b.rx, rxq, t)
                except VirtqueueError as e:
                    errors[lane] = e
                    out.b.err = -1       # nothing written to it; its frames count bad
        f.nouts = nouts
        f.nlanes = nlanes
        return queues, keep, errors

    cdef _store_outs(self, list queues, list errors, int summed):
        """push's and again's end: each lane's ring back into its queue (unless it was
        not loaded), its error, and the counts (``summed``: again's sums, else st) as
        out_stats, out_queue_stats and out_errors."""
        cdef Fwd *f = &self.f
        cdef size_t o, q, lane, i
        cdef OutPort *out
        stats = []
        qstats = []
        for o in range(f.nouts):
            per = []
            total = [0] * NOSTATS
            for q, rxq in enumerate(queues[o]):
                lane = f.lane0[o] + q
                out = &f.outs[lane]
                st = [(out.acc[i] if summed else out.st[i]) for i in range(NOSTATS)]
                per.append(st)
                for i in range(NOSTATS):
                    total[i] += st[i]
                if out.b.err != -1:          # loaded: its state, as the reference's
                    store_ring(rxq, &out.b.rx)
                if out.b.err == E_NOMEM:
                    errors[lane] = MemoryError("data path scratch arrays")
                elif out.b.err > 0:
                    errors[lane] = rxq.break_(reason(out.b.err, out.b.err_a, out.b.err_b))
            stats.append(total)
            qstats.append(per)
        self.out_stats = stats
        self.out_queue_stats = qstats
        # A port's error: its first queue's (in queue order) that broke.
        self.out_errors = [_first(errors, f.lane0[o], f.nq[o]) for o in range(f.nouts)]

    def push(self, mem: object, size_t start, masks: list, same_at: list, slow: list,
             outs: list) -> int:
        """See forward.Forwarder.push."""
        cdef Fwd *f = &self.f
        cdef size_t o
        cdef uintptr_t fault = 0
        cdef int rc, which = 0
        queues, keep, errors = self._load_outs(masks, same_at, slow, outs)
        f.k = start
        f.st[F_SAME_PORT] = 0
        with nogil:
            rc = pv_guarded(push_fn, f, f.tables, f.nouts + 1, &fault, &which)
        if rc == PV_FAULT:
            # Nothing is written back: the connection whose memory faulted is closed
            # for it, and the others' queues keep the state they had before this push.
            self.out_errors = [_first(errors, f.lane0[o], f.nq[o]) for o in range(f.nouts)]
            if which == 0:
                self.in_fault = _fault(fault)
            else:
                self.out_errors[which - 1] = _fault(fault)
            self.out_stats = [[0] * NOSTATS for _ in range(f.nouts)]
            self.out_queue_stats = [[[0] * NOSTATS for _ in qs] for qs in queues]
            self.stats["same_port"] = 0
            return start
        for t in keep:
            (<RegionTable>t).flush()
        self.stats["same_port"] = f.st[F_SAME_PORT]
        self._store_outs(queues, errors, 0)
        return f.k

    def again(self, mem: object, tx: object, int limit, int bursts, masks: list,
              same_at: list, slow: list, outs: list) -> tuple:
        """See forward.Forwarder.again. A guest-memory fault in a burst puts back the
        state that burst started from (its chains stay in their rings, nothing of it is
        published) and ends the call: the faulting connection's error is in in_fault
        (the ingress) or out_errors, the bursts before it stand."""
        cdef Fwd *f = &self.f
        cdef Burst *b = &f.b
        cdef size_t o, j
        cdef uintptr_t fault = 0
        cdef int rc, which = 0, i
        for j in range(len(slow)):
            if slow[j] or (same_at[j] != 0 and same_at[j] != NEVER):
                raise ValueError("again: no slow route, same_at 0 or NEVER only")
        if f.nframes and f.k < f.nframes:
            raise ValueError("again: the last burst was not pushed whole")
        self._ingress(mem)
        queues, keep, errors = self._load_outs(masks, same_at, slow, outs)
        load_ring(&b.tx, tx, self.table)
        b.limit = limit if limit > 0 else 0
        b.err = b.err_rx = 0
        b.err_a = b.err_b = 0
        memset(f.st, 0, sizeof(f.st))
        f.closed = 1
        f.in_burst = 0
        f.bursts = bursts if bursts > 0 else 0
        f.done_bursts = 0
        f.taken_total = 0
        f.last_taken = 0
        with nogil:
            rc = pv_guarded(again_fn, f, f.tables, f.nouts + 1, &fault, &which)
        f.closed = 0
        if rc == PV_FAULT:
            if f.in_burst:
                b.tx = f.snap_tx
                f.taken_total = f.snap_taken
                f.last_taken = 0
                memcpy(f.st, f.snap_st, sizeof(f.st))
                for o in range(f.nlanes):
                    f.outs[o].b.rx = f.outs[o].snap
                    if f.outs[o].b.err > 0:
                        f.outs[o].b.err = 0  # its burst is undone: no error of its own
                f.nframes = 0
                f.more = 1
                b.tx_used_len = 0
                b.err = 0
        for t in keep:
            (<RegionTable>t).flush()
        store_ring(tx, &b.tx)
        self.more = f.more
        st = self.stats
        for i in range(NFSTATS):
            st[_FSTATS[i]] = f.st[i]
        self._store_outs(queues, errors, 1)
        if rc == PV_FAULT:
            if which == 0:
                self.in_fault = _fault(fault)
            else:
                self.out_errors[which - 1] = _fault(fault)
        if b.err == E_NOMEM:
            raise MemoryError("data path scratch arrays")
        error = tx.break_(reason(b.err, b.err_a, b.err_b)) if b.err else None
        return f.taken_total, f.last_taken, error

    def finish(self, mem: object, tx: object) -> None:
        """See forward.Forwarder.finish."""
        cdef Fwd *f = &self.f
        cdef uintptr_t fault = 0
        cdef int rc, which = 0
        cdef pv_table tables[1]
        if not f.b.tx_used_len or tx.broken is not None:
            return
        load_ring(&f.b.tx, tx, self.table)
        tables[0].r = f.b.regions
        tables[0].n = f.b.nregions
        with nogil:
            rc = pv_guarded(finish_fn, f, tables, 1, &fault, &which)
        if rc == PV_FAULT:
            raise _fault(fault)
        f.b.tx_used_len = 0
        store_ring(tx, &f.b.tx)


cdef struct CopyArgs:
    const Pieces *src
    uint8_t *dst
    uint64_t count


cdef int copy_fn(void *arg) noexcept nogil:
    cdef CopyArgs *c = <CopyArgs *>arg
    cdef uint64_t soff
    gather(c.src, c.dst, c.count, &soff)
    return 0


cdef int copy_guarded(const Pieces *src, uint8_t *dst, uint64_t count, RegionTable t,
                      uintptr_t *fault):
    cdef CopyArgs c
    cdef pv_table tables[1]
    cdef int which = 0
    c.src = src
    c.dst = dst
    c.count = count
    tables[0].r = t.regions
    tables[0].n = t.n
    return pv_guarded(copy_fn, &c, tables, 1, fault, &which) == PV_FAULT
