// SPDX-License-Identifier: GPL-2.0
/*
 * rk_lstar: TEST ROOTKIT for vmwatch's integrity scanner. Never load it on a
 * machine you care about.
 *
 * Points every CPU's syscall entry MSR (LSTAR) at a stub in this module that
 * jumps on to the kernel's own entry (entry_SYSCALL_64): every syscall now
 * passes through module code first (a real rootkit would filter there). The
 * stub runs before the kernel switches page tables, so the guest must boot
 * with pti=off (refused otherwise). rmmod puts the old LSTAR back.
 *
 * One line on load, for tests (addresses raw):
 *   rk_lstar: hooked lstar stub=<addr> old=<addr>
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/smp.h>
#include <linux/delay.h>
#include <asm/msr.h>
#include <asm/cpufeature.h>
#include <asm/nospec-branch.h>
#include "rk_common.h"

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch test rootkit: the syscall entry MSR redirected");

/* Where the stub jumps: the original LSTAR (entry_SYSCALL_64). */
unsigned long rk_lstar_target;
void rk_lstar_stub(void);

/* No register, no stack: user GS, user stack, and IRQs are off here. */
asm(".pushsection .text, \"ax\"\n"
    ".globl rk_lstar_stub\n"
    ".type rk_lstar_stub, @function\n"
    "rk_lstar_stub:\n"
    "\tendbr64\n"
    ANNOTATE_RETPOLINE_SAFE
    "\tjmp *rk_lstar_target(%rip)\n"
    "\tint3\n"
    ".size rk_lstar_stub, .-rk_lstar_stub\n"
    ".popsection\n");

static void set_lstar(void *addr)
{
	wrmsrl(MSR_LSTAR, (unsigned long)addr);
}

static int __init rk_lstar_init(void)
{
	if (boot_cpu_has(X86_FEATURE_PTI)) {
		pr_err("page-table isolation is on: boot the guest with pti=off\n");
		return -EPERM;
	}
	rdmsrl(MSR_LSTAR, rk_lstar_target);
	on_each_cpu(set_lstar, rk_lstar_stub, 1);
	pr_info("hooked lstar stub=%px old=%px\n", rk_lstar_stub, (void *)rk_lstar_target);
	return 0;
}

static void __exit rk_lstar_exit(void)
{
	on_each_cpu(set_lstar, (void *)rk_lstar_target, 1);
	/* let any CPU still in the stub leave it */
	msleep(100);
	pr_info("unhooked lstar\n");
}

module_init(rk_lstar_init);
module_exit(rk_lstar_exit);
