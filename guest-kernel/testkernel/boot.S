/*
 * fvtest — FragVisor tiny multi-vCPU test kernel: entry, GDT, IDT stubs,
 * AP real-mode trampoline. 32-bit protected mode, no paging.
 * Loaded by QEMU's multiboot v1 loader (-kernel fvtest.elf).
 *
 * Only plain instructions (mov, push/pop, popf, lgdt/lidt, ljmp, ret, in/out,
 * cli/sti, hlt; no IRET in protected mode): this code must run through KVM's instruction emulator.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, give memory info */

#define KCODE 0x08
#define KDATA 0x10
#define TRAMP_BASE 0x8000

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    cli
    movl $bsp_stack_top, %esp
    movl %eax, %ecx                 /* multiboot magic */
    lgdt gdt_desc
    ljmp $KCODE, $1f
1:  movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    pushl $0                        /* clean frame for debuggers */
    pushl %ebx                      /* multiboot info */
    pushl %ecx                      /* magic */
    call bsp_main
halt_forever:
    cli
    hlt
    jmp halt_forever

/* load_idt(): called by every CPU after the IDT has been filled. */
    .globl load_idt
load_idt:
    lidt idt_desc
    ret

/* -------- interrupt stubs: push vector, common path calls isr_dispatch -------- */
.macro ISR_NOERR vec
isr_\vec:
    pushl $0
    pushl $\vec
    jmp isr_common
.endm
.macro ISR_ERR vec
isr_\vec:
    pushl $\vec
    jmp isr_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR   8
ISR_NOERR 9
ISR_ERR   10
ISR_ERR   11
ISR_ERR   12
ISR_ERR   13
ISR_ERR   14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR   17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR   21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_NOERR 29
ISR_ERR   30
ISR_NOERR 31
ISR_NOERR 64    /* 0x40: IPI BSP -> AP */
ISR_NOERR 65    /* 0x41: IPI AP -> BSP */
ISR_NOERR 66    /* 0x42: IPI AP -> AP  */
ISR_NOERR 255   /* spurious */

isr_common:
    pushal                          /* eax ecx edx ebx esp ebp esi edi */
    movl %esp, %eax
    pushl %eax                      /* struct frame * */
    call isr_dispatch
    addl $4, %esp
    popal
    addl $8, %esp                   /* vector, error code */
    /*
     * Return without IRET: KVM's instruction emulator implements IRET only in
     * real mode, and on this machine's /dev/kvm all guest kernel code runs
     * through it. Same privilege level and CS never changes, so rewrite the
     * frame [eip, cs, eflags] into [eflags, eip, x] and do popfl; ret $4.
     * An interrupt taken between popfl and ret nests below us harmlessly.
     */
    pushl %eax
    movl 4(%esp), %eax              /* eip */
    movl %eax, 8(%esp)              /* -> cs slot */
    movl 12(%esp), %eax             /* eflags */
    movl %eax, 4(%esp)              /* -> eip slot */
    popl %eax
    popfl
    ret $4

    .section .rodata
    .align 4
    .globl isr_table
isr_table:                          /* pairs: vector, handler */
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,64,65,66,255
    .long \v, isr_\v
    .endr
    .globl isr_table_len
isr_table_len:
    .long 36

    .data
    .align 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        /* 0x08: code, base 0, 4 GiB, 32-bit */
    .quad 0x00cf92000000ffff        /* 0x10: data, base 0, 4 GiB */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
    .align 4
    .globl idt_desc
idt_desc:
    .word 256 * 8 - 1
    .long idt

    .bss
    .align 16
    .globl idt
idt:
    .space 256 * 8
    .align 16
    .space 16384
bsp_stack_top:

/* -------- AP trampoline: copied to TRAMP_BASE (0x8000), entered by SIPI vector 0x08 -------- */
    .section .rodata
    .globl tramp_start, tramp_end
    .code16
tramp_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl TRAMP_BASE + (tramp_gdt_desc - tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $KCODE, $ap_entry32
    .align 4
tramp_gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
tramp_end:

    .text
    .code32
ap_entry32:
    movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl ap_boot_stack, %esp        /* set by the BSP before each SIPI */
    lidt idt_desc
    pushl $0
    call ap_main
    jmp halt_forever

/*
 * copy16(dst, src): one 16-byte load and one 16-byte store (SSE movdqu),
 * so that an MMIO operand is a single 16-byte access. Needs sse_enable().
 */
    .globl copy16
copy16:
    movl 4(%esp), %eax
    movl 8(%esp), %edx
    movdqu (%edx), %xmm0
    movdqu %xmm0, (%eax)
    ret
    .section .note.GNU-stack, "", @progbits
