# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The compiled data path: one call serves a burst of chains with the GIL released.

Same API and same results as :mod:`.reference` (the differential test holds them equal
on random and hostile rings); the queue state stays in :class:`~pyvhost.virtq.SplitQueue`
and is read at the start of a burst and written back at its end.

Memory safety, as in :mod:`pyvhost.virtq.split` and :mod:`pyvhost.memory.guest`: every
guest-controlled number (indexes, descriptor addresses, lengths, flags, next) is bounded
before it is used to address memory, and said so where it happens. Host pointers come
from :class:`RegionTable`, the snapshot's regions in native form, built once per
snapshot; a pointer is only formed for a range that lies inside the mapped regions.

Lifetime invariant: a burst runs with its snapshot held (``MemoryManager.hold()``, the
connection's ``run_device``), so no region of the table is unmapped before it returns;
the table takes each mapping's address and releases the buffer export at once, so
``mmap.close()`` still works once the snapshot is let go.

Live migration: while a queue carries a dirty log, every guest write is marked in it
after it is made, the same marks as the pure path's (:mod:`pyvhost.virtq.split`):
``log_mark`` below, per ring state read by ``load_log``; docs/dirty-log.md.

A region whose file shrank under its mapping (a front-end's ``ftruncate``) makes the
next access fault with SIGBUS. Every burst runs under a per-thread ``sigsetjmp``: the
handler, installed with SA_SIGINFO|SA_NODEFER, jumps back out when the faulting address
is guest memory of the running burst, and the burst raises
:class:`~pyvhost.memory.MemoryFaultError` (the connection closes); any other SIGBUS goes
to the handler that was there before, or the default action.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t, UINT64_MAX
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

from pyvhost.datapath.reasons import reason
from pyvhost.devices.virtio_net import MAX_FRAME as _MAX_FRAME
from pyvhost.memory import MemoryFaultError
from pyvhost.virtq import VirtqueueError

cdef extern from *:
    """
    #include <errno.h>
    #include <setjmp.h>
    #include <signal.h>
    #include <stdint.h>
    #include <string.h>

    #if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "virtio 1 rings are little-endian; this data path reads them with native loads"
    #endif

    /* One region: guest-physical [gpa, last] is mapped at host[0 .. last - gpa]. */
    typedef struct { uint64_t gpa; uint64_t last; uint8_t *host; } pv_region;
    typedef int (*pv_fn)(void *);

    /* The avail idx is read with acquire (the ring entries the driver wrote before it are
       then visible); the used idx is published with release (the used elements written
       before it are visible first). Other 16-bit fields the driver reads concurrently are
       written in one store. */
    static inline uint16_t pv_load_acquire16(const uint8_t *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
    }
    static inline void pv_store_release16(uint8_t *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline uint16_t pv_load16(const uint8_t *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
    }
    /* Descriptor fields: each read exactly once (the guest may rewrite them meanwhile; a
       plain load could be repeated by the compiler, a check and a use then seeing two
       values), like Linux's READ_ONCE. */
    static inline uint32_t pv_load32(const uint8_t *p) {
        return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
    }
    static inline uint64_t pv_load64(const uint8_t *p) {
        return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED);
    }
    static inline void pv_store16(uint8_t *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
    }
    static inline void pv_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    /* Cache hints: a prefetch never faults and changes nothing the program can see. */
    static inline void pv_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
    static inline void pv_prefetchw(const void *p) { __builtin_prefetch(p, 1, 3); }

    /* ---- dirty log --------------------------------------------------------------------- */
    /* Set bits of one byte of the dirty log, atomically (DPDK's vhost_log_page): QEMU
       shares the log between every vhost device of a VM and takes each 64-bit word with
       an atomic exchange, so a plain read-modify-write could lose a bit set meanwhile.
       Release: the guest memory written before the mark is visible before the bit. */
    static inline void pv_log_or(uint8_t *p, uint8_t bits) {
        (void)__atomic_fetch_or(p, bits, __ATOMIC_RELEASE);
    }

    /* ---- SIGBUS guard ---------------------------------------------------------------- */
    /* The tables of the running burst: one for the reflector, the ingress port's and every
       egress port's for the switch. A fault is ours when it lies in one of them. */
    typedef struct { const pv_region *r; size_t n; } pv_table;
    #define PV_FAULT (-1000)
    static __thread sigjmp_buf *volatile pv_env;      /* set while a burst runs */
    static __thread const pv_table *pv_env_tables;    /* its tables, to tell our faults */
    static __thread size_t pv_env_ntables;
    static __thread volatile uintptr_t pv_env_fault;
    static __thread volatile int pv_env_which;
    static __thread volatile int pv_chaining;
    static struct sigaction pv_previous;              /* the handler we replaced */

    /* The index of the table whose guest memory holds host address a, or -1. */
    static int pv_in_guest(uintptr_t a) {
        for (size_t t = 0; t < pv_env_ntables; t++) {
            const pv_region *regions = pv_env_tables[t].r;
            for (size_t i = 0; i < pv_env_tables[t].n; i++) {
                uintptr_t h = (uintptr_t)regions[i].host;
                if (a >= h && a - h <= regions[i].last - regions[i].gpa)
                    return (int)t;
            }
        }
        return -1;
    }

    static void pv_sigbus(int sig, siginfo_t *info, void *uc) {
        sigjmp_buf *env = pv_env;
        int which = env != NULL ? pv_in_guest((uintptr_t)info->si_addr) : -1;
        if (which >= 0) {
            pv_env_fault = (uintptr_t)info->si_addr;
            pv_env_which = which;
            pv_env = NULL;
            siglongjmp(*env, 1);
        }
        /* Not a fault of a burst: what the previous handler (faulthandler, say) or the
           default action would do. pv_chaining breaks a loop with a previous handler
           that re-raises into us after restoring us. */
        if (!pv_chaining) {
            pv_chaining = 1;
            if (pv_previous.sa_flags & SA_SIGINFO) {
                pv_previous.sa_sigaction(sig, info, uc);
                pv_chaining = 0;
                return;
            }
            if (pv_previous.sa_handler != SIG_DFL && pv_previous.sa_handler != SIG_IGN) {
                pv_previous.sa_handler(sig);
                pv_chaining = 0;
                return;
            }
        }
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(SIGBUS, &dfl, NULL);
        raise(SIGBUS);  /* SIGBUS is not blocked (SA_NODEFER): the default action now */
    }

    /* Make pv_sigbus the first SIGBUS handler; whatever was installed is chained to.
       Cheap to call again: one sigaction query when it is already in place. */
    static int pv_guard_install(void) {
        struct sigaction cur, sa;
        if (sigaction(SIGBUS, NULL, &cur) != 0) return errno;
        if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == pv_sigbus) return 0;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = pv_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        pv_previous = cur;
        return sigaction(SIGBUS, &sa, NULL) != 0 ? errno : 0;
    }

    static int pv_guard_installed(void) {
        struct sigaction cur;
        return sigaction(SIGBUS, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO)
            && cur.sa_sigaction == pv_sigbus;
    }

    /* Run fn(arg) with guest faults turned into PV_FAULT. savemask 0: the handler runs
       with SA_NODEFER, so a fault leaves the signal mask as it was and nothing needs
       restoring (no sigprocmask syscall per burst). fn touches no local of this frame,
       and nothing read after the jump was changed after sigsetjmp but pv_env_fault. */
    static int pv_guarded(pv_fn fn, void *arg, const pv_table *tables, size_t ntables,
                          uintptr_t *fault, int *which) {
        sigjmp_buf env;
        if (sigsetjmp(env, 0)) {
            *fault = pv_env_fault;
            *which = pv_env_which;
            return PV_FAULT;
        }
        pv_env_tables = tables;
        pv_env_ntables = ntables;
        pv_env = &env;
        int rc = fn(arg);
        pv_env = NULL;
        return rc;
    }
    """
    ctypedef struct pv_region:
        uint64_t gpa
        uint64_t last
        uint8_t *host
    ctypedef int (*pv_fn)(void *) noexcept nogil
    uint16_t pv_load_acquire16(const uint8_t *p) noexcept nogil
    void pv_store_release16(uint8_t *p, uint16_t v) noexcept nogil
    uint16_t pv_load16(const uint8_t *p) noexcept nogil
    uint32_t pv_load32(const uint8_t *p) noexcept nogil
    uint64_t pv_load64(const uint8_t *p) noexcept nogil
    void pv_store16(uint8_t *p, uint16_t v) noexcept nogil
    void pv_fence() noexcept nogil
    void pv_prefetch(const void *p) noexcept nogil
    void pv_prefetchw(const void *p) noexcept nogil
    void pv_log_or(uint8_t *p, uint8_t bits) noexcept nogil
    int PV_FAULT
    int pv_guard_install() noexcept nogil
    int pv_guard_installed() noexcept nogil
    ctypedef struct pv_table:
        const pv_region *r
        size_t n
    int pv_guarded(pv_fn fn, void *arg, const pv_table *tables, size_t ntables,
                   uintptr_t *fault, int *which) noexcept nogil


# -- constants (virtio 1.2, 2.7) ------------------------------------------------------------
cdef enum:
    F_NEXT = 1
    F_WRITE = 2
    F_INDIRECT = 4
    USED_F_NO_NOTIFY = 1
    AVAIL_F_NO_INTERRUPT = 1

# Results: 0 done, EMPTY for an empty ring, else an error code of .reasons (same values).
cdef enum:
    EMPTY = -1
    E_AVAIL_JUMP = 1
    E_HEAD_RANGE = 2
    E_CHAIN_LOOP = 3
    E_NESTED_INDIRECT = 4
    E_INDIRECT_NEXT = 5
    E_INDIRECT_LEN = 6
    E_INDIRECT_SIZE = 7
    E_INDIRECT_RANGE = 8
    E_BUFFER_RANGE = 9
    E_ORDER = 10
    E_NEXT_RANGE = 11
    E_RING_RANGE = 12
    E_NOMEM = 100

# Frames dropped, and the stats they count in (ReflectNet.stats, .reference.STATS order).
cdef enum:
    TX_FRAMES, TX_BYTES, RX_FRAMES, RX_BYTES, DROP_NO_RX, DROP_TOO_BIG, DROP_MALFORMED
    NSTATS

_STATS = ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "drop_no_rx_buffer",
          "drop_too_big", "drop_malformed")

cdef uint32_t MAX_FRAME = _MAX_FRAME
# The bounce buffer: 2 bytes of room (a 10-byte header becomes 12), a 12-byte header and
# the largest frame.
cdef size_t BOUNCE = 2 + 12 + _MAX_FRAME


# -- state of a burst -----------------------------------------------------------------------
cdef struct Piece:          # a host range inside one region
    uint8_t *p
    uint32_t n              # > 0
    uint32_t region         # index in the table, for the write counters
    uint64_t gpa            # the guest-physical address of p, for the dirty log
    int first               # the first piece of its descriptor (one mark per descriptor)

cdef struct Pieces:
    Piece *v
    size_t len
    size_t cap

cdef struct Ring:           # a SplitQueue as the burst sees it
    uint8_t *desc           # 16 * size bytes, inside one region
    uint8_t *avail          # 6 + 2 * size bytes, inside one region
    uint8_t *used           # 6 + 8 * size bytes, inside one region
    uint32_t size           # a power of 2, 1 .. 32768 (SplitQueue.set_size)
    uint16_t last_avail
    uint16_t used_idx
    uint16_t shadow_avail
    int signalled           # -1: never signalled
    int event_idx
    int decided             # notify_decided: -1 None, 0, 1
    # The dirty log while the front-end logs (SplitQueue.log): its bitmap (DirtyLog.
    # address, valid for the burst: see load_ring) or NULL, and its length in bytes;
    # log_used is log_guest_addr when used-ring writes are logged (log_used_on). What
    # the burst marked is added to the DirtyLog's counters at its end (store_ring).
    uint8_t *log
    uint64_t log_size       # 1 .. MAX_LOG_SIZE (DirtyLog.map)
    uint64_t log_used
    int log_used_on
    uint64_t marks, overflows

cdef struct Used:           # struct virtq_used_elem
    uint32_t id
    uint32_t len

cdef struct RxChain:
    uint16_t head
    uint64_t wlen           # writable bytes: u32 lengths of at most 2 * 32768 descriptors

cdef struct Burst:
    const pv_region *regions
    size_t nregions
    uint64_t *writes
    uint64_t *written
    Ring tx
    Ring rx
    int has_rx
    uint32_t hdr_len        # 10 or 12: the receive side's header
    uint32_t in_hdr         # 10 or 12: the header of the frame in txp
    int swap                # swap the MACs (the reflector)
    uint8_t vnet[10]        # flags .. csum_offset of the header written (zero: no offload)
    int mrg_rxbuf
    uint32_t limit
    Pieces txp              # the readable pieces of the transmitted chain
    Pieces rxp              # the writable pieces of the receive chains of one frame
    uint8_t *bounce         # BOUNCE bytes, for overlapping buffers
    RxChain *rxc
    size_t rxc_len, rxc_cap
    Used *rx_used
    size_t rx_used_len, rx_used_cap
    Used *tx_used
    size_t tx_used_len, tx_used_cap
    uint64_t stats[NSTATS]
    uint32_t taken
    int err                 # 0 or an error code
    int err_rx              # the queue that broke: 1 receive, 0 transmit
    uint64_t err_a, err_b


cdef int reserve(void **v, size_t *cap, size_t need, size_t size) noexcept nogil:
    """Grow an array to hold ``need`` elements (amortised doubling)."""
    cdef size_t n
    cdef void *p
    if need <= cap[0]:
        return 0
    n = cap[0] * 2 if cap[0] else 64
    while n < need:
        n *= 2
    p = realloc(v[0], n * size)
    if p == NULL:
        return E_NOMEM
    v[0] = p
    cap[0] = n
    return 0


# -- guest memory ---------------------------------------------------------------------------
cdef inline Py_ssize_t find(const Burst *b, uint64_t gpa) noexcept nogil:
    """The region containing ``gpa``, or -1: a binary search (GuestMemory.region_at)."""
    cdef size_t lo = 0, hi = b.nregions, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if b.regions[mid].gpa <= gpa:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0 or gpa > b.regions[lo - 1].last:
        return -1
    return lo - 1


cdef uint8_t *locate(const Burst *b, uint64_t gpa, uint64_t length) noexcept nogil:
    """Host address of ``[gpa, gpa + length)`` if it lies in one region, else NULL
    (GuestMemory.locate). ``length - 1 <= last - gpa`` can not overflow: gpa <= last."""
    cdef Py_ssize_t i = find(b, gpa)
    if i < 0 or (length != 0 and length - 1 > b.regions[i].last - gpa):
        return NULL
    return b.regions[i].host + (gpa - b.regions[i].gpa)


cdef int buffer(Burst *b, uint64_t gpa, uint32_t length, Pieces *out, uint64_t *stored,
                uint64_t want) noexcept nogil:
    """Check that ``[gpa, gpa + length)`` (guest-controlled) lies in guest memory, across
    adjacent regions if it straddles them (GuestMemory.segments); append its pieces to
    ``out`` while fewer than ``want`` bytes are stored (``out`` NULL: check only).

    Each piece is ``n`` bytes from ``gpa`` with ``n - 1 <= last - gpa``: inside its region.
    """
    cdef Py_ssize_t i
    cdef uint64_t left = length, room, n
    while left:
        i = find(b, gpa)
        if i < 0:
            b.err_a = gpa
            b.err_b = 0
            return E_BUFFER_RANGE
        room = b.regions[i].last - gpa          # bytes left in the region, less one
        n = left if left - 1 <= room else room + 1
        if out != NULL and stored[0] < want:
            # Stored pieces stop once ``want`` bytes are reached: at most ``want`` pieces.
            if reserve(<void **>&out.v, &out.cap, out.len + 1, sizeof(Piece)):
                return E_NOMEM
            out.v[out.len].p = b.regions[i].host + (gpa - b.regions[i].gpa)
            out.v[out.len].n = <uint32_t>n
            out.v[out.len].region = <uint32_t>i
            out.v[out.len].gpa = gpa
            out.v[out.len].first = left == length
            out.len += 1
            stored[0] += n
        left -= n
        if left and b.regions[i].last == UINT64_MAX:
            b.err_a = 0
            b.err_b = 1                          # GPA 2**64: past the top, never wrap
            return E_BUFFER_RANGE
        gpa += n
    return 0


# -- the available ring ---------------------------------------------------------------------
cdef int walk(Burst *b, Ring *q, uint16_t head, int writable_part, Pieces *out,
              uint64_t want, uint64_t *total) noexcept nogil:
    """Follow the chain at ``head`` (SplitQueue._walk, check for check, in its order).

    ``total`` gets the length of the readable part (``writable_part`` 0) or the writable
    part (1), whose pieces go to ``out`` up to ``want`` bytes. Memory safety: ``index`` is
    below the current table's length whenever a descriptor is read (the head is checked
    against the size, ``next`` against the table, a new table starts at 0); at most
    ``tlen`` descriptors are read per table, which ends any loop.
    """
    cdef const uint8_t *table = q.desc
    cdef const uint8_t *d
    cdef uint32_t tlen = q.size, index = head, seen = 0
    cdef int indirect = 0, any_writable = 0, rc
    cdef uint64_t addr, stored = 0
    cdef uint32_t length
    cdef uint16_t flags, nxt
    total[0] = 0
    if head >= q.size:
        b.err_a = head
        b.err_b = q.size
        return E_HEAD_RANGE
    while True:
        seen += 1
        # "The driver MUST NOT create a descriptor chain longer than the Queue Size";
        # an indirect table counts on its own, against its own length.
        if seen > tlen:
            b.err_a = head
            b.err_b = tlen
            return E_CHAIN_LOOP
        # index < tlen: the descriptor lies inside the table (16 * tlen bytes, located).
        # Each field is read once into a local: the guest may rewrite it meanwhile.
        d = table + 16 * <size_t>index
        addr = pv_load64(d)
        length = pv_load32(d + 8)
        flags = pv_load16(d + 12)
        nxt = pv_load16(d + 14)
        if flags & F_INDIRECT:
            if indirect:
                return E_NESTED_INDIRECT
            if flags & F_NEXT:
                return E_INDIRECT_NEXT
            if length == 0 or length % 16:
                b.err_a = length
                return E_INDIRECT_LEN
            if length // 16 > q.size:
                b.err_a = length // 16
                b.err_b = q.size
                return E_INDIRECT_SIZE
            table = locate(b, addr, length)     # the whole table in one region, or NULL
            if table == NULL:
                b.err_a = addr
                b.err_b = length
                return E_INDIRECT_RANGE
            tlen = length // 16
            index = 0
            seen = 0
            indirect = 1
            continue
        if length:
            rc = buffer(b, addr, length,
                        out if (flags & F_WRITE != 0) == writable_part else NULL,
                        &stored, want)
            if rc:
                return rc
        if flags & F_WRITE:
            any_writable = 1
            if writable_part:
                total[0] += length
        elif any_writable:
            # "The driver MUST place any device-writable descriptor elements after any
            # device-readable descriptor elements."
            return E_ORDER
        elif not writable_part:
            total[0] += length
        if not flags & F_NEXT:
            return 0
        if nxt >= tlen:
            b.err_a = nxt
            b.err_b = tlen
            return E_NEXT_RANGE
        index = nxt


cdef int pending(Burst *b, Ring *q, uint32_t *n) noexcept nogil:
    """Chains available past ``last_avail`` (SplitQueue.pending): guest-controlled, so
    checked against the size; the driver can never have more outstanding."""
    cdef uint32_t d = <uint16_t>(pv_load_acquire16(q.avail + 2) - q.last_avail)
    if d > q.size:
        b.err_a = d
        b.err_b = q.size
        return E_AVAIL_JUMP
    q.shadow_avail = <uint16_t>(q.last_avail + d)
    n[0] = d
    return 0


cdef inline uint16_t avail_entry(const Ring *q, uint32_t i) noexcept nogil:
    """The head the driver put in the available ring at index ``i``. The slot is reduced
    modulo the size (a power of 2): inside the ring (6 + 2 * size bytes, located in
    load_ring). The value is the driver's: checked by whoever uses it."""
    return pv_load16(q.avail + 4 + 2 * <size_t>(i & (q.size - 1)))


#: How far ahead of the chain being popped its successors are prefetched: the
#: descriptor of the chain PF_DESC ahead, the first two cache lines of the first buffer of
#: the one PF_BUF ahead (whose descriptor was prefetched PF_DESC - PF_BUF chains earlier).
cdef enum:
    PF_DESC = 8
    PF_BUF = 4


cdef inline void prefetch_ahead(const Burst *b, const Ring *q, int writable_part) noexcept nogil:
    """Ask the CPU for the cache lines of the chains that come next, so that their misses
    overlap this chain's work instead of following it: the descriptors and buffers were
    last written by the driver on another CPU, and the walk reads them one after another
    (slot, descriptor, buffer), each waiting for the one before. DPDK's vhost library
    prefetches the same way.

    Hints only: nothing here changes what the burst reads, checks or writes (the
    descriptor is read again, and checked, when its chain is popped), and a prefetch
    never faults. Only chains the driver has made available (below ``shadow_avail``,
    read with acquire) are looked at. Memory safety: the slots are reduced modulo the
    size (inside the available ring), the head too (inside the descriptor table, both
    located in load_ring); a buffer's line is prefetched only where ``locate`` puts a
    byte of it inside guest memory."""
    cdef uint32_t mask = q.size - 1
    cdef uint16_t ahead = <uint16_t>(q.shadow_avail - q.last_avail)
    cdef const uint8_t *d
    cdef const uint8_t *p
    cdef uint64_t n
    if ahead > PF_DESC:
        pv_prefetch(q.desc + 16 * <size_t>(avail_entry(q, q.last_avail + PF_DESC) & mask))
    if ahead > PF_BUF:
        d = q.desc + 16 * <size_t>(avail_entry(q, q.last_avail + PF_BUF) & mask)
        # The first two cache lines of the buffer: a small frame with its header (12 +
        # 64 bytes) lies across two of them, and the copy waited for the second
        # (BENCHMARKS.md, --profile). The range located is the descriptor's first n <=
        # 128 bytes (its length is the driver's: bounded here), so p + 64 < p + n is
        # inside guest memory when n > 64.
        n = pv_load32(d + 8)
        n = n if n < 128 else 128
        p = locate(b, pv_load64(d), n if n else 1)
        if p != NULL:
            if writable_part:
                pv_prefetchw(p)
                if n > 64:
                    pv_prefetchw(p + 64)
            else:
                pv_prefetch(p)
                if n > 64:
                    pv_prefetch(p + 64)


cdef int pop(Burst *b, Ring *q, int writable_part, Pieces *out, uint64_t want,
             uint64_t *total, uint16_t *head) noexcept nogil:
    """The next available chain (SplitQueue.pop): 0, EMPTY or an error."""
    cdef uint32_t n
    cdef int rc
    if q.last_avail == q.shadow_avail:
        rc = pending(b, q, &n)
        if rc:
            return rc
        if n == 0:
            return EMPTY
    prefetch_ahead(b, q, writable_part)
    head[0] = avail_entry(q, q.last_avail)
    rc = walk(b, q, head[0], writable_part, out, want, total)
    if rc:
        return rc
    q.last_avail += 1
    return 0


# -- the dirty log (DirtyLog.mark) ----------------------------------------------------------
cdef void log_mark(Ring *q, uint64_t gpa, uint64_t length) noexcept nogil:
    """Mark the pages of ``[gpa, gpa + length)`` in the queue's log: bit ``p % 8`` of
    byte ``p // 8`` for page ``p = addr // 4096``, one atomic fetch-or per log byte, as
    DirtyLog.mark (same bits, same ``marks`` and ``overflows`` counts).

    Memory safety: ``gpa`` and ``length`` are guest-controlled (a descriptor's address
    and length, or log_guest_addr plus an offset in the used ring). Computed in 64 bits:
    ``length > 0``, and ``gpa + length - 1`` is checked not to wrap before it is formed;
    a range that wraps or reaches past the log is an overflow (the Python integers of
    DirtyLog.mark would be past 2**64: past any log) and marks only the pages below the
    log's end. Every byte written is ``byte < log_size``, inside the mapped bitmap
    (``log_size`` is DirtyLog.size, the mapping checked when it was made). Pages are
    below 2**52, so ``page + 1`` and ``8 * log_size`` never wrap.
    """
    cdef uint64_t page, last, byte, end
    if q.log == NULL or length == 0:
        return
    q.marks += 1
    page = gpa >> 12
    if length - 1 > UINT64_MAX - gpa or ((gpa + length - 1) >> 15) >= q.log_size:
        q.overflows += 1
        if (page >> 3) >= q.log_size:
            return
        last = 8 * q.log_size - 1
    else:
        last = (gpa + length - 1) >> 12
    while page <= last:
        byte = page >> 3
        end = min(last, page | 7)
        # byte < log_size: page <= last < 8 * log_size. 1 .. 8 bits, within the byte.
        pv_log_or(q.log + byte,
                  <uint8_t>(((<uint32_t>1 << (end - page + 1)) - 1) << (page & 7)))
        page = end + 1


cdef void log_used(Ring *q, uint64_t offset, uint64_t length) noexcept nogil:
    """Mark ``length`` bytes at ``offset`` of the used ring, at log_guest_addr (when
    the ring's flags had VHOST_VRING_F_LOG; SplitQueue._log_used). log_guest_addr is the
    front-end's and any u64: a sum past 2**64 is counted as an overflow, never wrapped."""
    if q.log == NULL or not q.log_used_on or length == 0:
        return
    if offset > UINT64_MAX - q.log_used:
        q.marks += 1
        q.overflows += 1
        return
    log_mark(q, q.log_used + offset, length)


cdef void log_used_elems(Ring *q, uint16_t first, size_t count) noexcept nogil:
    """Mark ``count`` used elements from index ``first`` (their slots, wrapping at the
    size) and the used idx (SplitQueue._log_used_elems)."""
    cdef uint64_t slot = first & (q.size - 1), n = min(<uint64_t>count, <uint64_t>q.size)
    if slot + n <= q.size:
        log_used(q, 4 + 8 * slot, 8 * n)
    else:
        log_used(q, 4 + 8 * slot, 8 * (q.size - slot))
        log_used(q, 4, 8 * (slot + n - q.size))
    log_used(q, 2, 2)


# -- the used ring --------------------------------------------------------------------------
cdef void enable_kicks(Ring *q, int on) noexcept nogil:
    """SplitQueue.enable_kicks: avail_event with EVENT_IDX, else VIRTQ_USED_F_NO_NOTIFY."""
    if q.event_idx:
        if on:
            pv_store16(q.used + 4 + 8 * <size_t>q.size, q.last_avail)
            # log_guest_addr + offset: a guest-controlled sum, checked in log_used.
            log_used(q, 4 + 8 * <uint64_t>q.size, 2)
    else:
        pv_store16(q.used, 0 if on else USED_F_NO_NOTIFY)
        log_used(q, 0, 2)                    # as above


cdef void publish(Ring *q, const Used *elems, size_t n) noexcept nogil:
    """"The device writes the used element, then the used idx": slots modulo the size,
    the index with release ordering, so the elements are visible first."""
    cdef size_t k
    cdef uint16_t idx = q.used_idx
    for k in range(n):
        memcpy(q.used + 4 + 8 * <size_t>(idx & (q.size - 1)), &elems[k], 8)
        idx += 1
    pv_store_release16(q.used + 2, idx)
    if q.log != NULL and n:
        # After the writes they stand for; log_guest_addr (guest-controlled) plus slot
        # offsets below 4 + 8 * size: the sums are checked in log_used.
        log_used_elems(q, q.used_idx, n)
    q.used_idx = idx


cdef void decide(Ring *q) noexcept nogil:
    """SplitQueue.decide_notify: EVENT_IDX's vring_need_event, else NO_INTERRUPT."""
    cdef int need
    cdef uint16_t event, new
    # The used idx must be visible before the driver's wish is read (Linux vhost_notify:
    # smp_mb(), "paired with the barrier that the Guest executes when enabling
    # interrupts"); else both sides may miss each other's update.
    pv_fence()
    if q.event_idx:
        event = pv_load16(q.avail + 4 + 2 * <size_t>q.size)
        new = q.used_idx
        need = q.signalled < 0 or (<uint16_t>(new - event - 1)
                                   < <uint16_t>(new - <uint16_t>q.signalled))
        q.signalled = new
    else:
        need = not pv_load16(q.avail) & AVAIL_F_NO_INTERRUPT
    q.decided = 1 if need or q.decided == 1 else 0


# -- one frame into the receive queue (virtio_net.write_rx_frame) --------------------------
cdef int rx_pop(Burst *b, uint64_t want) noexcept nogil:
    cdef uint64_t wlen
    cdef uint16_t head
    cdef int rc = pop(b, &b.rx, 1, &b.rxp, want, &wlen, &head)
    if rc:
        return rc
    if reserve(<void **>&b.rxc, &b.rxc_cap, b.rxc_len + 1, sizeof(RxChain)):
        return E_NOMEM
    b.rxc[b.rxc_len].head = head
    b.rxc[b.rxc_len].wlen = wlen
    b.rxc_len += 1
    return 0


cdef size_t gather(const Pieces *src, uint8_t *dst, uint64_t count, uint64_t *soff) noexcept nogil:
    """Copy the first ``count`` bytes of ``src`` to ``dst``; returns where it stopped
    (piece index, and offset in ``soff``)."""
    cdef size_t si = 0
    cdef uint64_t k = 0, n
    soff[0] = 0
    while k < count and si < src.len:
        n = min(<uint64_t>src.v[si].n, count - k)
        memcpy(dst + k, src.v[si].p, n)
        k += n
        if n == src.v[si].n:
            si += 1
        else:
            soff[0] = n
    return si


cdef int overlapping(const Pieces *a, const Pieces *b) noexcept nogil:
    """Whether a piece of ``a`` and one of ``b`` share a byte (answers yes past 64 pairs:
    then the caller copies through its bounce buffer, which is always right). Host
    addresses are compared: two regions that map the same file range at two addresses
    (aliases) are not seen as overlapping; a driver that posts such buffers gets
    whatever the copy order gives, in its own memory only."""
    cdef size_t i, j
    if a.len * b.len > 64:
        return 1
    for i in range(a.len):
        for j in range(b.len):
            if a.v[i].p < b.v[j].p + b.v[j].n and b.v[j].p < a.v[i].p + a.v[i].n:
                return 1
    return 0


cdef void copy_frame(Burst *b, uint64_t size, uint32_t nb, int set_nb) noexcept nogil:
    """Copy the frame in ``txp`` (an ``in_hdr``-byte header, then the Ethernet frame) into
    the receive pieces as ``size`` bytes: an ``hdr_len``-byte header (``vnet``, the
    forward step's checked offload header or zero: "no offload", then zero), num_buffers
    set, then the Ethernet frame, MACs swapped if ``swap``.

    One copy, guest to guest, unless the receive buffers overlap the transmitted ones
    (a driver may post such): then the frame goes through ``bounce`` first, so the
    result is the reference's, which reads the whole frame before writing. ``txp`` holds
    at least ``in_hdr + size - hdr_len`` bytes (pieces were stored up to more than the
    largest frame), ``rxp`` at least ``size`` (each chain's pieces up to what the frame
    needs of it), and ``size - hdr_len <= MAX_FRAME``, so the frame fits ``bounce`` at
    offset 2; the loops also stop at the arrays' ends.
    """
    cdef uint8_t prefix[24]
    cdef uint8_t mac[6]
    cdef const uint8_t *head = prefix
    cdef uint32_t h = b.hdr_len, hi = b.in_hdr
    cdef uint64_t plen = h + 12, soff, doff = 0, left = size, k = 0, m
    cdef uint64_t mgpa = 0, mlen = 0
    cdef size_t si, di = 0
    cdef Piece *s
    cdef Piece *d
    cdef uint8_t *out
    if not b.swap and b.txp.len == 1 and b.rxp.len >= 1 and b.txp.v[0].n >= hi + size - h \
            and b.rxp.v[0].n >= size and not overlapping(&b.txp, &b.rxp):
        # The common case, one source piece and one receive piece that hold the whole
        # frame: the header written in place, then the Ethernet frame in one copy (the
        # loop below makes three or four small ones). The same bytes, counts and marks
        # as the loop: one piece written, ``size`` bytes, one mark of them. Bounds: the
        # receive piece holds ``size`` bytes and the source piece ``hi + size - h``
        # (both checked here), so both copies stay inside their pieces.
        d = &b.rxp.v[0]
        out = d.p
        # 12 bytes whatever h (10 or 12): constant sizes the compiler writes in place; with
        # h 10 the last two are the frame's first, written by the copy after (size >= h +
        # 14 bytes fit the piece).
        memset(out, 0, 12)
        memcpy(out, b.vnet, 10)
        if set_nb:
            out[10] = nb & 0xFF
            out[11] = (nb >> 8) & 0xFF
        memcpy(out + h, b.txp.v[0].p + hi, size - h)
        b.writes[d.region] += 1
        b.written[d.region] += size
        if b.rx.log != NULL:
            log_mark(&b.rx, d.gpa, size)     # the GPA checked by buffer(), as below
        return
    if overlapping(&b.txp, &b.rxp):
        # The source frame at bounce + 2; its Ethernet frame then starts at 2 + hi, and
        # the output header (h bytes) right before it: 2 + hi - h is 0, 2 or 4.
        gather(&b.txp, b.bounce + 2, hi + size - h, &soff)
        head = b.bounce + 2 + hi - h
        plen = size                          # all of it comes from the bounce buffer
        si = b.txp.len
    else:
        # header and both MACs of the source (size > h + 12: a frame has 14 bytes or more)
        si = gather(&b.txp, prefix, hi + 12, &soff)
        if hi != h:
            memmove(prefix + h, prefix + hi, 12)    # the MACs after the output header
    if b.swap:
        memcpy(mac, <uint8_t *>head + h, 6)
        memcpy(<uint8_t *>head + h, head + h + 6, 6)
        memcpy(<uint8_t *>head + h + 6, mac, 6)
    memset(<uint8_t *>head, 0, h)            # a plain "no offload" header, or
    memcpy(<uint8_t *>head, b.vnet, 10)      # the checked offload header (h >= 10)
    if set_nb:                               # num_buffers, at offset 10 (le16)
        (<uint8_t *>head)[10] = nb & 0xFF
        (<uint8_t *>head)[11] = (nb >> 8) & 0xFF
    while left and di < b.rxp.len:
        d = &b.rxp.v[di]
        if k < plen:                         # the rewritten head (or all) first
            m = min(plen - k, d.n - doff)
            memcpy(d.p + doff, head + k, m)
            k += m
        elif si < b.txp.len:                 # then the rest, straight from the guest
            s = &b.txp.v[si]
            m = min(min(s.n - soff, d.n - doff), left)
            memcpy(d.p + doff, s.p + soff, m)
            soff += m
            if soff == s.n:
                si += 1
                soff = 0
        else:
            break
        left -= m
        doff += m
        if doff == d.n or not left:
            b.writes[d.region] += 1
            b.written[d.region] += doff
            if b.rx.log != NULL:
                # One mark per descriptor, of the bytes written to it, as
                # DescriptorChain.write makes (the same ``marks`` and ``overflows``): a
                # descriptor's pieces follow each other in guest-physical memory. The
                # GPA is the guest's (checked inside guest memory by buffer(); mlen is
                # at most the frame's size); log_mark bounds both against the log.
                if d.first and mlen:
                    log_mark(&b.rx, mgpa, mlen)
                    mlen = 0
                if not mlen:
                    mgpa = d.gpa
                mlen += doff
            di += 1
            doff = 0
    if mlen:
        log_mark(&b.rx, mgpa, mlen)          # after the bytes it stands for


cdef int write_frame(Burst *b, uint64_t size, int *drop) noexcept nogil:
    """write_rx_frame: one chain if it holds the frame, else (MRG_RXBUF) as many as it
    takes; never truncated: a dropped frame leaves the chains it looked at in the ring."""
    cdef uint64_t room, left, n
    cdef size_t k
    cdef int rc
    cdef uint32_t nb
    b.rxc_len = 0
    b.rxp.len = 0
    drop[0] = 0
    rc = rx_pop(b, size)
    if rc == EMPTY:
        drop[0] = DROP_NO_RX
        return 0
    if rc:
        return rc
    room = b.rxc[0].wlen
    if room >= size:
        copy_frame(b, size, 1, b.hdr_len == 12)
    else:
        if not b.mrg_rxbuf:
            b.rx.last_avail -= 1             # the chain goes back untouched
            drop[0] = DROP_TOO_BIG
            return 0
        while room < size:
            rc = rx_pop(b, size - room)
            if rc == EMPTY:
                b.rx.last_avail -= <uint16_t>b.rxc_len
                drop[0] = DROP_NO_RX
                return 0
            if rc:
                return rc
            room += b.rxc[b.rxc_len - 1].wlen
        # num_buffers is 16 bits: more chains than that takes a driver that keeps moving
        # its avail idx during the burst (the reference then fails packing it).
        nb = <uint32_t>b.rxc_len
        copy_frame(b, size, nb, 1)
    if reserve(<void **>&b.rx_used, &b.rx_used_cap, b.rx_used_len + b.rxc_len, sizeof(Used)):
        return E_NOMEM
    left = size
    for k in range(b.rxc_len):
        n = b.rxc[k].wlen if b.rxc[k].wlen < left else left
        b.rx_used[b.rx_used_len].id = b.rxc[k].head
        b.rx_used[b.rx_used_len].len = <uint32_t>n
        b.rx_used_len += 1
        left -= n
    return 0


# -- the burst ------------------------------------------------------------------------------
cdef int reflect(void *arg) noexcept nogil:
    """The reflector's burst (reference.Reflector.burst, step for step)."""
    cdef Burst *b = <Burst *>arg
    cdef uint64_t total
    cdef uint16_t head
    cdef uint32_t n, h = b.hdr_len
    cdef int rc, drop
    enable_kicks(&b.tx, 0)
    while b.taken < b.limit:
        b.txp.len = 0
        rc = pop(b, &b.tx, 0, &b.txp, h + MAX_FRAME + 1, &total, &head)
        if rc == EMPTY:
            enable_kicks(&b.tx, 1)
            # The kick request must be visible before the avail idx is read again (Linux
            # vhost_enable_notify: "make sure it's written, then check again").
            pv_fence()
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
        if total < h + 14:
            b.stats[DROP_MALFORMED] += 1
            continue
        if total > h + MAX_FRAME:
            b.stats[DROP_TOO_BIG] += 1
            continue
        b.stats[TX_FRAMES] += 1
        b.stats[TX_BYTES] += total - h
        if not b.has_rx:
            b.stats[DROP_NO_RX] += 1
            continue
        rc = write_frame(b, total, &drop)
        if rc:
            b.err = rc
            b.err_rx = 1
            break
        if drop:
            b.stats[drop] += 1
            continue
        b.stats[RX_FRAMES] += 1
        b.stats[RX_BYTES] += total - h
    # What was done is published on the queues that did not break.
    if b.has_rx and b.rx_used_len and not (b.err and b.err_rx and b.err != E_NOMEM):
        publish(&b.rx, b.rx_used, b.rx_used_len)
        decide(&b.rx)
    if b.tx_used_len and not (b.err and not b.err_rx and b.err != E_NOMEM):
        publish(&b.tx, b.tx_used, b.tx_used_len)
        decide(&b.tx)
    return 0


# -- Python side: the region table and the burst call ---------------------------------------
cdef class RegionTable:
    """A snapshot's regions in native form: GPA ranges and host addresses, sorted by GPA.

    Built once per :class:`~pyvhost.memory.GuestMemory` (:func:`region_table`), never
    changed: a hot-plug makes a new snapshot and so a new table. Valid while its snapshot
    is held. Also counts the bursts' writes per region, added to the regions' ``writes``
    and ``bytes_written`` after each burst.
    """

    cdef pv_region *regions
    cdef size_t n
    cdef uint64_t *writes
    cdef uint64_t *written
    cdef tuple mapped

    def __cinit__(self, mem: object) -> None:
        cdef Py_buffer view
        cdef size_t i
        cdef uint8_t *addr
        cdef Py_ssize_t length
        self.mapped = tuple(mem.regions)
        self.n = len(self.mapped)
        self.regions = <pv_region *>calloc(self.n + 1, sizeof(pv_region))
        self.writes = <uint64_t *>calloc(self.n + 1, sizeof(uint64_t))
        self.written = <uint64_t *>calloc(self.n + 1, sizeof(uint64_t))
        if self.regions == NULL or self.writes == NULL or self.written == NULL:
            raise MemoryError()
        for i, region in enumerate(self.mapped):
            if region.closed:
                raise ValueError(f"{region!r} is unmapped: its snapshot is not held")
            # The address only: the export is released at once, so that the mapping can
            # still be closed when the snapshot is let go (mmap.close() refuses while a
            # buffer is exported).
            PyObject_GetBuffer(region.mm, &view, PyBUF_WRITABLE)
            addr = <uint8_t *>view.buf
            length = view.len
            PyBuffer_Release(&view)
            size = region.desc.memory_size
            base = region.base
            # MappedRegion's invariant: mm[base : base + memory_size] is the region.
            if base < 0 or size <= 0 or base + size > length:
                raise ValueError(f"{region!r} does not fit its mapping")
            self.regions[i].gpa = region.gpa_start
            self.regions[i].last = region.gpa_start + size - 1   # <= 2**64 - 1 (check())
            self.regions[i].host = addr + <size_t>base

    def __dealloc__(self) -> None:
        free(self.regions)
        free(self.writes)
        free(self.written)

    cdef void flush(self):
        cdef size_t i
        for i in range(self.n):
            if self.writes[i]:
                region = self.mapped[i]
                region.writes += self.writes[i]
                region.bytes_written += self.written[i]
                self.writes[i] = 0
                self.written[i] = 0


cpdef RegionTable region_table(mem: object):
    """The snapshot's native table, built on first use and kept on the snapshot."""
    table = mem.native
    if table is None:
        table = RegionTable(mem)
        mem.native = table
    return <RegionTable>table


cdef load_ring(Ring *r, q: object, RegionTable t):
    cdef uint32_t size = q.size
    gpas = q.ring_gpas
    if gpas is None or q.broken is not None:
        raise VirtqueueError(f"queue {q.index} is not ready"
                             + (f" (broken: {q.broken})" if q.broken else ""))
    # The three parts, each inside one region, checked in this order (size <= 32768).
    cdef uint64_t lengths[3]
    cdef uintptr_t ptrs[3]
    cdef int i
    lengths[0] = 16 * <uint64_t>size
    lengths[1] = 6 + 2 * <uint64_t>size
    lengths[2] = 6 + 8 * <uint64_t>size
    for i in range(3):
        gpa = gpas[i]
        ptrs[i] = locate_in(t, gpa, lengths[i])
        if ptrs[i] == 0:
            raise q.break_(reason(E_RING_RANGE, gpa, lengths[i]))
    r.desc = <uint8_t *>ptrs[0]
    r.avail = <uint8_t *>ptrs[1]
    r.used = <uint8_t *>ptrs[2]
    r.size = size
    r.last_avail = q.last_avail_idx
    r.used_idx = q.used_idx
    r.shadow_avail = q._shadow_avail
    signalled = q._signalled_used
    r.signalled = -1 if signalled is None else signalled
    r.event_idx = bool(q.event_idx)
    decided = q.notify_decided
    r.decided = -1 if decided is None else int(decided)
    load_log(r, q)


cdef load_log(Ring *r, q: object):
    """The queue's dirty log for this burst (docs/dirty-log.md, "The compiled data
    path"). Lifetime: the pointer is read here and used only until the burst's nogil
    call returns; the connection's handlers that replace or close a log (SET_LOG_BASE,
    SET_FEATURES, RESET_OWNER, close) take it off every queue first and run on the
    thread that runs the bursts, never during one. A data path serving bursts on other
    threads must hold the log for the burst as it holds the memory snapshot."""
    r.marks = r.overflows = 0
    log = q.log
    if log is None:
        r.log = NULL
        r.log_used_on = 0
        return
    address = log.address
    if address is None:
        # No address (no libatomic, or a closed log on a queue): this path can not mark
        # it; such a queue is served by the pure one (pyvhost.datapath.serves_log).
        raise ValueError(f"queue {q.index}: its dirty log has no address: "
                         "the compiled data path can not mark it")
    r.log = <uint8_t *><uintptr_t>address
    r.log_size = log.size
    base = q.log_guest_addr
    r.log_used_on = base is not None
    r.log_used = base if base is not None else 0


cdef store_ring(q: object, const Ring *r):
    q.last_avail_idx = r.last_avail
    q.used_idx = r.used_idx
    q._shadow_avail = r.shadow_avail
    q._signalled_used = None if r.signalled < 0 else r.signalled
    q.notify_decided = None if r.decided < 0 else bool(r.decided)
    if r.marks:
        log = q.log
        if log is not None:
            log.record(r.marks, r.overflows)


cdef uintptr_t locate_in(RegionTable t, uint64_t gpa, uint64_t length):
    cdef Burst probe
    probe.regions = t.regions
    probe.nregions = t.n
    return <uintptr_t>locate(&probe, gpa, length)


def guard_installed() -> bool:
    """Whether the SIGBUS guard is the process's first SIGBUS handler."""
    return bool(pv_guard_installed())


def install_guard() -> None:
    """Make the SIGBUS guard the first handler again (after faulthandler.enable(), say);
    the handler it replaces is chained to for faults outside a burst."""
    cdef int rc = pv_guard_install()
    if rc:
        raise OSError(rc, "sigaction(SIGBUS) failed")


cdef class Reflector:
    """One reflecting device's data path, with its scratch arrays (reused every burst).

    Not re-entrant: one burst at a time per instance (one device serves its queues on
    one thread; workers will own one per queue). The region table's write counters are
    per snapshot and not atomic: bursts of one connection on several threads would lose
    counts (status output only).
    """

    cdef Burst b

    def __cinit__(self) -> None:
        memset(&self.b, 0, sizeof(Burst))
        self.b.bounce = <uint8_t *>calloc(BOUNCE, 1)
        if self.b.bounce == NULL:
            raise MemoryError()
        install_guard()

    def __dealloc__(self) -> None:
        free(self.b.txp.v)
        free(self.b.rxp.v)
        free(self.b.rxc)
        free(self.b.rx_used)
        free(self.b.tx_used)
        free(self.b.bounce)

    def burst(self, mem: object, tx: object, rx: object, int hdr_len, bint mrg_rxbuf,
              int limit, dict stats) -> int:
        """See :meth:`.reference.Reflector.burst`. ``mem`` must be held for the call: the
        table's pointers are used with the GIL released."""
        cdef Burst *b = &self.b
        cdef RegionTable table = region_table(mem)
        cdef uintptr_t fault = 0
        cdef int rc, i, which = 0
        cdef pv_table tables[1]
        if hdr_len != 10 and hdr_len != 12:
            raise ValueError(f"virtio-net header length {hdr_len}: 10 or 12")
        b.regions = table.regions
        b.nregions = table.n
        b.writes = table.writes
        b.written = table.written
        load_ring(&b.tx, tx, table)
        b.has_rx = rx is not None
        if b.has_rx:
            load_ring(&b.rx, rx, table)
        b.hdr_len = hdr_len
        b.mrg_rxbuf = mrg_rxbuf
        b.limit = limit if limit > 0 else 0
        b.taken = 0
        b.err = b.err_rx = 0
        b.err_a = b.err_b = 0
        b.tx_used_len = b.rx_used_len = 0
        memset(b.stats, 0, sizeof(b.stats))
        tables[0].r = b.regions
        tables[0].n = b.nregions
        b.in_hdr = hdr_len
        b.swap = 1
        with nogil:
            rc = pv_guarded(reflect, b, tables, 1, &fault, &which)
        if rc == PV_FAULT:
            # Nothing is written back: the connection is closed for it.
            raise MemoryFaultError(
                f"SIGBUS at host address {fault:#x} in guest memory: a region's file "
                "shrank under its mapping (ftruncate by the front-end?)")
        table.flush()
        store_ring(tx, &b.tx)
        if b.has_rx:
            store_ring(rx, &b.rx)
        for i in range(NSTATS):
            if b.stats[i]:
                key = _STATS[i]
                stats[key] += b.stats[i]
        if b.err == E_NOMEM:
            raise MemoryError("data path scratch arrays")
        if b.err:
            queue = rx if b.err_rx else tx
            raise queue.break_(reason(b.err, b.err_a, b.err_b))
        return b.taken


include "_switch.pxi"
