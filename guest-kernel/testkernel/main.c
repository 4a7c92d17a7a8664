/*
 * fvtest — FragVisor tiny multi-vCPU test kernel (32-bit protected mode, no paging).
 *
 * BSP: finds the CPUs (ACPI MADT, else fw_cfg, else CMOS), starts every AP with
 * INIT-SIPI-SIPI through the xAPIC (MMIO 0xfee00000), exchanges IPIs both ways,
 * runs a memory test on every vCPU (private regions + one shared lock-xadd
 * counter), reports on COM1 with "FVTEST: " markers and exits QEMU.
 *
 * Exit convention (see docs/guest-kernel.md):
 *   1. write 0x10 (PASS) / 0x11 (FAIL) to port 0xf4: with
 *      -device isa-debug-exit,iobase=0xf4,iosize=0x04 QEMU exits 33 / 35;
 *   2. otherwise ACPI S5 power-off through the FADT's PM1a_CNT: QEMU exits 0
 *      (both for PASS and FAIL — read the markers);
 *   3. otherwise cli; hlt forever.
 *
 * Command line (multiboot, from QEMU -append): cpus=N (use only the first N CPUs),
 * ipis=N (IPIs each way per AP, default 8), iters=N (lock xadd per vCPU, default
 * 20000), memkb=N (private region per vCPU, default 64), aptoap=0 (skip AP->AP IPIs),
 * extipi=0 (skip logical/lowest-priority/broadcast IPIs and NMIs), tsc=N (TSC ping-pong
 * rounds between the BSP and each AP, default 16; 0 skips the skew measurement), tsclater=S
 * (after the memory phase, wait S * 10^9 TSC cycles -- S seconds under fragvisor-tcg's 1 GHz
 * TSC -- and measure the skew again, printed as "tsc later cpu N skew ..."), mmio16=0
 * (skip the 16-byte MMIO check that runs when QEMU's "edu" PCI device is present), smc=N
 * (cross-modifying code, needs 3 CPUs: the BSP rewrites the immediate of a tiny function N
 * times while CPU 1 calls it without pause and CPU 2 keeps reading its page; after each
 * rewrite CPU 1 serializes and must get the new value -- on a cluster with CPUs 0 and 1 on
 * one host and CPU 2 on another, the rewrite waits for the DSM while CPU 1 translates).
 *
 * Keep the code boring: it must run through KVM's instruction emulator.
 */
#include <stdint.h>

#define MAXCPU 64
#define LAPIC_BASE 0xfee00000u
#define LAPIC_ID 0x020
#define LAPIC_VER 0x030
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_LDR 0x0d0
#define LAPIC_DFR 0x0e0
#define LAPIC_ESR 0x280
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERR 0x370
#define ICR_BUSY (1u << 12)
#define ICR_LOGICAL (1u << 11)
#define ICR_ASSERT (1u << 14)
#define ICR_DM_LOWEST (1u << 8)
#define ICR_DM_NMI (4u << 8)
#define ICR_ALL_BUT_SELF (3u << 18)

#define VEC_TO_AP 0x40
#define VEC_TO_BSP 0x41
#define VEC_AP_AP 0x42
#define VEC_SPURIOUS 0xff

#define TRAMP_BASE 0x8000u
#define MEM_BASE 0x01000000u /* private test regions start at 16 MiB */

#define EXIT_PASS 0x10
#define EXIT_FAIL 0x11

struct frame {
    uint32_t edi, esi, ebp, esp, ebx, edx, ecx, eax;
    uint32_t vector, error;
    uint32_t eip, cs, eflags;
};

struct mb_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
};

/* From boot.S */
extern uint64_t idt[256];
extern const uint32_t isr_table[];
extern const uint32_t isr_table_len;
extern const uint8_t tramp_start[], tramp_end[];
void load_idt(void);
void copy16(volatile void *dst, const volatile void *src);

/* Shared state (all CPUs). volatile: polled across CPUs. */
uint32_t ap_boot_stack; /* read by ap_entry32 */
static uint8_t ap_stacks[MAXCPU][8192] __attribute__((aligned(16)));
static uint32_t ncpu = 1;
static uint8_t apic_ids[MAXCPU];
static int16_t apic_to_idx[256];
static volatile uint32_t ap_booting_idx;
/*
 * Per-CPU mailbox, one 4 KiB page each: on a FragVisor cluster every page a
 * vCPU spins on moves between hosts through the DSM, so keep unrelated hot
 * words (other CPUs' mailboxes, the shared counter, the print lock) apart.
 */
