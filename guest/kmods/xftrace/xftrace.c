// SPDX-License-Identifier: GPL-2.0
/*
 * xftrace: paper 003's in-guest recorder, for hosts where no TCG plugin can
 * watch the guest (KVM). The host side is crates/xftrace/src/kmod.rs.
 *
 * The kernel's function-graph tracer (register_ftrace_graph with our own
 * fgraph_ops) calls us at every traced kernel function's entry and return.
 * We record only the call flow of selected syscalls: when the current task
 * enters the handler of one of them (sys_call_table[nr], i.e.
 * __x64_sys_<name>, resolved once at load), it gets a slot (task, depth of
 * that handler); from then on every function it enters or leaves deeper
 * than the handler, in task context, is a record, until the handler
 * returns. Interrupts and softirqs on top of the task are not recorded
 * (not in task context, or not on the task's stack). Functions are
 * recorded by their start address (with IBT, ftrace reports the
 * __fentry__ call after the endbr64; we step back over it).
 *
 * Records go into a static buffer in this module (xft_buf: a header, then
 * XFT_CAPACITY fixed-size records; no wrap-around, records past the end are
 * counted as lost). Every record is XORed word by word with the 64-bit key
 * in xft_key, read when the record is written. The host writes a fresh key
 * into xft_key at intervals, straight into guest RAM, and keeps the history
 * of keys with the write index at each change, to decode. While xft_key is
 * 0 nothing new is traced: the host arms the recorder with its first key and
 * disarms it by writing 0.
 *
 * The host finds xft_buf and xft_key through this module's own symbol table
 * (struct module -> kallsyms) in guest memory; it does not read our log
 * lines. Layout (little endian; kept in step with kmod.rs):
 *
 *   header (256 bytes)
 *     0 magic "XFTRACE1"      8 version u32, record size u32
 *    16 capacity             24 write index (reservations, may pass capacity)
 *    32 records written      40 lost (buffer full)
 *    48 busy (no free slot)  56 deep (calls past XFT_MAX_DEPTH)
 *    64 &xft_key             72 number of syscalls
 *    80 nrs[8] u16           96 traced handlers[8] u64
 *   160 disarmed (records not written because the key was 0)
 *   record i (64 bytes at 256 + 64 * i), each word XORed with the key:
 *     w0 time (trace_clock_local, ns)
 *     w1 cpu u16 | kind u8 | flags u8 | depth u16 | syscall nr u16
 *     w2 function   w3 task_struct   w4 pid u32 | tgid u32
 *     w5, w6 comm (entry records; 0 otherwise)
 *     w7 check: (XFT_CHECK_TAG << 32 | (u32)i) ^ digest(w0..w6 in the clear),
 *        written last (digest: xft_digest, a non-linear fold)
 *   kinds: 1 syscall handler entered (depth 0), 2 call, 3 return,
 *          4 syscall handler returned (depth 0)
 *
 * Parameters: nrs= syscall numbers (x86-64, at most 8; default 257 =
 * openat). Load: insmod xftrace.ko nrs=0,257
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/version.h>
#include <linux/kprobes.h>
#include <linux/ftrace.h>
#include <linux/sched.h>
#include <linux/atomic.h>
#include <linux/preempt.h>
#include <linux/trace_clock.h>
#include <linux/build_bug.h>
#include <linux/stddef.h>
#include <linux/uaccess.h>
#include <linux/sched/task_stack.h>
#include <asm/asm.h>
#include <asm/unistd.h>
#ifdef CONFIG_X86_KERNEL_IBT
#include <asm/ibt.h>
#endif

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch xftrace: XOR-keyed function-graph records of selected syscalls, read by the host");

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 14, 0)
/* 6.14 passes a struct ftrace_regs * to entryfunc as well: not handled. */
#error "xftrace supports kernels 6.1 to 6.13"
#endif

