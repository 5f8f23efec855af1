// SPDX-License-Identifier: GPL-2.0
/*
 * rk_lstar: TEST ROOTKIT for vmwatch's integrity scanner. Never load it on a
 * machine you care about.
 *
 * Points every CPU's syscall entry MSR at a stub in this module that jumps
 * on to the kernel's own entry: every syscall now passes through module code
 * first (a real rootkit would filter there). msr=lstar (default: 64-bit
 * `syscall`, entry_SYSCALL_64), msr=sysenter (SYSENTER_EIP, 32-bit
 * `sysenter`, entry_SYSENTER_compat) or msr=cstar (32-bit `syscall`). The
 * LSTAR stub runs before the kernel switches page tables, so msr=lstar needs
 * a guest booted with pti=off (refused otherwise). rmmod puts the old value
 * back.
 *
 * One line on load, for tests (addresses raw):
 *   rk_lstar: hooked <msr> stub=<addr> old=<addr>
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/smp.h>
#include <linux/delay.h>
#include <linux/string.h>
#include <asm/msr.h>
#include <asm/cpufeature.h>
#include <asm/nospec-branch.h>
#include "rk_common.h"

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch test rootkit: the syscall entry MSR redirected");

static char *msr = "lstar";
module_param(msr, charp, 0444);
MODULE_PARM_DESC(msr, "lstar, sysenter or cstar");

static u32 rk_msr;

/* Where the stub jumps: the MSR's original value (the kernel's entry). */
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

static void set_msr(void *addr)
{
	wrmsrl(rk_msr, (unsigned long)addr);
}

static int __init rk_lstar_init(void)
{
	if (!strcmp(msr, "lstar")) {
		rk_msr = MSR_LSTAR;
		if (boot_cpu_has(X86_FEATURE_PTI)) {
			pr_err("page-table isolation is on: boot the guest with pti=off\n");
			return -EPERM;
		}
	} else if (!strcmp(msr, "sysenter")) {
		rk_msr = MSR_IA32_SYSENTER_EIP;
	} else if (!strcmp(msr, "cstar")) {
		rk_msr = MSR_CSTAR;
	} else {
		pr_err("msr=%s: expected lstar, sysenter or cstar\n", msr);
		return -EINVAL;
	}
	rdmsrl(rk_msr, rk_lstar_target);
	on_each_cpu(set_msr, rk_lstar_stub, 1);
	pr_info("hooked %s stub=%px old=%px\n", msr, rk_lstar_stub, (void *)rk_lstar_target);
	return 0;
}

static void __exit rk_lstar_exit(void)
{
	on_each_cpu(set_msr, (void *)rk_lstar_target, 1);
	/* let any CPU still in the stub leave it */
	msleep(100);
	pr_info("unhooked lstar\n");
}

module_init(rk_lstar_init);
module_exit(rk_lstar_exit);
