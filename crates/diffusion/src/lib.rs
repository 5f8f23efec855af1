//! Confidential-information diffusion tracking (issue 4; papers 000 and 001).
//!
//! Users register confidential paths per VM. From the guest's syscall
//! records ([`events::Record`], entry and return, with the file identities
//! the plugin captured at the instruction) the engine keeps, per VM, the set
//! of *managed* objects — files (device + inode, current names), processes
//! (tgid, comm, exe), pipes, unix and inet sockets — that may hold a
//! registered file's content, and for each the edge that made it managed:
//! which process, which syscall, which source object, when.
//!
//! What users get:
//! - the **delta log**: one [`DeltaEvent`] per change, never a re-dump
//!   (`2026-11-21T10:00:01.123Z web1 +process 774 cp  via read(/root/secret.txt)`),
//!   removals the moment they happen (`-process 774 cp (exit)`,
//!   `-file /root/copy02-secret.txt (unlink)`), and leaks
//!   (`!leak 774 cp -> 10.0.2.2:8080 (120 bytes)`);
//! - the **bulk view** ([`DiffusionEngine::graph`]): the graph as it stood at
//!   any time, objects that left included and marked, as text, JSON or dot;
//! - **persistence**: an append-only SQLite log under the data directory;
//!   the current state is rebuilt from it at start (a restart loses no
//!   managed object and no history), any past state by replay up to a time.
//!   A store that cannot be read is an error telling what to do, never
//!   silently replaced.
//!
//! # Propagation rules
//! The unit is the process (tgid): any thread of a managed process acts for
//! it. Records without a named thread (plugin without `vmlinux=`) are ignored.
//! Times are the host's `CLOCK_MONOTONIC` at the instruction, shown as UTC
//! through an offset taken when the engine starts.
//!
//! 1. **Registration.** A registered path becomes a managed file as soon as
//!    any record shows a file identity (device, inode) with that path — the
//!    result of the `openat` that creates or opens it, an fd argument — or
//!    when the daemon's list of fds open at registration time has it; the
//!    processes holding it then become managed too. If a later identity for
//!    the path differs (the file was deleted and recreated, or replaced by a
//!    rename), the new inode is managed and the old one loses the name.
//! 2. **Reads.** A process that reads from a managed file, pipe or socket
//!    (`read`, `pread64`, `readv`, `preadv`, `preadv2`, `recvfrom`, `recvmsg`,
//!    `recvmmsg` with a result > 0; `mmap` with `PROT_READ` of a managed file;
//!    the source of `sendfile`, `splice`, `copy_file_range`, `tee` with a
//!    result > 0) becomes managed. The source is the identity of the fd
//!    argument captured at entry, so an fd inherited across `fork` or passed
//!    by `dup2` is followed without an fd table.
//! 3. **Writes.** A managed process that writes to a file, pipe or socket
//!    (`write`, `pwrite64`, `writev`, `pwritev`, `pwritev2`, `sendto`,
//!    `sendmsg`, `sendmmsg` with a result > 0; the destination of `sendfile`,
//!    `splice`, `copy_file_range`, `tee`; a `MAP_SHARED` writable `mmap`)
//!    makes it managed. Truncation or overwrite keeps a file managed.
//!    Devices, terminals, directories and anonymous inodes are not tracked.
//! 4. **Shared mappings.** While a `MAP_SHARED` mapping exists (until the
//!    process execs or exits), content moves without syscalls: a process that
//!    becomes managed makes its shared writable mapped files managed, and a
//!    file that becomes managed makes the processes mapping it shared
//!    readable managed. (`munmap` is not followed: conservative.)
//! 5. **Processes.** Children of a managed process are managed: `fork`,
//!    `vfork`, `clone` without `CLONE_THREAD` (child id from the result);
//!    `clone3` keeps its flags in user memory, so its child counts as a
//!    process once a later record shows `pid == tgid ==` that id. A child's
//!    records may reach the ring before its parent's fork return: the
//!    child's writes of the last seconds are kept and replayed, and a child
//!    that already exited is added and removed. `execve` keeps a process
//!    managed under its new name (`~process 775 sh -> cp (execve /usr/bin/cp)`).
//! 6. **Names.** `rename`/`renameat`/`renameat2` (also `RENAME_EXCHANGE` and
//!    directory renames) and `link`/`linkat` keep a file managed under its new
//!    name; the next file identity seen for the inode also corrects its name.
//!    Relative paths are resolved against the process's working directory
//!    (from `chdir`/`fchdir`, inherited at fork, or implied by a relative
//!    `open` whose result shows the absolute path); paths relative to another
//!    directory fd are left to the next identity.
//! 7. **Removal.** `unlink`/`unlinkat` (result 0) of a managed file's last
//!    name removes it (`-file PATH (unlink)`; another name of a hard-linked
//!    file only loses that name); `exit_group` removes a managed process
//!    (`-process 774 cp (exit)`); the daemon reports processes killed by a
//!    signal ([`DiffusionEngine::process_gone`]) and pipes and sockets no
//!    process holds any more ([`DiffusionEngine::channel_gone`]): records
//!    alone cannot tell the last close. A VM that stops, or comes back with a
//!    new SMBIOS UUID, loses its processes, pipes and sockets; files stay.
//! 8. **Sockets inside the VM.** A socket's peer comes from `connect`'s
//!    address (entry) with the socket's identity, `accept`/`accept4`'s
//!    returned address with the result's identity, `getpeername`, the sender
//!    of `recvfrom`/`recvmsg`, or the daemon ([`DiffusionEngine::learn_socket`]).
//!    The two ends of a local connection (unix path, loopback, or the VM's own
//!    address) are linked by matching the `connect` with the `accept` on the
//!    listener bound to that address (by the client's port when known, else
//!    in order); the two ends of a `socketpair` are linked as their fds show
//!    their inodes. A linked socket that becomes managed makes its other end
//!    managed (`via peer(socket:[..])`). A managed datagram to a local
//!    address makes the sockets bound there managed.
//! 9. **Leaks.** A managed process that sends through an inet socket whose
//!    destination (the call's address, else the socket's peer) is outside
//!    the VM and not loopback raises a leak: `!leak 774 cp -> 10.0.2.2:8080
//!    (120 bytes)`. The first send per (process, destination) is reported at
//!    once; later ones are summed per [`Config::send_window_ns`].
//! 10. **Across VMs.** If the destination is an address of another watched VM
//!     ([`DiffusionEngine::set_vm_addresses`]), it is a flow, not a leak
//!     (`>send 774 nc -> web2 10.0.3.2:9000 (120 bytes)` in the sender's log):
//!     in the receiving VM the socket whose peer is the sender's address (and
//!     port, when known) and whose local port is the destination port becomes
//!     managed with an edge naming the source VM (`via write by web1:774 nc`).
//!     Whichever VM's records come first: flows wait
//!     [`Config::flow_ttl_ns`] for the receiving side, and the receiving
//!     VM's recent reads from such sockets (and what those readers wrote
//!     since) are replayed when the flow arrives.
//!
//! # Bounds
//! Every table is capped ([`Limits`]): managed objects per VM (past the cap
//! nothing new is tracked and one `overflow` event says so), pending
//! syscalls, helper tables, recent I/O, flows, registrations. What was
//! dropped is counted in [`Stats`] and [`Health`].

mod bounded;
mod engine;
mod error;
mod graph;
mod model;
mod net;
mod paths;
mod rules;
mod state;
mod store;
mod sys;
mod time;

pub use engine::{
    Config, DiffusionEngine, FileIdentity, Health, Interest, Limits, OpenFile, Stats, VmRef,
};
pub use error::DiffusionError;
pub use graph::{Graph, Left, Node, SendEdge};
pub use model::{Change, DeltaEvent, Edge, ObjectInfo, ObjectKey, ProcRef, Reason, Source};
pub use net::NetAddr;
pub use state::{ManagedObject, Registration};
pub use store::STORE_FILE;
pub use time::{format_time, parse_time, Clock, ManualClock, SystemClock};
