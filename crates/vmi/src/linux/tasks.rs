//! Processes: the kernel's task list, from `init_task` over `tasks`.

use super::{limits, lossy, LinuxGuest, Listing};
use crate::paging::PagingError;

/// Who a thread is, in the few bytes the syscall hooks need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadIds {
    /// Kernel pid (the thread id user space sees).
    pub pid: u32,
    /// Thread-group id (the process id user space sees).
    pub tgid: u32,
    pub comm: [u8; 16],
    pub comm_len: u8,
}

impl ThreadIds {
    /// The comm bytes without padding.
    pub fn comm(&self) -> &[u8] {
        &self.comm[..usize::from(self.comm_len).min(16)]
    }
}

/// One process (thread-group leader), as the kernel's structures say.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Process {
    pub pid: i32,
    pub tgid: i32,
    pub ppid: i32,
    pub comm: String,
    /// A kernel thread's full name when longer than `comm` (what /proc/PID/comm shows).
    pub full_name: Option<String>,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    /// `/proc/PID/status`-style state letter (R, S, D, T, t, X, Z, P, I).
    pub state: char,
    /// Executable path (`mm->exe_file`); None for kernel threads.
    pub exe: Option<String>,
    /// True for kernel threads (no `mm`).
    pub kernel_thread: bool,
    /// Physical address of the page-table root (the process's CR3 without PCID bits).
    pub pgd_phys: Option<u64>,
    /// Address of the `task_struct`.
    pub task: u64,
}

/// `PF_KTHREAD` (include/linux/sched.h): stable across the kernels we support.
const PF_KTHREAD: u32 = 0x0020_0000;
/// `PF_WQ_WORKER`: a workqueue worker or rescuer.
const PF_WQ_WORKER: u32 = 0x0000_0020;

/// Maps the kernel's task state to the letter /proc shows (kernel's `task_state_index`).
fn state_letter(state: u32, exit_state: u32) -> char {
    const TASK_REPORT: u32 = 0x7f;
    const TASK_IDLE: u32 = 0x402; // TASK_UNINTERRUPTIBLE | TASK_NOLOAD
    const TASK_RTLOCK_WAIT: u32 = 0x1000;
    let mut report = (state | exit_state) & TASK_REPORT;
    if state == TASK_IDLE {
        report = TASK_REPORT + 1;
    }
    if state == TASK_RTLOCK_WAIT {
        report = 2;
    }
    let index = 32 - report.leading_zeros();
    b"RSDTtXZPI".get(index as usize).map_or('?', |&c| c as char)
}

impl LinuxGuest {
    /// Every process in the task list, `init_task` (pid 0) excluded, like /proc.
    pub fn processes(&self) -> Listing<Process> {
        let link = self.layout().task_tasks;
        self.read_kernel_list(
            self.symbol("init_task").map(|t| t.wrapping_add(link)),
            link,
            limits::MAX_TASKS,
            "task list",
            "task_struct",
            |task| self.read_process(task),
        )
    }

    /// Physical address of an mm's page-table root (what CR3 holds, less PCID bits).
    pub fn mm_pgd_phys(&self, mm: u64) -> Option<u64> {
        let pgd = self.read_ptr(mm.wrapping_add(self.layout().mm_pgd)).ok()?;
        self.kernel_space().translate(pgd).ok().map(|t| t.pa)
    }

    /// The page-table root of a task's address space; None for kernel threads.
    pub fn task_pgd_phys(&self, task: u64) -> Option<u64> {
        match self
            .read_ptr(task.wrapping_add(self.layout().task_mm))
            .ok()?
        {
            0 => None,
            mm => self.mm_pgd_phys(mm),
        }
    }