#define XFT_MAGIC	0x3145434152544658ULL	/* "XFTRACE1" */
#define XFT_VERSION	1
#define XFT_CAPACITY	65536
#define XFT_MAX_NRS	8
#define XFT_MAX_SLOTS	64
#define XFT_MAX_DEPTH	128
#define XFT_CHECK_TAG	0x58465443ULL

enum { XFT_SYS_ENTER = 1, XFT_CALL = 2, XFT_RET = 3, XFT_SYS_EXIT = 4 };

struct xft_header {
	u64 magic;
	u32 version;
	u32 record_size;
	u64 capacity;
	atomic64_t widx;
	atomic64_t count;
	atomic64_t lost;
	atomic64_t busy;
	atomic64_t deep;
	u64 key_addr;
	u64 nr_count;
	u16 nrs[XFT_MAX_NRS];
	u64 targets[XFT_MAX_NRS];
	atomic64_t disarmed;
	u8 reserved[88];
};

struct xft_record {
	u64 w[8];
};

struct xft_buffer {
	struct xft_header hdr;
	struct xft_record rec[XFT_CAPACITY];
};

/* Global (not static) so their names are plain in the module's kallsyms. */
extern struct xft_buffer xft_buf;
extern u64 xft_key;
struct xft_buffer xft_buf __aligned(64);
u64 xft_key __aligned(64);

static int nrs[XFT_MAX_NRS] = { 257 };
static int n_nrs = 1;
module_param_array(nrs, int, &n_nrs, 0444);
MODULE_PARM_DESC(nrs, "syscall numbers whose call flow is recorded (at most 8)");

/* One task inside a traced syscall. Only that task reads base/nr. */
struct xft_slot {
	struct task_struct *task;
	int base;	/* fgraph depth of the syscall handler */
	u16 nr;
};

static struct xft_slot slots[XFT_MAX_SLOTS];
static atomic_t active = ATOMIC_INIT(0);
static unsigned long targets[XFT_MAX_NRS];
static int ntargets;

typedef unsigned long (*kln_t)(const char *name);
typedef int (*reg_graph_t)(struct fgraph_ops *gops);
typedef void (*unreg_graph_t)(struct fgraph_ops *gops);
static unreg_graph_t unreg_graph;

static bool is_endbr64(unsigned long a)
{
	const u8 *p = (const u8 *)a;

	return p[0] == 0xf3 && p[1] == 0x0f && p[2] == 0x1e && p[3] == 0xfa;
}

/* kallsyms_lookup_name is not exported since 5.7: let a kprobe resolve it. */
static kln_t resolve_kln(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	unsigned long a;

	if (register_kprobe(&kp))
		return NULL;
	a = (unsigned long)kp.addr;
	unregister_kprobe(&kp);
	if (is_endbr64(a - 4))
		a -= 4;
	return (kln_t)a;
}

static notrace struct xft_slot *xft_find(struct task_struct *t)
{
	int i;

	if (!atomic_read(&active))
		return NULL;
	for (i = 0; i < XFT_MAX_SLOTS; i++)
		if (READ_ONCE(slots[i].task) == t)
			return &slots[i];
	return NULL;
}

static notrace struct xft_slot *xft_claim(struct task_struct *t)
{
	int i;

	for (i = 0; i < XFT_MAX_SLOTS; i++) {
		if (READ_ONCE(slots[i].task))
			continue;
		if (cmpxchg(&slots[i].task, NULL, t) == NULL) {
			atomic_inc(&active);
			return &slots[i];
		}
	}
	return NULL;
}

static notrace void xft_release(struct xft_slot *s)
{
	WRITE_ONCE(s->task, NULL);
	atomic_dec(&active);
}

/*
 * Whether we run on the task's own stack: interrupts (including the
 * irq_enter_rcu() and softirq work done on their way out, before the
 * preempt count says so) run on the per-CPU IRQ stack.
 */
static notrace bool xft_on_task_stack(void)
{
	unsigned long sp = current_stack_pointer;
	unsigned long base = (unsigned long)task_stack_page(current);

	return sp - base < THREAD_SIZE;
}