struct percpu {
    volatile uint32_t online;
    volatile uint32_t ipi_recv;      /* VEC_TO_AP / VEC_AP_AP receipts on this CPU */
    volatile uint32_t bsp_recv_from; /* VEC_TO_BSP receipts on the BSP sent by this CPU */
    volatile uint32_t cmd, cmd_arg, cmd_seq, done_seq;
    volatile uint32_t mem_ok;
    volatile uint32_t nmi_recv;      /* NMIs taken on this CPU */
} __attribute__((aligned(4096)));
static struct percpu pcpu[MAXCPU];
#define online(i) pcpu[i].online
#define ipi_recv(i) pcpu[i].ipi_recv
#define bsp_recv_from(i) pcpu[i].bsp_recv_from
#define cmd(i) pcpu[i].cmd
#define cmd_arg(i) pcpu[i].cmd_arg
#define cmd_seq(i) pcpu[i].cmd_seq
#define done_seq(i) pcpu[i].done_seq
#define mem_ok(i) pcpu[i].mem_ok
#define nmi_recv(i) pcpu[i].nmi_recv
static volatile uint32_t cur_sender;           /* AP currently sending to the BSP */
static volatile uint32_t shared_counter __attribute__((aligned(4096)));
static volatile uint32_t print_lock __attribute__((aligned(4096)));
static volatile uint32_t failed;
/* TSC ping-pong between the BSP and one AP (tsc_skew). */
static struct {
    volatile uint32_t seq;
    volatile uint32_t pad;
    volatile uint64_t t1; /* the AP's TSC when it saw an odd seq */
} tscbox __attribute__((aligned(4096)));

static uint32_t opt_cpus, opt_ipis = 8, opt_iters = 20000, opt_memkb = 64, opt_aptoap = 1, opt_extipi = 1,
                opt_tsc = 16, opt_tsclater, opt_mmio16 = 1, opt_smc;
static uint32_t pm1a_cnt, slp_typ_s5;

enum { CMD_NONE, CMD_SEND_TO_BSP, CMD_MEMTEST, CMD_SEND_TO_AP, CMD_HALT, CMD_TSC, CMD_MMIO16, CMD_SMC_RUN,
       CMD_SMC_READ };

/* Cross-modifying code (smc=N): "mov $imm32, %eax; ret" at the start of its own page. */
static volatile uint8_t smc_page[4096] __attribute__((aligned(4096)));
static struct {
    volatile uint32_t seq;  /* the BSP: the immediate it wrote last */
    volatile uint32_t ack;  /* CPU 1: the last value it saw */
    volatile uint32_t stop; /* the BSP: CPU 2 may stop reading */
    volatile uint32_t got;  /* CPU 1: what the call returned on a mismatch */
} smc_ctl __attribute__((aligned(4096)));

/* ---------------- low level ---------------- */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint32_t mmio_read(uint32_t addr) { return *(volatile uint32_t *)addr; }
static inline void mmio_write(uint32_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline uint32_t lapic_read(uint32_t reg) { return mmio_read(LAPIC_BASE + reg); }
static inline void lapic_write(uint32_t reg, uint32_t v) { mmio_write(LAPIC_BASE + reg, v); }
static inline uint32_t atomic_xadd(volatile uint32_t *p, uint32_t v)
{
    __asm__ volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p)::"memory");
    return v;
}
static inline uint32_t xchg(volatile uint32_t *p, uint32_t v)
{
    __asm__ volatile("xchgl %0, %1" : "+r"(v), "+m"(*p)::"memory");
    return v;
}
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }

static uint32_t my_idx(void)
{
    int16_t i = apic_to_idx[lapic_read(LAPIC_ID) >> 24];
    return i < 0 ? 0 : (uint32_t)i;
}

/* ---------------- serial (COM1, port I/O) ---------------- */

#define COM1 0x3f8
static void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0x07); /* FIFO on, cleared */
    outb(COM1 + 4, 0x03); /* DTR RTS */
}
static void putc_raw(char c)
{
    uint32_t spins = 0;
    while (!(inb(COM1 + 5) & 0x20) && ++spins < 100000)
        ;
    outb(COM1, (uint8_t)c);
}
static void puts_raw(const char *s)
{
    while (*s) {
        if (*s == '\n')
            putc_raw('\r');
        putc_raw(*s++);
    }
}
static void putu_raw(uint32_t v)
{
    char b[12];
    int i = 11;
    b[i] = 0;
    do {
        b[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_raw(b + i);
}
static void putx_raw(uint32_t v)
{
    char b[11];
    b[0] = '0';
    b[1] = 'x';
    for (int i = 0; i < 8; i++)
        b[2 + i] = "0123456789abcdef"[(v >> (28 - 4 * i)) & 15];
    b[10] = 0;
    puts_raw(b);
}

static void lock_print(void)
{
    while (xchg(&print_lock, 1))
        ;
}
static void unlock_print(void)
{
    barrier();
    print_lock = 0;
}

/* printf-lite: %u %x %s %d, one whole line under the print lock. */
static void say(const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    lock_print();
    puts_raw("FVTEST: ");
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            if (*p == '\n')
                putc_raw('\r');
            putc_raw(*p);
            continue;
        }
        p++;
        if (*p == 'u')
            putu_raw(__builtin_va_arg(ap, uint32_t));
        else if (*p == 'd') {
            int32_t v = __builtin_va_arg(ap, int32_t);
            if (v < 0) {
                putc_raw('-');
                v = -v;
            }
            putu_raw((uint32_t)v);
        } else if (*p == 'x')
            putx_raw(__builtin_va_arg(ap, uint32_t));
        else if (*p == 's')
            puts_raw(__builtin_va_arg(ap, const char *));
        else
            putc_raw(*p);
    }
    puts_raw("\n");
    unlock_print();
    __builtin_va_end(ap);
}