    /// (tgid, comm) of a task: two small reads, for hot paths that only
    /// need to name a task (comm changes at exec, so callers re-read it).
    pub fn task_identity(&self, task: u64) -> Result<(i32, String), PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let tgid = k.read_u32(task.wrapping_add(l.task_tgid))? as i32;
        let mut comm = vec![0u8; l.task_comm_len as usize];
        k.read(task.wrapping_add(l.task_comm), &mut comm)?;
        Ok((tgid, lossy(&comm)))
    }

    /// pid, tgid and comm of a thread: three small reads, for the syscall
    /// hooks' hot path.
    pub fn thread_ids(&self, task: u64) -> Result<ThreadIds, PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let pid = k.read_u32(task.wrapping_add(l.task_pid))?;
        let tgid = k.read_u32(task.wrapping_add(l.task_tgid))?;
        let mut comm = [0u8; 16];
        let n = (l.task_comm_len as usize).min(16);
        k.read(task.wrapping_add(l.task_comm), &mut comm[..n])?;
        let comm_len = comm.iter().position(|&b| b == 0).unwrap_or(n) as u8;
        Ok(ThreadIds {
            pid,
            tgid,
            comm,
            comm_len,
        })
    }

    /// Whether the thread `tid` still lives at `task`: its pid is `tid` and it
    /// has not exited. False also when the memory cannot be read.
    pub fn thread_alive(&self, task: u64, tid: u32) -> bool {
        let l = self.layout();
        let k = self.kernel_space();
        let pid = k.read_u32(task.wrapping_add(l.task_pid));
        let exit_state = k.read_u32(task.wrapping_add(l.task_exit_state));
        matches!((pid, exit_state), (Ok(p), Ok(0)) if p == tid)
    }

    /// Reads one `task_struct`.
    pub fn read_process(&self, task: u64) -> Result<Process, PagingError> {
        let k = self.kernel_space();
        let l = self.layout();
        let pid = k.read_u32(task.wrapping_add(l.task_pid))? as i32;
        let tgid = k.read_u32(task.wrapping_add(l.task_tgid))? as i32;
        let mut comm = vec![0u8; l.task_comm_len as usize];
        k.read(task.wrapping_add(l.task_comm), &mut comm)?;
        let parent = self.read_ptr(task.wrapping_add(l.task_real_parent))?;
        // pid 1's and kthreadd's parent is init_task, whose tgid is 0, as /proc shows.
        let ppid = k.read_u32(parent.wrapping_add(l.task_tgid))? as i32;
        let cred = self.read_ptr(task.wrapping_add(l.task_cred))?;
        let uid = k.read_u32(cred.wrapping_add(l.cred_uid))?;
        let euid = k.read_u32(cred.wrapping_add(l.cred_euid))?;
        let gid = k.read_u32(cred.wrapping_add(l.cred_gid))?;
        let state = k.read_u32(task.wrapping_add(l.task_state))?;
        let exit_state = k.read_u32(task.wrapping_add(l.task_exit_state))?;
        let mm = self.read_ptr(task.wrapping_add(l.task_mm))?;
        let flags = k.read_u32(task.wrapping_add(l.task_flags))?;
        // As /proc does: workqueue workers show their comm plus work queue, other
        // kernel threads their full name.
        let full_name = if flags & PF_KTHREAD != 0 && flags & PF_WQ_WORKER == 0 {
            self.kthread_full_name(task)
        } else {
            None
        };
        let (exe, pgd_phys) = if mm == 0 {
            (None, None)
        } else {
            let exe_file = self.read_ptr(mm.wrapping_add(l.mm_exe_file)).unwrap_or(0);
            let exe = if exe_file == 0 {
                None
            } else {
                self.file_path(exe_file).ok()
            };
            let pgd_phys = self.mm_pgd_phys(mm);
            (exe, pgd_phys)
        };
        Ok(Process {
            pid,
            tgid,
            ppid,
            comm: lossy(&comm),
            full_name,
            uid,
            euid,
            gid,
            state: state_letter(state, exit_state),
            exe,
            kernel_thread: mm == 0,
            pgd_phys,
            task,
        })
    }

    /// The task a CPU is running, from that CPU's per-cpu base (the kernel's
    /// GS base: `gs_base` in kernel mode, `kernel_gs_base` in user mode). The
    /// per-cpu variable is `pcpu_hot.current_task` (6.2+) or `current_task`;
    /// per-cpu symbols are offsets, not moved by KASLR.
    pub fn current_task(&self, percpu_base: u64) -> Result<u64, PagingError> {
        // The offset is looked up once per profile: this runs on every hooked syscall.
        let offset = self.profile().current_task_offset;
        self.read_ptr(percpu_base.wrapping_add(offset))
    }

    /// `to_kthread(task)->full_name`, when the kernel keeps one.
    fn kthread_full_name(&self, task: u64) -> Option<String> {
        let l = self.layout();
        let kthread = self
            .read_ptr(task.wrapping_add(l.task_worker_private?))
            .ok()?;
        if kthread == 0 {
            return None;
        }
        let name = self
            .read_ptr(kthread.wrapping_add(l.kthread_full_name?))
            .ok()?;
        if name == 0 {
            return None;
        }
        let bytes = self.kernel_space().read_cstring(name, 64).ok()?;
        Some(lossy(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::state_letter;

    #[test]
    fn state_letters_match_the_kernel() {
        assert_eq!(state_letter(0, 0), 'R');
        assert_eq!(state_letter(1, 0), 'S');
        assert_eq!(state_letter(2, 0), 'D');
        assert_eq!(state_letter(4, 0), 'T');
        assert_eq!(state_letter(8, 0), 't');
        assert_eq!(state_letter(0, 0x20), 'Z');
        assert_eq!(state_letter(0x402, 0), 'I');
        assert_eq!(state_letter(0x40, 0), 'P');
    }
}
