// SPDX-License-Identifier: GPL-2.0
/*
 * rk_idt: TEST ROOTKIT for vmwatch's integrity scanner. Never load it on a
 * machine you care about.
 *
 * mode=gate (default): points IDT vector `vector` (default 0x81, an unused
 *   device vector whose gate normally holds a generic IRQ stub) at a handler
 *   in this module, in the kernel's own idt_table (written with CR0.WP
 *   cleared under stop_machine()).
 * mode=lidt: loads, on every CPU, a copy of the IDT in module memory with
 *   that vector changed (the kernel's idt_table is left untouched).
 * The vector never fires (no device uses it), so the handler never runs.
 * rmmod restores the gate / the IDT register.
 *
 * One line on load, for tests (addresses raw):
 *   rk_idt: hooked idt mode=<gate|lidt> vector=0x<v> handler=<addr> old=<addr> idt=<addr of the IDT now in use>
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/slab.h>
#include <linux/smp.h>
#include <linux/stop_machine.h>
#include <linux/string.h>
#include <asm/desc.h>
#include <asm/special_insns.h>
#include <asm/processor-flags.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch test rootkit: an IDT gate / the IDT register redirected");

static int vector = 0x81;
module_param(vector, int, 0444);
MODULE_PARM_DESC(vector, "IDT vector to redirect (an unused device vector)");
static char *mode = "gate";
module_param(mode, charp, 0444);
MODULE_PARM_DESC(mode, "gate (patch idt_table) | lidt (load a modified copy)");

#include "rk_common.h"

/* Never called: nothing raises the vector. */
static noinline void rk_idt_handler(void)
{
	pr_info("vector fired\n");
}

static gate_desc *idt;		/* the kernel's idt_table */
static gate_desc saved;
static gate_desc *copy;		/* mode=lidt */
static struct desc_ptr orig_dtr;
static bool lidt_mode;

static void set_handler(gate_desc *g, unsigned long addr)
{
	g->offset_low = (u16)addr;
	g->offset_middle = (u16)(addr >> 16);
	g->offset_high = (u32)(addr >> 32);
}

static unsigned long handler_of(const gate_desc *g)
{
	return (unsigned long)g->offset_low | ((unsigned long)g->offset_middle << 16) |
	       ((unsigned long)g->offset_high << 32);
}


static void load_dtr(void *arg)
{
	native_load_idt((const struct desc_ptr *)arg);
}

static struct desc_ptr new_dtr;

static int __init rk_idt_init(void)
{
	gate_desc val;
	struct wp_patch w[2] = {};
	unsigned long old;
	int err;

	if (vector < 0x20 || vector > 0xff)
		return -EINVAL;
	err = resolve_kln();
	if (err)
		return err;
	idt = (gate_desc *)kln("idt_table");
	if (!idt) {
		pr_err("no idt_table\n");
		return -ENOENT;
	}
	saved = idt[vector];
	old = handler_of(&saved);
	lidt_mode = !strcmp(mode, "lidt");
	if (lidt_mode) {
		copy = (gate_desc *)get_zeroed_page(GFP_KERNEL);
		if (!copy)
			return -ENOMEM;
		memcpy(copy, idt, IDT_ENTRIES * sizeof(gate_desc));
		set_handler(&copy[vector], (unsigned long)rk_idt_handler);
		store_idt(&orig_dtr);
		new_dtr.address = (unsigned long)copy;
		new_dtr.size = orig_dtr.size;
		on_each_cpu(load_dtr, &new_dtr, 1);
	} else {
		val = saved;
		set_handler(&val, (unsigned long)rk_idt_handler);
		w[0] = (struct wp_patch){ &idt[vector], &val, sizeof(val) };
		wp_patch_all(w);
	}
	pr_info("hooked idt mode=%s vector=0x%x handler=%px old=%px idt=%px\n",
		lidt_mode ? "lidt" : "gate", vector, rk_idt_handler, (void *)old,
		lidt_mode ? (void *)copy : (void *)idt);
	return 0;
}

static void __exit rk_idt_exit(void)
{
	struct wp_patch w[2] = { { &idt[vector], &saved, sizeof(saved) }, {} };

	if (lidt_mode) {
		on_each_cpu(load_dtr, &orig_dtr, 1);
		free_page((unsigned long)copy);
	} else {
		wp_patch_all(w);
	}
	pr_info("unhooked idt\n");
}

module_init(rk_idt_init);
module_exit(rk_idt_exit);