/* ---------------- exit ---------------- */

static void machine_exit(int pass)
{
    cli();
    outb(0xf4, pass ? EXIT_PASS : EXIT_FAIL); /* isa-debug-exit, if present */
    if (pm1a_cnt)                             /* ACPI S5 soft-off */
        outw((uint16_t)pm1a_cnt, (uint16_t)((slp_typ_s5 << 10) | (1u << 13)));
    for (;;)
        __asm__ volatile("hlt");
}

static void fail(const char *why, uint32_t a, uint32_t b)
{
    if (xchg(&failed, 1)) { /* someone else is already failing */
        cli();
        for (;;)
            __asm__ volatile("hlt");
    }
    print_lock = 0; /* we may have failed while holding it */
    say("FAIL %s (%u %x) on cpu %u", why, a, b, my_idx());
    machine_exit(0);
}

/* ---------------- timeouts ---------------- */

/* About 2^35 TSC cycles: 10-30 s on current hosts, whatever the engine speed. */
#define TIMEOUT_CYCLES (1ull << 35)

/* Wait until *p == want (or >= want when ge). Returns 0 on timeout. */
static int wait_eq(volatile uint32_t *p, uint32_t want, int ge)
{
    uint64_t t0 = rdtsc();
    for (;;) {
        uint32_t v = *p;
        if (v == want || (ge && v >= want))
            return 1;
        if (rdtsc() - t0 > TIMEOUT_CYCLES)
            return 0;
    }
}

/* ---------------- interrupts ---------------- */

static void set_gate(uint32_t vec, uint32_t handler)
{
    /* 32-bit interrupt gate, DPL0, present, selector 0x08 */
    uint32_t lo = (0x08u << 16) | (handler & 0xffff);
    uint32_t hi = (handler & 0xffff0000u) | 0x8e00u;
    idt[vec] = ((uint64_t)hi << 32) | lo;
}

static const char *const exc_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "r15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "r22", "r23", "r24", "r25", "r26", "r27", "r28", "r29", "#SX", "r31",
};

void isr_dispatch(struct frame *f)
{
    uint32_t v = f->vector;
    if (v < 32) {
        if (v == 2) {
            /*
             * NMI (the BSP sends one to each AP). Returning without IRET leaves
             * NMIs blocked on this CPU, so that is one NMI per CPU per boot.
             */
            atomic_xadd(&nmi_recv(my_idx()), 1);
            return;
        }
        fail(exc_names[v], f->error, f->eip);
        return;
    }
    if (v == VEC_SPURIOUS)
        return; /* no EOI for spurious */
    if (v == VEC_TO_AP || v == VEC_AP_AP)
        atomic_xadd(&ipi_recv(my_idx()), 1);
    else if (v == VEC_TO_BSP)
        atomic_xadd(&bsp_recv_from(cur_sender), 1);
    lapic_write(LAPIC_EOI, 0);
}

static void idt_init(void)
{
    for (uint32_t i = 0; i < isr_table_len; i++)
        set_gate(isr_table[2 * i], isr_table[2 * i + 1]);
}

/* ---------------- local APIC ---------------- */

static void lapic_init(uint32_t idx)
{
    lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS); /* software enable */
    /* Flat logical destination model: CPU idx < 8 gets logical ID bit idx. */
    lapic_write(LAPIC_DFR, 0xffffffffu);
    lapic_write(LAPIC_LDR, idx < 8 ? (1u << idx) << 24 : 0);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_TIMER, 0x10000);
    lapic_write(LAPIC_LVT_LINT0, 0x10000);
    lapic_write(LAPIC_LVT_LINT1, 0x10000);
    lapic_write(LAPIC_LVT_ERR, 0x10000);
    lapic_write(LAPIC_ESR, 0);
    lapic_write(LAPIC_EOI, 0);
}

static int icr_wait_idle(void)
{
    for (uint32_t i = 0; i < 1000000; i++)
        if (!(lapic_read(LAPIC_ICR_LO) & ICR_BUSY))
            return 1;
    return 0;
}

static void send_ipi(uint32_t apic_id, uint32_t low)
{
    if (!icr_wait_idle())
        fail("ICR busy before send", apic_id, low);
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, low); /* the write to ICR low sends */
    if (!icr_wait_idle())
        fail("ICR busy after send", apic_id, low);
}

static void delay_cycles(uint64_t c)
{
    uint64_t t0 = rdtsc();
    while (rdtsc() - t0 < c)
        ;
}

/* ---------------- firmware tables ---------------- */

static int mem_eq(const void *a, const char *b, uint32_t n)
{
    const uint8_t *p = a;
    for (uint32_t i = 0; i < n; i++)
        if (p[i] != (uint8_t)b[i])
            return 0;
    return 1;
}
static uint8_t sum8(const void *a, uint32_t n)
{
    const uint8_t *p = a;
    uint8_t s = 0;
    for (uint32_t i = 0; i < n; i++)
        s = (uint8_t)(s + p[i]);
    return s;
}
static inline uint32_t rd32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