/*
 * The function's start from the ip ftrace gives: with IBT (6.12) that is
 * the __fentry__ call after the function's endbr64 (or its poisoned nop),
 * 4 bytes in; as arch_ftrace_get_symaddr() does in later kernels.
 */
static notrace unsigned long xft_func(unsigned long ip)
{
#ifdef CONFIG_X86_KERNEL_IBT
	u32 insn;

	if ((ip & ~PAGE_MASK) < ENDBR_INSN_SIZE) {
		if (get_kernel_nofault(insn, (u32 *)(ip - ENDBR_INSN_SIZE)))
			return ip;
	} else {
		insn = *(u32 *)(ip - ENDBR_INSN_SIZE);
	}
	if (is_endbr(insn))
		ip -= ENDBR_INSN_SIZE;
#endif
	return ip;
}

static notrace int xft_target(unsigned long func)
{
	int i;

	for (i = 0; i < ntargets; i++)
		if (targets[i] == func)
			return i;
	return -1;
}

/* Fold of the record's words: a word changed without the key breaks it. */
static notrace u64 xft_digest(const u64 *w)
{
	u64 h = 0;
	int i;

	for (i = 0; i < 7; i++) {
		h ^= w[i];
		h *= 0x9e3779b97f4a7c15ULL;
		h ^= h >> 32;
	}
	return h;
}

/*
 * Writes one record. The slot is reserved first, the key read after: the
 * host writes a new key before it reads the write index for its key log,
 * so a record at an index at or past that logged index was keyed with that
 * key or a later one (see kmod.rs for the decoding and its bounds).
 */