static const uint8_t *find_rsdp(void)
{
    uint32_t ebda = (uint32_t)(*(volatile uint16_t *)0x40e) << 4;
    if (ebda >= 0x80000 && ebda < 0xa0000)
        for (uint32_t a = ebda; a < ebda + 1024; a += 16)
            if (mem_eq((void *)a, "RSD PTR ", 8) && sum8((void *)a, 20) == 0)
                return (const uint8_t *)a;
    for (uint32_t a = 0xe0000; a < 0x100000; a += 16)
        if (mem_eq((void *)a, "RSD PTR ", 8) && sum8((void *)a, 20) == 0)
            return (const uint8_t *)a;
    return 0;
}

static const uint8_t *find_table(const uint8_t *rsdt, const char *sig)
{
    uint32_t len = rd32(rsdt + 4);
    for (uint32_t off = 36; off + 4 <= len; off += 4) {
        const uint8_t *t = (const uint8_t *)rd32(rsdt + off);
        if (mem_eq(t, sig, 4))
            return t;
    }
    return 0;
}

/* S5 sleep type from the DSDT's \_S5 package (AML: NameOp "_S5_" PackageOp ...). */
static uint32_t parse_s5(const uint8_t *dsdt)
{
    uint32_t len = rd32(dsdt + 4);
    for (uint32_t i = 36; i + 8 < len; i++) {
        if (!mem_eq(dsdt + i, "_S5_", 4) || dsdt[i + 4] != 0x12)
            continue;
        const uint8_t *p = dsdt + i + 5;
        p += ((*p & 0xc0) >> 6) + 1; /* PkgLength */
        p++;                         /* NumElements */
        if (*p == 0x0a)              /* BytePrefix */
            return p[1] & 7;
        if (*p == 0x00 || *p == 0x01) /* ZeroOp / OneOp */
            return *p;
        return 0;
    }
    return 0;
}

/* Returns the number of enabled CPUs found in the MADT (apic_ids filled), or 0. */
static uint32_t acpi_scan(void)
{
    const uint8_t *rsdp = find_rsdp();
    if (!rsdp)
        return 0;
    const uint8_t *rsdt = (const uint8_t *)rd32(rsdp + 16);
    if (!mem_eq(rsdt, "RSDT", 4))
        return 0;
    const uint8_t *fadt = find_table(rsdt, "FACP");
    if (fadt) {
        pm1a_cnt = rd32(fadt + 64);
        const uint8_t *dsdt = (const uint8_t *)rd32(fadt + 40);
        if (dsdt && mem_eq(dsdt, "DSDT", 4))
            slp_typ_s5 = parse_s5(dsdt);
    }
    const uint8_t *madt = find_table(rsdt, "APIC");
    if (!madt)
        return 0;
    uint32_t len = rd32(madt + 4), n = 0;
    for (uint32_t off = 44; off + 2 <= len && madt[off + 1] >= 2; off += madt[off + 1]) {
        if (madt[off] == 0 && (madt[off + 4] & 1)) { /* processor local APIC, enabled */
            if (n < MAXCPU)
                apic_ids[n] = madt[off + 3];
            n++;
        }
    }
    return n;
}

static uint32_t fwcfg_ncpus(void)
{
    outw(0x510, 0x0000); /* FW_CFG_SIGNATURE */
    if (inb(0x511) != 'Q' || inb(0x511) != 'E' || inb(0x511) != 'M' || inb(0x511) != 'U')
        return 0;
    outw(0x510, 0x0005); /* FW_CFG_NB_CPUS */
    uint32_t lo = inb(0x511);
    return lo | (uint32_t)inb(0x511) << 8;
}

/* ---------------- command line ---------------- */

static uint32_t parse_opt(const char *cl, const char *key, uint32_t dflt)
{
    if (!cl)
        return dflt;
    uint32_t klen = 0;
    while (key[klen])
        klen++;
    for (const char *p = cl; *p; p++) {
        if ((p == cl || p[-1] == ' ') && mem_eq(p, key, klen) && p[klen] == '=') {
            uint32_t v = 0;
            const char *q = p + klen + 1;
            if (*q < '0' || *q > '9')
                return dflt;
            while (*q >= '0' && *q <= '9')
                v = v * 10 + (uint32_t)(*q++ - '0');
            return v;
        }
    }
    return dflt;
}

/* ---------------- memory test ---------------- */

static inline uint32_t pattern(uint32_t idx, uint32_t i) { return (idx + 1) * 0x01000193u ^ (i * 2654435761u); }

static uint32_t region_base(uint32_t idx) { return MEM_BASE + idx * opt_memkb * 1024; }

static int region_check(uint32_t idx)
{
    volatile uint32_t *r = (volatile uint32_t *)region_base(idx);
    uint32_t words = opt_memkb * 256;
    for (uint32_t i = 0; i < words; i++)
        if (r[i] != pattern(idx, i))
            return 0;
    return 1;
}

static void memtest(uint32_t idx)
{
    volatile uint32_t *r = (volatile uint32_t *)region_base(idx);
    uint32_t words = opt_memkb * 256;
    for (uint32_t i = 0; i < words; i++)
        r[i] = pattern(idx, i);
    for (uint32_t k = 0; k < opt_iters; k++)
        atomic_xadd(&shared_counter, 1);
    mem_ok(idx) = region_check(idx);
}

/* ---------------- 16-byte MMIO (QEMU's edu device) ---------------- */

/*
 * edu (-device edu, PCI 1234:11e8) keeps its DMA source and destination
 * addresses in two 64-bit registers at BAR0 + 0x80 and + 0x88: one 16-byte
 * store sets both, one 16-byte load reads both. On a FragVisor cluster the
 * device lives on the origin; an AP on another host must reach it there.
 */
#define EDU_DMA_SRC 0x80
static uint32_t edu_bar;
static volatile uint32_t mmio16_buf[4] __attribute__((aligned(16)));

static uint32_t pci_read(uint32_t dev, uint32_t off)
{
    outl(0xcf8, 0x80000000u | dev << 11 | (off & 0xfc));
    return inl(0xcfc);
}

static uint32_t find_edu(void)
{
    for (uint32_t dev = 0; dev < 32; dev++) {
        if (pci_read(dev, 0) != 0x11e81234u)
            continue;
        uint32_t bar = pci_read(dev, 0x10);
        if ((bar & 1) || !(pci_read(dev, 4) & 2)) /* memory BAR, decoding on */
            return 0;
        return bar & ~0xfu;
    }
    return 0;
}

static void sse_enable(void)
{
    uint32_t cr0, cr4;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    cr0 = (cr0 & ~(1u << 2)) | (1u << 1); /* EM off, MP on */
    __asm__ volatile("mov %0, %%cr0" ::"r"(cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    cr4 |= (1u << 9) | (1u << 10); /* OSFXSR, OSXMMEXCPT */
    __asm__ volatile("mov %0, %%cr4" ::"r"(cr4));
}

static uint32_t mmio16_word(uint32_t idx, uint32_t k) { return 0x5a000000u ^ (idx << 16) ^ (k * 0x01010101u); }

/* On CPU idx: store 16 bytes to edu in one access, load them back in one. */
static void mmio16_store_load(uint32_t idx)
{
    volatile uint32_t *regs = (volatile uint32_t *)(edu_bar + EDU_DMA_SRC);
    sse_enable();
    for (uint32_t k = 0; k < 4; k++)
        mmio16_buf[k] = mmio16_word(idx, k);
    copy16(regs, mmio16_buf);
    for (uint32_t k = 0; k < 4; k++)
        mmio16_buf[k] = 0;
    copy16(mmio16_buf, regs);
}

static inline uint32_t smc_call(void)
{
    uint32_t v;
    __asm__ volatile("call *%1" : "=a"(v) : "r"(smc_page) : "memory", "ecx", "edx");
    return v;
}

static inline void serialize(void)
{
    uint32_t a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d)::"memory");
}

/* CPU 1: call the function without pause; after each rewrite it must return the new value. */
static void smc_run(uint32_t rounds)
{
    uint32_t seen = 0;
    while (seen < rounds) {
        (void)smc_call();
        uint32_t want = smc_ctl.seq;
        if (want == seen)
            continue;
        serialize();
        uint32_t got = smc_call();
        if (got != want) {
            smc_ctl.got = got;
            barrier();
            smc_ctl.ack = 0xffffffff;
            return;
        }
        seen = want;
        smc_ctl.ack = seen;
    }
}

/* ---------------- APs ---------------- */

void ap_main(void)
{
    uint32_t idx = ap_booting_idx;
    lapic_init(idx);
    uint32_t apic = lapic_read(LAPIC_ID) >> 24;
    if (apic != apic_ids[idx])
        fail("AP has unexpected APIC ID", apic, apic_ids[idx]);
    sti();
    say("cpu %u online apic=%u", idx, apic);
    online(idx) = 1;

    uint32_t seen = 0;
    for (;;) {
        while (cmd_seq(idx) == seen)
            ;
        seen = cmd_seq(idx);
        switch (cmd(idx)) {
        case CMD_SEND_TO_BSP: /* send opt_ipis IPIs to the BSP, one at a time */
            for (uint32_t i = 1; i <= opt_ipis; i++) {
                send_ipi(apic_ids[0], VEC_TO_BSP);
                if (!wait_eq(&bsp_recv_from(idx), i, 0))
                    fail("timeout: BSP did not receive IPI", idx, i);
            }
            break;
        case CMD_SEND_TO_AP: { /* one IPI to another AP */
            uint32_t to = cmd_arg(idx);
            uint32_t before = ipi_recv(to);
            send_ipi(apic_ids[to], VEC_AP_AP);
            if (!wait_eq(&ipi_recv(to), before + 1, 1))
                fail("timeout: AP->AP IPI not received", idx, to);
            break;
        }
        case CMD_MEMTEST:
            memtest(idx);
            break;
        case CMD_MMIO16:
            mmio16_store_load(idx);
            break;
        case CMD_SMC_RUN:
            smc_run(cmd_arg(idx));
            break;
        case CMD_SMC_READ: /* keep taking the code page to this CPU's host */
            while (!smc_ctl.stop)
                (void)smc_page[2048];
            break;
        case CMD_TSC: /* answer cmd_arg TSC pings from the BSP */
            for (uint32_t r = 1; r <= cmd_arg(idx); r++) {
                if (!wait_eq(&tscbox.seq, 2 * r - 1, 0))
                    fail("timeout: TSC ping from the BSP", idx, r);
                tscbox.t1 = rdtsc();
                barrier();
                tscbox.seq = 2 * r;
            }
            break;
        case CMD_HALT:
            done_seq(idx) = seen;
            cli();
            for (;;)
                __asm__ volatile("hlt");
        }
        done_seq(idx) = seen;
    }
}