static notrace void xft_put(u8 kind, u16 depth, u16 nr, unsigned long func, bool comm)
{
	struct xft_header *h = &xft_buf.hdr;
	struct task_struct *t = current;
	struct xft_record *r;
	u64 key, later, idx, w[7];
	int i;

	key = READ_ONCE(xft_key);
	if (!key) {
		atomic64_inc(&h->disarmed);
		return;
	}
	idx = atomic64_inc_return(&h->widx) - 1;
	if (idx >= XFT_CAPACITY) {
		atomic64_inc(&h->lost);
		return;
	}
	later = READ_ONCE(xft_key);
	if (later)
		key = later;
	w[0] = trace_clock_local();
	w[1] = (u64)(raw_smp_processor_id() & 0xffff) | (u64)kind << 16 |
	       (u64)depth << 32 | (u64)nr << 48;
	w[2] = func;
	w[3] = (unsigned long)t;
	w[4] = (u64)(u32)t->pid | (u64)(u32)t->tgid << 32;
	w[5] = 0;
	w[6] = 0;
	if (comm)
		__builtin_memcpy(&w[5], t->comm, 16);
	r = &xft_buf.rec[idx];
	for (i = 0; i < 7; i++)
		WRITE_ONCE(r->w[i], w[i] ^ key);
	smp_wmb();
	WRITE_ONCE(r->w[7], ((XFT_CHECK_TAG << 32) | (u32)idx) ^ xft_digest(w) ^ key);
	atomic64_inc(&h->count);
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
/* 6.11 allowed several fgraph users: callbacks get their fgraph_ops. */
#define XFT_GOPS , struct fgraph_ops *gops
#else
#define XFT_GOPS
#endif

static notrace int xft_entry(struct ftrace_graph_ent *trace XFT_GOPS)
{
	struct task_struct *t = current;
	struct xft_slot *s;
	unsigned long func;
	int i, d;

	if (!in_task() || !xft_on_task_stack())
		return 0;
	s = xft_find(t);
	if (s) {
		d = trace->depth - s->base;
		if (d > 0) {
			if (d >= XFT_MAX_DEPTH) {
				atomic64_inc(&xft_buf.hdr.deep);
				return 0;
			}
			xft_put(XFT_CALL, d, s->nr, xft_func(trace->func), false);
			return 1;
		}
		/*
		 * At or above the handler's depth with the slot still held:
		 * its return was never seen (the task exited inside it, or
		 * this task_struct was reused). Drop it.
		 */
		xft_release(s);
	}
	if (!READ_ONCE(xft_key))
		return 0;
	func = xft_func(trace->func);
	i = xft_target(func);
	if (i < 0)
		return 0;
	s = xft_claim(t);
	if (!s) {
		atomic64_inc(&xft_buf.hdr.busy);
		return 0;
	}
	s->base = trace->depth;
	s->nr = (u16)nrs[i];
	xft_put(XFT_SYS_ENTER, 0, s->nr, func, true);
	return 1;
}

static notrace void xft_return(struct ftrace_graph_ret *trace XFT_GOPS)
{
	struct xft_slot *s = xft_find(current);
	int d;

	if (!s)
		return;
	d = trace->depth - s->base;
	if (d > 0) {
		xft_put(XFT_RET, d, s->nr, xft_func(trace->func), false);
		return;
	}
	if (d == 0)
		xft_put(XFT_SYS_EXIT, 0, s->nr, xft_func(trace->func), false);
	xft_release(s);
}

static struct fgraph_ops xft_gops = {
	.entryfunc = xft_entry,
	.retfunc = xft_return,
};

static int __init xft_init(void)
{
	struct xft_header *h = &xft_buf.hdr;
	const unsigned long *table;
	reg_graph_t reg_graph;
	kln_t kln;
	int i, err;

	BUILD_BUG_ON(sizeof(struct xft_header) != 256);
	BUILD_BUG_ON(sizeof(struct xft_record) != 64);
	BUILD_BUG_ON(offsetof(struct xft_header, widx) != 24);
	BUILD_BUG_ON(offsetof(struct xft_header, key_addr) != 64);
	BUILD_BUG_ON(offsetof(struct xft_header, nrs) != 80);
	BUILD_BUG_ON(offsetof(struct xft_header, targets) != 96);
	BUILD_BUG_ON(offsetof(struct xft_header, disarmed) != 160);

	if (n_nrs < 1 || n_nrs > XFT_MAX_NRS)
		return -EINVAL;
	kln = resolve_kln();
	if (!kln) {
		pr_err("kprobe on kallsyms_lookup_name failed\n");
		return -ENOENT;
	}
	reg_graph = (reg_graph_t)kln("register_ftrace_graph");
	unreg_graph = (unreg_graph_t)kln("unregister_ftrace_graph");
	table = (const unsigned long *)kln("sys_call_table");
	if (!reg_graph || !unreg_graph || !table) {
		pr_err("register_ftrace_graph, unregister_ftrace_graph or sys_call_table not found\n");
		return -ENOENT;
	}
	for (i = 0; i < n_nrs; i++) {
		if (nrs[i] < 0 || nrs[i] >= NR_syscalls) {
			pr_err("syscall number %d out of range\n", nrs[i]);
			return -EINVAL;
		}
		targets[i] = table[nrs[i]];
		h->nrs[i] = (u16)nrs[i];
		h->targets[i] = targets[i];
	}
	ntargets = n_nrs;
	h->version = XFT_VERSION;
	h->record_size = sizeof(struct xft_record);
	h->capacity = XFT_CAPACITY;
	h->key_addr = (unsigned long)&xft_key;
	h->nr_count = n_nrs;
	smp_wmb();
	WRITE_ONCE(h->magic, XFT_MAGIC);

	err = reg_graph(&xft_gops);
	if (err) {
		pr_err("register_ftrace_graph: %d (another function-graph user?)\n", err);
		return err;
	}
	pr_info("recording %d syscall(s), first nr %d at %ps; armed when the host writes a key\n",
		n_nrs, nrs[0], (void *)targets[0]);
	return 0;
}

static void __exit xft_exit(void)
{
	unreg_graph(&xft_gops);
	pr_info("stopped\n");
}

module_init(xft_init);
module_exit(xft_exit);