static void ap_command(uint32_t idx, uint32_t c, uint32_t arg)
{
    cmd(idx) = c;
    cmd_arg(idx) = arg;
    barrier();
    cmd_seq(idx) = cmd_seq(idx) + 1;
}

static int ap_wait(uint32_t idx) { return wait_eq(&done_seq(idx), cmd_seq(idx), 0); }

static int32_t clamp32(int64_t v) { return v > 0x7fffffff ? 0x7fffffff : v < -0x7fffffff ? -0x7fffffff : (int32_t)v; }

/*
 * Skew between the BSP's TSC and AP idx's, in cycles. Each round the BSP
 * reads t0 and pings; the AP reads t1 and answers; the BSP reads t2 on the
 * answer. The AP's read happened between t0 and t2 on the BSP's clock, so
 * skew (AP minus BSP) lies in [t1 - t2, t1 - t0]; the intersection over all
 * rounds is printed (clamped to 32 bits). With one clock it holds 0.
 */
static void tsc_skew(const char *label, uint32_t idx)
{
    int64_t lo = -0x7fffffffffffffffll, hi = 0x7fffffffffffffffll;
    uint64_t rtt_min = ~0ull;
    tscbox.seq = 0;
    barrier();
    ap_command(idx, CMD_TSC, opt_tsc);
    for (uint32_t r = 1; r <= opt_tsc; r++) {
        uint64_t t0 = rdtsc();
        tscbox.seq = 2 * r - 1;
        if (!wait_eq(&tscbox.seq, 2 * r, 0))
            fail("timeout: TSC pong from AP", idx, r);
        uint64_t t2 = rdtsc();
        uint64_t t1 = tscbox.t1;
        if ((int64_t)(t1 - t2) > lo)
            lo = (int64_t)(t1 - t2);
        if ((int64_t)(t1 - t0) < hi)
            hi = (int64_t)(t1 - t0);
        if (t2 - t0 < rtt_min)
            rtt_min = t2 - t0;
    }
    if (!ap_wait(idx))
        fail("timeout: TSC phase on AP", idx, 0);
    say("%s cpu %u skew lo=%d hi=%d cycles rtt_min=%d rounds=%u", label, idx, clamp32(lo),
        clamp32(hi), clamp32((int64_t)rtt_min), opt_tsc);
}

/* The memory phase moves pages between hosts on a FragVisor cluster: allow 8x longer. */
static int ap_wait_long(uint32_t idx)
{
    for (int i = 0; i < 8; i++)
        if (ap_wait(idx))
            return 1;
    return 0;
}

static void start_ap(uint32_t idx)
{
    uint32_t apic = apic_ids[idx];
    ap_booting_idx = idx;
    ap_boot_stack = (uint32_t)&ap_stacks[idx][sizeof(ap_stacks[idx])];
    barrier();
    send_ipi(apic, 0x0000c500); /* INIT, level, assert */
    send_ipi(apic, 0x00008500); /* INIT, level, de-assert */
    delay_cycles(10000000);     /* ~10 ms at GHz rates (spec: 10 ms) */
    for (int i = 0; i < 2; i++) {
        send_ipi(apic, 0x00004600 | (TRAMP_BASE >> 12)); /* STARTUP */
        delay_cycles(200000);                             /* ~200 us */
        if (online(idx))
            break;
    }
    if (!wait_eq(&online(idx), 1, 0))
        fail("timeout: AP did not come online", idx, apic);
}

/* ---------------- BSP ---------------- */

void bsp_main(uint32_t magic, struct mb_info *mbi)
{
    serial_init();
    for (int i = 0; i < 256; i++)
        apic_to_idx[i] = -1;
    /* Mask both 8259 PICs: nothing but our IPIs may interrupt us. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);

    const char *cl = 0;
    uint32_t mem_kb = 0;
    if (magic == 0x2BADB002) {
        if (mbi->flags & 4)
            cl = (const char *)mbi->cmdline;
        if (mbi->flags & 1)
            mem_kb = mbi->mem_upper + 1024;
    }
    opt_cpus = parse_opt(cl, "cpus", 0);
    opt_ipis = parse_opt(cl, "ipis", opt_ipis);
    opt_iters = parse_opt(cl, "iters", opt_iters);
    opt_memkb = parse_opt(cl, "memkb", opt_memkb);
    opt_aptoap = parse_opt(cl, "aptoap", opt_aptoap);
    opt_extipi = parse_opt(cl, "extipi", opt_extipi);
    opt_tsc = parse_opt(cl, "tsc", opt_tsc);
    opt_tsclater = parse_opt(cl, "tsclater", opt_tsclater);
    opt_mmio16 = parse_opt(cl, "mmio16", opt_mmio16);
    opt_smc = parse_opt(cl, "smc", opt_smc);
    if (opt_memkb == 0)
        opt_memkb = 4;

    idt_init();
    load_idt();
    lapic_init(0);
    uint32_t bsp_apic = lapic_read(LAPIC_ID) >> 24;
    say("boot bsp apic=%u lapic_ver=%x mem_kb=%u magic=%x", bsp_apic, lapic_read(LAPIC_VER), mem_kb, magic);
    if (magic != 0x2BADB002)
        fail("not booted by a multiboot loader", magic, 0);

    const char *src = "madt";
    uint32_t n = acpi_scan();
    if (n == 0) {
        src = "fw_cfg";
        n = fwcfg_ncpus();
        for (uint32_t i = 0; i < n && i < MAXCPU; i++)
            apic_ids[i] = (uint8_t)i;
    }
    if (n == 0) {
        src = "cmos";
        outb(0x70, 0x5f);
        n = inb(0x71) + 1u;
        for (uint32_t i = 0; i < n && i < MAXCPU; i++)
            apic_ids[i] = (uint8_t)i;
    }
    if (n > MAXCPU)
        n = MAXCPU;
    if (opt_cpus && opt_cpus < n)
        n = opt_cpus;
    /* The BSP must be index 0. */
    for (uint32_t i = 1; i < n; i++)
        if (apic_ids[i] == bsp_apic) {
            apic_ids[i] = apic_ids[0];
            apic_ids[0] = (uint8_t)bsp_apic;
        }
    if (apic_ids[0] != bsp_apic)
        fail("BSP APIC ID not in CPU list", bsp_apic, apic_ids[0]);
    ncpu = n;
    for (uint32_t i = 0; i < n; i++)
        apic_to_idx[apic_ids[i]] = (int16_t)i;
    say("cpus=%u source=%s ipis=%u iters=%u memkb=%u pm1a_cnt=%x", n, src, opt_ipis, opt_iters, opt_memkb, pm1a_cnt);
    if (mem_kb && region_base(n) / 1024 > mem_kb)
        fail("not enough memory for the test regions (KiB)", region_base(n) / 1024, mem_kb);

    /* AP trampoline at 0x8000 (SIPI vector 0x08). */
    {
        volatile uint8_t *dst = (volatile uint8_t *)TRAMP_BASE;
        for (const uint8_t *s = tramp_start; s < tramp_end; s++)
            *dst++ = *s;
    }
    online(0) = 1;
    sti();
    say("cpu 0 online apic=%u (bsp)", bsp_apic);

    for (uint32_t i = 1; i < n; i++)
        start_ap(i);
    say("all %u cpus online", n);

    /* IPIs BSP -> each AP, one at a time, each receipt counted by the AP's handler. */
    for (uint32_t i = 1; i < n; i++) {
        for (uint32_t k = 1; k <= opt_ipis; k++) {
            send_ipi(apic_ids[i], VEC_TO_AP);
            if (!wait_eq(&ipi_recv(i), k, 0))
                fail("timeout: AP did not receive IPI from BSP", i, k);
        }
        say("ipi bsp->%u ok count=%u", i, ipi_recv(i));
    }
    /* IPIs each AP -> BSP. */
    for (uint32_t i = 1; i < n; i++) {
        cur_sender = i;
        ap_command(i, CMD_SEND_TO_BSP, 0);
        if (!ap_wait(i))
            fail("timeout: AP->BSP IPI phase", i, bsp_recv_from(i));
        if (bsp_recv_from(i) != opt_ipis)
            fail("AP->BSP IPI count", i, bsp_recv_from(i));
        say("ipi %u->bsp ok count=%u", i, bsp_recv_from(i));
    }
    /* One IPI from each AP to the next AP (ring), if there are >= 2 APs. */
    if (opt_aptoap && n >= 3) {
        for (uint32_t i = 1; i < n; i++) {
            uint32_t to = i + 1 < n ? i + 1 : 1;
            ap_command(i, CMD_SEND_TO_AP, to);
            if (!ap_wait(i))
                fail("timeout: AP->AP IPI phase", i, to);
            say("ipi %u->%u ok", i, to);
        }
    }

    /*
     * Other delivery paths (extipi=0 skips them): logical destination (flat LDR
     * written by each CPU, read by the sender's routing), lowest priority, a
     * broadcast shorthand, and one NMI per AP (last: NMIs stay blocked after).
     */
    if (opt_extipi && n >= 2) {
        for (uint32_t i = 1; i < n && i < 8; i++) {
            uint32_t before = ipi_recv(i);
            send_ipi(1u << i, ICR_LOGICAL | ICR_ASSERT | VEC_TO_AP);
            if (!wait_eq(&ipi_recv(i), before + 1, 0))
                fail("timeout: logical-destination IPI", i, before);
            say("ipi logical bsp->%u ok", i);
            before = ipi_recv(i);
            send_ipi(1u << i, ICR_LOGICAL | ICR_ASSERT | ICR_DM_LOWEST | VEC_TO_AP);
            if (!wait_eq(&ipi_recv(i), before + 1, 0))
                fail("timeout: lowest-priority IPI", i, before);
            say("ipi lowest bsp->%u ok", i);
        }
        {
            uint32_t before[MAXCPU];
            for (uint32_t i = 1; i < n; i++)
                before[i] = ipi_recv(i);
            send_ipi(0, ICR_ALL_BUT_SELF | ICR_ASSERT | VEC_TO_AP);
            for (uint32_t i = 1; i < n; i++)
                if (!wait_eq(&ipi_recv(i), before[i] + 1, 0))
                    fail("timeout: broadcast IPI", i, before[i]);
            say("ipi broadcast bsp->all ok cpus=%u", n - 1);
        }
        for (uint32_t i = 1; i < n; i++) {
            send_ipi(apic_ids[i], ICR_ASSERT | ICR_DM_NMI);
            if (!wait_eq(&nmi_recv(i), 1, 0))
                fail("timeout: NMI to AP", i, nmi_recv(i));
            say("nmi bsp->%u ok", i);
        }
    }

    /* One clock: the TSC skew between the BSP and each AP. */
    if (opt_tsc)
        for (uint32_t i = 1; i < n; i++)
            tsc_skew("tsc", i);

    /*
     * 16-byte MMIO from the last AP (on a cluster, the one furthest from the
     * origin): its store must reach the device the BSP sees, and its load
     * must return what the device holds.
     */
    edu_bar = opt_mmio16 ? find_edu() : 0;
    if (edu_bar && n >= 2) {
        uint32_t ap = n - 1;
        ap_command(ap, CMD_MMIO16, 0);
        if (!ap_wait(ap))
            fail("timeout: 16-byte MMIO on AP", ap, edu_bar);
        for (uint32_t k = 0; k < 4; k++)
            if (mmio16_buf[k] != mmio16_word(ap, k))
                fail("16-byte MMIO load on AP", k, mmio16_buf[k]);
        /* The BSP reads both registers with 32-bit loads (the low halves). */
        volatile uint32_t *regs = (volatile uint32_t *)(edu_bar + EDU_DMA_SRC);
        if (regs[0] != mmio16_word(ap, 0) || regs[2] != mmio16_word(ap, 2))
            fail("16-byte MMIO store from AP not in the device", regs[0], regs[2]);
        say("mmio16 cpu %u ok bar=%x", ap, edu_bar);
    }

    /* Cross-modifying code: the BSP rewrites, CPU 1 runs, CPU 2 pulls the page away. */
    if (opt_smc && n >= 3) {
        smc_page[0] = 0xb8; /* mov $0, %eax; ret */
        for (int k = 1; k <= 4; k++)
            smc_page[k] = 0;
        smc_page[5] = 0xc3;
        smc_ctl.seq = smc_ctl.ack = smc_ctl.stop = 0;
        barrier();
        ap_command(2, CMD_SMC_READ, 0);
        ap_command(1, CMD_SMC_RUN, opt_smc);
        for (uint32_t r = 1; r <= opt_smc; r++) {
            *(volatile uint32_t *)(smc_page + 1) = r; /* one store rewrites the immediate */
            barrier();
            smc_ctl.seq = r;
            if (!wait_eq(&smc_ctl.ack, r, 1))
                fail("timeout: CPU 1 did not see the rewritten code", r, smc_ctl.ack);
            if (smc_ctl.ack == 0xffffffff)
                fail("stale code after a rewrite", r, smc_ctl.got);
        }
        smc_ctl.stop = 1;
        if (!ap_wait(1) || !ap_wait(2))
            fail("timeout: end of the cross-modifying code phase", 0, 0);
        say("smc rounds=%u ok", opt_smc);
    }

    /* Memory: every vCPU fills and checks its own region and adds to one counter. */
    for (uint32_t i = 1; i < n; i++)
        ap_command(i, CMD_MEMTEST, 0);
    memtest(0);
    for (uint32_t i = 1; i < n; i++)
        if (!ap_wait_long(i))
            fail("timeout: memtest on AP", i, 0);
    for (uint32_t i = 0; i < n; i++) {
        if (!mem_ok(i))
            fail("memory region check failed on its own cpu", i, region_base(i));
        if (!region_check(i)) /* the BSP reads every other vCPU's writes */
            fail("memory region check failed from the BSP", i, region_base(i));
        say("mem cpu %u ok region=%x kb=%u", i, region_base(i), opt_memkb);
    }
    /* The skew again, after a while: clocks that drift apart show here. */
    if (opt_tsc && opt_tsclater) {
        delay_cycles((uint64_t)opt_tsclater * 1000000000ull);
        for (uint32_t i = 1; i < n; i++)
            tsc_skew("tsc later", i);
    }

    uint32_t expected = n * opt_iters;
    say("counter=%u expected=%u", shared_counter, expected);
    if (shared_counter != expected)
        fail("shared counter mismatch", shared_counter, expected);

    for (uint32_t i = 1; i < n; i++)
        ap_command(i, CMD_HALT, 0);
    for (uint32_t i = 1; i < n; i++)
        ap_wait(i);
    say("PASS");
    machine_exit(1);
}
