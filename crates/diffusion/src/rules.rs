//! The propagation rules: how one record changes a VM's managed set (see the
//! crate documentation for the rules in words).

use events::payload::{Item, RESULT};
use events::{Kind, Record};

use crate::engine::{
    bound_push, lossy, socket_info, DiffusionEngine, Endpoint, FileRef, Flow, Mapping, PendingCall,
    PendingChild, PendingPair, ProcAux, QueuedConn, RecentIo, SendAgg, Vm,
};
use crate::model::{Change, Edge, ObjectInfo, ObjectKey, ProcRef, Reason, Source};
use crate::net::{is_host_local, NetAddr};
use crate::paths;
use crate::sys;

/// Most items of one kind kept from one record (a record has six arguments).
const MAX_ITEMS: usize = 6;
/// `renameat2` flag: swap the two names.
const RENAME_EXCHANGE: u64 = 2;

impl DiffusionEngine {
    pub(crate) fn handle_record(&mut self, vm: &mut Vm, rec: &Record) {
        vm.stats.records += 1;
        if !rec.has_task() {
            vm.stats.unattributed += 1;
            return;
        }
        if vm.aux.clone3.len() > 0 {
            self.confirm_clone3(vm, rec);
        }
        match rec.kind {
            Kind::Entry => self.on_entry(vm, rec),
            Kind::Return => self.on_return(vm, rec),
            Kind::Log => {}
        }
    }

    fn on_entry(&mut self, vm: &mut Vm, rec: &Record) {
        let nr = rec.nr;
        if !sys::is_watched(nr) {
            return;
        }
        let at = self.wall(rec.time_ns);
        let mut call = PendingCall {
            nr,
            seq: rec.seq,
            time_ns: rec.time_ns,
            tgid: rec.tgid,
            comm: String::new(),
            args: rec.args,
            files: Vec::new(),
            paths: Vec::new(),
            addr: None,
        };
        for item in rec.items() {
            match item {
                Item::Comm(c) => call.comm = lossy(c),
                Item::File { arg, file } if arg < 6 && call.files.len() < MAX_ITEMS => {
                    call.files.push((
                        arg,
                        FileRef::new(file.dev, file.ino, file.kind, file.path, file.cut),
                    ));
                }
                Item::Str {
                    arg,
                    bytes,
                    cut: false,
                } if call.paths.len() < MAX_ITEMS => call.paths.push((arg, lossy(bytes))),
                Item::SockAddr { arg, bytes, .. } => {
                    if let Some(a) = NetAddr::parse(bytes) {
                        call.addr = Some((arg, a));
                    }
                }
                _ => {}
            }
        }
        if call.comm.is_empty() {
            call.comm = "?".into();
        }
        let syscall = rec.name();
        for (arg, f) in &call.files {
            self.observe_file(vm, &call, f, at, syscall);
            if let Some(ObjectKey::Socket { ino }) = f.key {
                let fd = call.args[usize::from(*arg)] as i32;
                self.learn_pair_fd(vm, call.tgid, fd, ino, at);
            }
        }
        match nr {
            sys::EXIT_GROUP => {
                self.process_exit(vm, call.tgid, rec.time_ns, Reason::Exit);
                return;
            }
            sys::LISTEN => {
                if let Some(ObjectKey::Socket { ino }) = call.file(0).and_then(|f| f.key) {
                    if let Some(s) = vm.aux.socket(ino) {
                        s.listener = true;
                    }
                }
                return;
            }
            _ => {}
        }
        if sys::wants_return(nr) {
            let cap = self.config.limits.pending_calls_per_vm.max(1);
            while vm.aux.pending.len() >= cap {
                vm.aux.pending.pop_first();
                vm.stats.pending_dropped += 1;
            }
            vm.aux.pending.insert(rec.seq, call);
        }
    }

    fn on_return(&mut self, vm: &mut Vm, rec: &Record) {
        let Some(call) = vm.aux.pending.remove(&rec.entry_seq) else {
            if sys::is_watched(rec.nr) {
                vm.stats.unpaired_returns += 1;
            }
            return;
        };
        let nr = call.nr;
        let at = self.wall(rec.time_ns);
        let t = rec.time_ns;
        let syscall = events::syscalls::name(nr).unwrap_or("?");
        let mut result = None;
        let mut ret_addr = None;
        let mut pair = None;
        for item in rec.items() {
            match item {
                Item::File { arg: RESULT, file } => {
                    result = Some(FileRef::new(
                        file.dev, file.ino, file.kind, file.path, file.cut,
                    ));
                }
                Item::SockAddr { arg, bytes, .. } => {
                    if let Some(a) = NetAddr::parse(bytes) {
                        ret_addr = Some((arg, a));
                    }
                }
                Item::FdPair { fds, .. } => pair = Some(fds),
                _ => {}
            }
        }
        if let Some(f) = &result {
            self.observe_file(vm, &call, f, at, syscall);
        }
        let ret = rec.ret;
        if ret < 0 && !(nr == sys::CONNECT && ret == sys::EINPROGRESS) {
            return;
        }
        let amount = u64::try_from(ret).unwrap_or(0);
        match nr {
            n if sys::is_read(n) => {
                if let (true, Some(f)) = (amount > 0, call.file(0)) {
                    self.read_from(vm, &call, f, t, syscall);
                }
            }
            n if sys::is_recv(n) => {
                if amount == 0 {
                    return;
                }
                let sender_arg = if n == sys::RECVFROM { 4 } else { 1 };
                if let (Some(ObjectKey::Socket { ino }), Some((arg, a))) =
                    (call.file(0).and_then(|f| f.key), &ret_addr)
                {
                    if *arg == sender_arg {
                        self.learn_peer(vm, ino, a.clone(), t);
                    }
                }
                if let Some(f) = call.file(0) {
                    self.read_from(vm, &call, f, t, syscall);
                }
            }
            n if sys::is_write(n) => {
                if let (true, Some(f)) = (amount > 0, call.file(0)) {
                    self.write_to(vm, &call, f, None, (amount, 1), at, syscall);
                }
            }
            n if sys::is_send(n) => {
                if amount == 0 {
                    return;
                }
                let explicit = match n {
                    sys::SENDTO => call.addr(4).cloned(),
                    sys::SENDMSG => call.addr(1).cloned(),
                    _ => None,
                };
                // sendmmsg returns a message count, not bytes.
                let amount = if n == sys::SENDMMSG {
                    (0, amount)
                } else {
                    (amount, 1)
                };
                if let Some(f) = call.file(0) {
                    self.write_to(vm, &call, f, explicit, amount, at, syscall);
                }
            }
            n if sys::copy_args(n).is_some() => {
                let Some((src, dst)) = sys::copy_args(n) else {
                    return;
                };
                if amount == 0 {
                    return;
                }
                if let Some(f) = call.file(src) {
                    self.read_from(vm, &call, f, t, syscall);
                }
                if let Some(f) = call.file(dst) {
                    self.write_to(vm, &call, f, None, (amount, 1), at, syscall);
                }
            }
            sys::MMAP => self.mmap(vm, &call, t, at),
            sys::OPEN | sys::CREAT | sys::OPENAT | sys::OPENAT2 => {
                if let Some(f) = &result {
                    self.learn_cwd_from_open(vm, &call, f);
                }
            }
            sys::FORK | sys::VFORK | sys::CLONE => {
                let thread = nr == sys::CLONE && call.args[0] & sys::CLONE_THREAD != 0;
                if let (false, Ok(child)) = (thread, u32::try_from(ret)) {
                    let managed = vm.set.contains(&ObjectKey::Process { tgid: call.tgid });
                    let parent = ProcRef {
                        tgid: call.tgid,
                        comm: call.comm.clone(),
                    };
                    self.child_created(
                        vm,
                        &parent,
                        child,
                        managed,
                        call.time_ns,
                        call.seq,
                        syscall,
                        at,
                    );
                }
            }
            sys::CLONE3 => {
                if let Ok(child) = u32::try_from(ret) {
                    self.clone3_child(vm, &call, child, at);
                }
            }
            sys::EXECVE | sys::EXECVEAT if ret == 0 => self.exec(vm, &call, at),
            sys::RENAME | sys::RENAMEAT | sys::RENAMEAT2 if ret == 0 => {
                self.rename(vm, &call, at, syscall);
            }
            sys::LINK | sys::LINKAT if ret == 0 => self.link_name(vm, &call, at, syscall),
            sys::UNLINK | sys::UNLINKAT if ret == 0 => self.unlink(vm, &call, at, syscall),
            sys::CHDIR if ret == 0 => {
                if let Some(dir) = call
                    .path(0)
                    .and_then(|p| self.resolve(vm, call.tgid, p, None))
                {
                    self.set_cwd(vm, call.tgid, dir);
                }
            }
            sys::FCHDIR if ret == 0 => {
                if let Some(dir) = call.file(0).and_then(FileRef::usable_name) {
                    let dir = dir.to_string();
                    self.set_cwd(vm, call.tgid, dir);
                }
            }
            sys::CONNECT => self.connected(vm, &call, t, at),
            sys::BIND if ret == 0 => {
                if let (Some(ObjectKey::Socket { ino }), Some(addr)) =
                    (call.file(0).and_then(|f| f.key), call.addr(1))
                {
                    if let Some(s) = vm.aux.socket(ino) {
                        s.local = Some(addr.clone());
                    }
                    if let Some(ep) = Endpoint::of_local(addr) {
                        bound_push(&mut vm.aux, ep, ino);
                    }
                }
            }
            sys::ACCEPT | sys::ACCEPT4 => {
                let peer = ret_addr.filter(|(arg, _)| *arg == 1).map(|(_, a)| a);
                self.accepted(vm, &call, result.as_ref(), peer, t, at);
            }
            sys::GETSOCKNAME if ret == 0 => {
                if let (Some(ObjectKey::Socket { ino }), Some((1, a))) =
                    (call.file(0).and_then(|f| f.key), ret_addr)
                {
                    if let Some(s) = vm.aux.socket(ino) {
                        s.local = Some(a);
                    }
                }
            }
            sys::GETPEERNAME if ret == 0 => {
                if let (Some(ObjectKey::Socket { ino }), Some((1, a))) =
                    (call.file(0).and_then(|f| f.key), ret_addr)
                {
                    self.learn_peer(vm, ino, a, t);
                }
            }
            sys::SOCKETPAIR if ret == 0 => {
                if let Some(fds) = pair {
                    let cap = self.config.limits.helper_entries_per_vm;
                    push_bounded(
                        &mut vm.aux.pairs,
                        PendingPair {
                            tgid: call.tgid,
                            fds,
                            inos: [None, None],
                        },
                        cap,
                        &mut vm.aux.queue_dropped,
                    );
                }
            }
            _ => {}
        }
    }

    /// A file identity in a record: a registered path names it (it becomes
    /// managed), or a managed file shows up under a new name (the name follows).
    fn observe_file(
        &mut self,
        vm: &mut Vm,
        call: &PendingCall,
        f: &FileRef,
        at: i64,
        syscall: &str,
    ) {
        let Some(key @ ObjectKey::File { .. }) = f.key else {
            return;
        };
        let Some(path) = f.usable_name() else {
            return;
        };
        if vm.set.contains(&key) {
            let names = vm.set.file_names(&key);
            if names.iter().any(|n| n == path) {
                return;
            }
            let from = names.first().cloned();
            let by = Some(self.proc_ref(vm, call.tgid, &call.comm));
            self.take_name(vm, path, key, at, syscall, by.clone());
            self.emit(
                vm,
                at,
                Change::Renamed {
                    object: key,
                    from,
                    to: Some(path.to_string()),
                    syscall: syscall.to_string(),
                    by,
                },
            );
        } else if vm.set.is_registered(path) {
            self.take_name(vm, path, key, at, syscall, None);
            self.manage(
                vm,
                key,
                ObjectInfo::File {
                    names: vec![path.to_string()],
                },
                Edge {
                    syscall: "track".into(),
                    from: None,
                    seq: Some(call.seq),
                },
                at,
            );
        }
    }

    /// The caller read content from `f`: a managed source makes it managed.
    fn read_from(
        &mut self,
        vm: &mut Vm,
        call: &PendingCall,
        f: &FileRef,
        t: u64,
        syscall: &'static str,
    ) {
        let Some(key) = f.key else {
            return;
        };
        let p = ObjectKey::Process { tgid: call.tgid };
        if vm.set.contains(&p) {
            return;
        }
        if vm.set.contains(&key) {
            let edge = Edge {
                syscall: syscall.to_string(),
                from: Some(Source {
                    vm: None,
                    object: key,
                    label: vm.set.label(&key),
                }),
                seq: Some(call.seq),
            };
            let info = self.proc_info(vm, call.tgid, &call.comm);
            let at = self.wall(t);
            self.manage(vm, p, info, edge, at);
        } else if let ObjectKey::Socket { ino } = key {
            // From another host or VM: if it turns out to be a cross-VM flow
            // whose sender's records come later, this read is replayed.
            let remote = vm
                .aux
                .sockets
                .get(&ino)
                .and_then(|s| s.peer.as_ref())
                .and_then(NetAddr::inet)
                .is_some_and(|sa| !is_host_local(sa.ip()));
            if remote {
                let io = recent(call, key, f, syscall, t, None, (0, 0));
                self.remember_read(vm, io);
            }
        }
    }

    /// The caller wrote its content to `f` (`amount`: bytes, calls).
    #[allow(clippy::too_many_arguments)]
    fn write_to(
        &mut self,
        vm: &mut Vm,
        call: &PendingCall,
        f: &FileRef,
        explicit: Option<NetAddr>,
        amount: (u64, u64),
        at: i64,
        syscall: &'static str,
    ) {
        let Some(key) = f.key else {
            return;
        };
        if !vm.set.contains(&ObjectKey::Process { tgid: call.tgid }) {
            // Kept a while: a late fork return (or cross-VM match) may show
            // the writer was managed already.
            let io = recent(call, key, f, syscall, call.time_ns, explicit, amount);
            self.remember_write(vm, io);
            return;
        }
        self.write_managed(
            vm,
            call.tgid,
            key,
            f,
            explicit,
            amount,
            call.time_ns,
            call.seq,
            syscall,
            at,
        );
    }

    /// Managed process `tgid` wrote to `key`: it becomes managed; through a
    /// socket, the content goes on to the destination (another local socket,
    /// another watched VM, or out: a leak).
    #[allow(clippy::too_many_arguments)]
    fn write_managed(
        &mut self,
        vm: &mut Vm,
        tgid: u32,
        key: ObjectKey,
        f: &FileRef,
        explicit: Option<NetAddr>,
        amount: (u64, u64),
        time_ns: u64,
        seq: u64,
        syscall: &'static str,
        at: i64,
    ) {
        let by = self.proc_ref(vm, tgid, "?");
        let edge = Edge {
            syscall: syscall.to_string(),
            from: Some(Source {
                vm: None,
                object: ObjectKey::Process { tgid },
                label: by.to_string(),
            }),
            seq: Some(seq),
        };
        let info = match key {
            ObjectKey::File { .. } => {
                let names: Vec<String> = f.usable_name().map(str::to_string).into_iter().collect();
                if let (false, Some(n)) = (vm.set.contains(&key), names.first()) {
                    self.take_name(vm, n, key, at, syscall, Some(by.clone()));
                }
                ObjectInfo::File { names }
            }
            ObjectKey::Pipe { ino } => ObjectInfo::Pipe {
                name: if f.path.is_empty() {
                    format!("pipe:[{ino}]")
                } else {
                    f.path.clone()
                },
            },
            ObjectKey::Socket { ino } => {
                socket_info(vm, ino, Some(f.path.as_str()).filter(|p| !p.is_empty()))
            }
            ObjectKey::Process { .. } => return,
        };
        self.manage(vm, key, info, edge, at);
        if let ObjectKey::Socket { ino } = key {
            self.socket_send(vm, by, ino, explicit, amount, time_ns, seq, syscall, at);
        }
    }

    /// Where a managed send through socket `ino` goes.
    #[allow(clippy::too_many_arguments)]
    fn socket_send(
        &mut self,
        vm: &mut Vm,
        by: ProcRef,
        ino: u64,
        explicit: Option<NetAddr>,
        amount: (u64, u64),
        time_ns: u64,
        seq: u64,
        syscall: &'static str,
        at: i64,
    ) {
        let dest = explicit.or_else(|| vm.aux.sockets.get(&ino).and_then(|s| s.peer.clone()));
        let Some(dest) = dest else {
            return;
        };
        if let Some(ep) = self.local_endpoint(vm, &dest) {
            self.deliver_local(vm, ino, ep, seq, syscall, at);
            return;
        }
        let NetAddr::Inet(sa) = dest else {
            return;
        };
        let to_vm = self.owner_other(&vm.name, sa.ip());
        self.send_event(vm, &by, ino, dest, to_vm.clone(), amount, time_ns, at);
        if let Some(other) = to_vm {
            self.flow(vm, by, ino, sa, &other, syscall, time_ns);
        }
    }

    /// A datagram to a local endpoint: the sockets bound there receive it.
    fn deliver_local(
        &mut self,
        vm: &mut Vm,
        from: u64,
        ep: Endpoint,
        seq: u64,
        syscall: &str,
        at: i64,
    ) {
        let targets: Vec<u64> = vm
            .aux
            .bound
            .get(&ep)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&t| t != from)
                    .filter(|t| !vm.aux.sockets.get(t).is_some_and(|s| s.listener))
                    .collect()
            })
            .unwrap_or_default();
        let src = ObjectKey::Socket { ino: from };
        for t in targets {
            let edge = Edge {
                syscall: syscall.to_string(),
                from: Some(Source {
                    vm: None,
                    object: src,
                    label: vm.set.label(&src),
                }),
                seq: Some(seq),
            };
            let info = socket_info(vm, t, None);
            self.manage(vm, ObjectKey::Socket { ino: t }, info, edge, at);
        }
    }

    /// A managed send leaving the VM: reported at once for a new (process,
    /// destination), then summed per window. `t`: the send's entry
    /// (monotonic, for the window), `at`: its return (wall, for the event).
    #[allow(clippy::too_many_arguments)]
    fn send_event(
        &mut self,
        vm: &mut Vm,
        by: &ProcRef,
        ino: u64,
        dst: NetAddr,
        to_vm: Option<String>,
        (bytes, calls): (u64, u64),
        t: u64,
        at: i64,
    ) {
        let key = (by.tgid, dst.clone());
        let window = self.config.send_window_ns;
        if let Some(agg) = vm.aux.sends.get_mut(&key) {
            agg.bytes = agg.bytes.saturating_add(bytes);
            agg.calls = agg.calls.saturating_add(calls);
            agg.last_ns = agg.last_ns.max(t);
            if t.saturating_sub(agg.last_emit_ns) < window {
                return;
            }
            let (bytes, calls) = (agg.bytes, agg.calls);
            agg.bytes = 0;
            agg.calls = 0;
            agg.last_emit_ns = t;
            let change = Change::Send {
                by: agg.by.clone(),
                socket: agg.socket,
                dst,
                to_vm: agg.to_vm.clone(),
                bytes,
                calls,
            };
            self.emit(vm, at, change);
            return;
        }
        if vm.aux.sends.len() >= self.config.limits.helper_entries_per_vm {
            // Nothing summed may be lost when the oldest entry is forgotten.
            self.flush_sends(vm, |_, _| true);
        }
        let socket = Some(ObjectKey::Socket { ino });
        vm.aux.sends.insert(
            key,
            SendAgg {
                by: by.clone(),
                socket,
                to_vm: to_vm.clone(),
                last_emit_ns: t,
                last_ns: t,
                bytes: 0,
                calls: 0,
            },
        );
        self.emit(
            vm,
            at,
            Change::Send {
                by: by.clone(),
                socket,
                dst,
                to_vm,
                bytes,
                calls,
            },
        );
    }

    /// Whether `dest` is inside this VM: a unix path, loopback, or one of
    /// the VM's own addresses.
    fn local_endpoint(&self, vm: &Vm, dest: &NetAddr) -> Option<Endpoint> {
        match dest {
            NetAddr::Unix(p) if !p.is_empty() => Some(Endpoint::Unix(p.clone())),
            NetAddr::Unix(_) => None,
            NetAddr::Inet(sa) => (is_host_local(sa.ip()) || self.owns(&vm.name, sa.ip()))
                .then_some(Endpoint::Port(sa.port())),
        }
    }

    fn mmap(&mut self, vm: &mut Vm, call: &PendingCall, t: u64, at: i64) {
        let Some(f) = call.file(4) else {
            return;
        };
        let Some(key @ ObjectKey::File { .. }) = f.key else {
            return;
        };
        let (prot, flags) = (call.args[2], call.args[3]);
        let readable = prot & sys::PROT_READ != 0;
        let shared = flags & sys::MAP_TYPE != sys::MAP_PRIVATE && flags & sys::MAP_TYPE != 0;
        let writable = shared && prot & sys::PROT_WRITE != 0;
        if readable {
            self.read_from(vm, call, f, t, "mmap");
        }
        if writable && vm.set.contains(&ObjectKey::Process { tgid: call.tgid }) {
            self.write_managed(
                vm,
                call.tgid,
                key,
                f,
                None,
                (0, 0),
                call.time_ns,
                call.seq,
                "mmap",
                at,
            );
        }
        if shared {
            let cap = self.config.limits.helper_entries_per_vm;
            push_bounded(
                &mut vm.aux.mappings,
                Mapping {
                    tgid: call.tgid,
                    comm: call.comm.clone(),
                    file: key,
                    name: f.usable_name().unwrap_or(&f.path).to_string(),
                    readable,
                    writable,
                },
                cap,
                &mut vm.aux.queue_dropped,
            );
        }
    }

    fn learn_cwd_from_open(&mut self, vm: &mut Vm, call: &PendingCall, result: &FileRef) {
        let (arg, from_cwd) = match call.nr {
            sys::OPEN | sys::CREAT => (0, true),
            _ => (1, call.args[0] as i32 == sys::AT_FDCWD),
        };
        if !from_cwd {
            return;
        }
        let (Some(rel), Some(abs)) = (call.path(arg), result.usable_name()) else {
            return;
        };
        if let Some(cwd) = paths::cwd_from_open(rel, abs) {
            self.set_cwd(vm, call.tgid, cwd);
        }
    }

    fn set_cwd(&mut self, vm: &mut Vm, tgid: u32, dir: String) {
        if let Some(p) = vm.aux.procs.entry(tgid, ProcAux::default) {
            p.cwd = Some(dir);
        }
    }

    /// `path` as process `tgid` named it (relative to its cwd, or to
    /// `dirfd` when that is not `AT_FDCWD`: then unknown).
    fn resolve(&self, vm: &Vm, tgid: u32, path: &str, dirfd: Option<u64>) -> Option<String> {
        if path.starts_with('/') {
            return paths::normalize(path);
        }
        if dirfd.is_some_and(|fd| fd as i32 != sys::AT_FDCWD) {
            return None;
        }
        paths::resolve(vm.aux.procs.get(&tgid).and_then(|p| p.cwd.as_deref()), path)
    }

    /// A new process `child` of `parent` (fork, vfork, clone, confirmed clone3).
    #[allow(clippy::too_many_arguments)]
    fn child_created(
        &mut self,
        vm: &mut Vm,
        parent: &ProcRef,
        child: u32,
        parent_managed: bool,
        fork_ns: u64,
        seq: u64,
        syscall: &str,
        at: i64,
    ) {
        if child == 0 || child == parent.tgid {
            return;
        }
        // The child inherits the cwd, the executable, fds and shared mappings
        // (unless its own records, e.g. an execve, came first).
        if vm.aux.procs.get(&child).is_none() {
            // A child that already exited: what its own records said.
            if let Some(pa) = vm.aux.exited.get(&child).and_then(|x| x.aux.clone()) {
                vm.aux.procs.insert(child, pa);
            } else if let Some(pa) = vm.aux.procs.get(&parent.tgid).cloned() {
                vm.aux.procs.insert(child, ProcAux { comm: None, ..pa });
            }
        }
        // Pending socketpairs and shared mappings are the child's too.
        let cap = self.config.limits.helper_entries_per_vm;
        let dropped = &mut vm.aux.queue_dropped;
        inherit(
            &mut vm.aux.pairs,
            parent.tgid,
            child,
            cap,
            dropped,
            |p| p.tgid,
            |p, t| p.tgid = t,
        );
        inherit(
            &mut vm.aux.mappings,
            parent.tgid,
            child,
            cap,
            dropped,
            |m| m.tgid,
            |m, t| m.tgid = t,
        );
        if !parent_managed {
            return;
        }
        let pkey = ObjectKey::Process { tgid: parent.tgid };
        let parent_now = self.proc_ref(vm, parent.tgid, &parent.comm);
        let edge = Edge {
            syscall: syscall.to_string(),
            from: Some(Source {
                vm: None,
                object: pkey,
                label: parent_now.to_string(),
            }),
            seq: Some(seq),
        };
        let comm = vm
            .aux
            .procs
            .get(&child)
            .and_then(|p| p.comm.clone())
            .unwrap_or_else(|| parent_now.comm.clone());
        let info = self.proc_info(vm, child, &comm);
        if self.manage(vm, ObjectKey::Process { tgid: child }, info, edge, at) {
            self.settle_late(vm, child, fork_ns);
        }
    }

    /// `clone3` keeps its flags in user memory (not captured): the child is
    /// a process once a record shows it as its own thread-group leader.
    fn clone3_child(&mut self, vm: &mut Vm, call: &PendingCall, child: u32, at: i64) {
        let parent_managed = vm.set.contains(&ObjectKey::Process { tgid: call.tgid });
        let parent = ProcRef {
            tgid: call.tgid,
            comm: call.comm.clone(),
        };
        // An exit_group by `child` as a thread-group id already says it was a process.
        if vm
            .aux
            .exited
            .get(&child)
            .is_some_and(|x| x.at_ns >= call.time_ns)
        {
            self.child_created(
                vm,
                &parent,
                child,
                parent_managed,
                call.time_ns,
                call.seq,
                "clone3",
                at,
            );
            return;
        }
        vm.aux.clone3.insert(
            child,
            PendingChild {
                parent,
                parent_managed,
                time_ns: call.time_ns,
                seq: call.seq,
            },
        );
    }

    fn confirm_clone3(&mut self, vm: &mut Vm, rec: &Record) {
        let Some(pc) = vm.aux.clone3.remove(&rec.pid) else {
            return;
        };
        if rec.pid == rec.tgid {
            let at = self.wall(rec.time_ns);
            self.child_created(
                vm,
                &pc.parent,
                rec.pid,
                pc.parent_managed,
                pc.time_ns,
                pc.seq,
                "clone3",
                at,
            );
        }
    }

    fn exec(&mut self, vm: &mut Vm, call: &PendingCall, at: i64) {
        let arg = if call.nr == sys::EXECVE { 0 } else { 1 };
        let Some(path) = call.path(arg).filter(|p| !p.is_empty()) else {
            return;
        };
        let dirfd = (call.nr == sys::EXECVEAT).then_some(call.args[0]);
        let exe = self.resolve(vm, call.tgid, path, dirfd);
        let comm = paths::comm_of_exec(path);
        if let Some(p) = vm.aux.procs.entry(call.tgid, ProcAux::default) {
            p.exe.clone_from(&exe);
            p.comm = Some(comm.clone());
        }
        // The old image's mappings are gone.
        vm.aux.mappings.retain(|m| m.tgid != call.tgid);
        let key = ObjectKey::Process { tgid: call.tgid };
        let from = match vm.set.get(&key).map(|o| &o.info) {
            Some(ObjectInfo::Process { comm, .. }) => comm.clone(),
            Some(_) => "?".to_string(),
            None => return,
        };
        self.emit(
            vm,
            at,
            Change::Exec {
                tgid: call.tgid,
                from,
                comm,
                exe,
            },
        );
    }

    fn rename(&mut self, vm: &mut Vm, call: &PendingCall, at: i64, syscall: &str) {
        let (old_arg, new_arg, dirfds) = match call.nr {
            sys::RENAME => (0, 1, (None, None)),
            _ => (1, 3, (Some(call.args[0]), Some(call.args[2]))),
        };
        let exchange = call.nr == sys::RENAMEAT2 && call.args[4] & RENAME_EXCHANGE != 0;
        let (Some(old), Some(new)) = (call.path(old_arg), call.path(new_arg)) else {
            return;
        };
        let (Some(from), Some(to)) = (
            self.resolve(vm, call.tgid, old, dirfds.0),
            self.resolve(vm, call.tgid, new, dirfds.1),
        ) else {
            return;
        };
        if from == to {
            return;
        }
        let by = Some(self.proc_ref(vm, call.tgid, &call.comm));
        let moved = vm.set.by_name(&from);
        let target = vm.set.by_name(&to);
        if moved.is_some() && moved == target {
            return; // two names of one file: rename does nothing
        }
        let renamed = |object, from: &str, to: &str| Change::Renamed {
            object,
            from: Some(from.to_string()),
            to: Some(to.to_string()),
            syscall: syscall.to_string(),
            by: by.clone(),
        };
        if exchange {
            if let Some(k) = moved {
                self.emit(vm, at, renamed(k, &from, &to));
            }
            if let Some(k) = target {
                self.emit(vm, at, renamed(k, &to, &from));
            }
            return;
        }
        if let Some(t) = target {
            self.drop_name(vm, t, &to, at, syscall, by.clone(), Reason::Replaced);
        }
        match moved {
            Some(k) => self.emit(vm, at, renamed(k, &from, &to)),
            None => {
                // A directory: every managed name under it moves.
                for (name, k) in vm.set.names_under(&from) {
                    let new_name = format!("{to}{}", &name[from.len()..]);
                    self.emit(vm, at, renamed(k, &name, &new_name));
                }
            }
        }
    }

    fn link_name(&mut self, vm: &mut Vm, call: &PendingCall, at: i64, syscall: &str) {
        let (old_arg, new_arg, dirfds) = match call.nr {
            sys::LINK => (0, 1, (None, None)),
            _ => (1, 3, (Some(call.args[0]), Some(call.args[2]))),
        };
        let (Some(old), Some(new)) = (call.path(old_arg), call.path(new_arg)) else {
            return;
        };
        let (Some(from), Some(to)) = (
            self.resolve(vm, call.tgid, old, dirfds.0),
            self.resolve(vm, call.tgid, new, dirfds.1),
        ) else {
            return;
        };
        let Some(k) = vm.set.by_name(&from) else {
            return;
        };
        let by = Some(self.proc_ref(vm, call.tgid, &call.comm));
        self.take_name(vm, &to, k, at, syscall, by.clone());
        self.emit(
            vm,
            at,
            Change::Renamed {
                object: k,
                from: None,
                to: Some(to),
                syscall: syscall.to_string(),
                by,
            },
        );
    }

    fn unlink(&mut self, vm: &mut Vm, call: &PendingCall, at: i64, syscall: &str) {
        let (arg, dirfd) = match call.nr {
            sys::UNLINK => (0, None),
            _ => {
                if call.args[2] & sys::AT_REMOVEDIR != 0 {
                    return;
                }
                (1, Some(call.args[0]))
            }
        };
        let Some(path) = call
            .path(arg)
            .and_then(|p| self.resolve(vm, call.tgid, p, dirfd))
        else {
            return;
        };
        if let Some(k) = vm.set.by_name(&path) {
            let by = Some(self.proc_ref(vm, call.tgid, &call.comm));
            self.drop_name(vm, k, &path, at, syscall, by, Reason::Unlink);
        }
    }

    fn connected(&mut self, vm: &mut Vm, call: &PendingCall, t: u64, at: i64) {
        let Some(ObjectKey::Socket { ino }) = call.file(0).and_then(|f| f.key) else {
            return;
        };
        let Some(peer) = call.addr(1).cloned() else {
            return;
        };
        self.learn_peer(vm, ino, peer.clone(), t);
        let Some(ep) = self.local_endpoint(vm, &peer) else {
            return;
        };
        let mine = vm.aux.sockets.get(&ino).and_then(|s| s.local.clone());
        self.expire_queues(vm, t);
        let found = vm
            .aux
            .accepts
            .iter()
            .position(|q| q.endpoint == ep && same_client(q.addr.as_ref(), mine.as_ref()));
        match found.and_then(|pos| vm.aux.accepts.remove(pos)) {
            Some(q) => self.link(vm, ino, q.sock, at),
            None => {
                let cap = self.config.limits.helper_entries_per_vm;
                push_bounded(
                    &mut vm.aux.connects,
                    QueuedConn {
                        endpoint: ep,
                        sock: ino,
                        addr: mine,
                        time_ns: t,
                    },
                    cap,
                    &mut vm.aux.queue_dropped,
                );
            }
        }
    }

    fn accepted(
        &mut self,
        vm: &mut Vm,
        call: &PendingCall,
        result: Option<&FileRef>,
        peer: Option<NetAddr>,
        t: u64,
        at: i64,
    ) {
        let Some(ObjectKey::Socket { ino: server }) = result.and_then(|f| f.key) else {
            return;
        };
        let listener_local = match call.file(0).and_then(|f| f.key) {
            Some(ObjectKey::Socket { ino }) => vm.aux.socket(ino).and_then(|s| {
                s.listener = true;
                s.local.clone()
            }),
            _ => None,
        };
        if let Some(s) = vm.aux.socket(server) {
            s.local.clone_from(&listener_local);
        }
        if let Some(p) = &peer {
            self.learn_peer(vm, server, p.clone(), t);
        }
        let Some(ep) = listener_local.as_ref().and_then(Endpoint::of_local) else {
            return;
        };
        let local_peer = match &peer {
            None | Some(NetAddr::Unix(_)) => true,
            Some(NetAddr::Inet(sa)) => is_host_local(sa.ip()) || self.owns(&vm.name, sa.ip()),
        };
        if !local_peer {
            return;
        }
        self.expire_queues(vm, t);
        let found = vm
            .aux
            .connects
            .iter()
            .position(|q| q.endpoint == ep && same_client(q.addr.as_ref(), peer.as_ref()));
        match found.and_then(|pos| vm.aux.connects.remove(pos)) {
            Some(q) => self.link(vm, q.sock, server, at),
            None => {
                let cap = self.config.limits.helper_entries_per_vm;
                push_bounded(
                    &mut vm.aux.accepts,
                    QueuedConn {
                        endpoint: ep,
                        sock: server,
                        addr: peer,
                        time_ns: t,
                    },
                    cap,
                    &mut vm.aux.queue_dropped,
                );
            }
        }
    }

    fn expire_queues(&mut self, vm: &mut Vm, t: u64) {
        let ttl = self.config.link_ttl_ns;
        for q in [&mut vm.aux.connects, &mut vm.aux.accepts] {
            while q.front().is_some_and(|c| t.saturating_sub(c.time_ns) > ttl) {
                q.pop_front();
            }
        }
    }

    /// Sockets `a` and `b` are the two ends of one local channel: content
    /// written into either can be read from the other.
    fn link(&mut self, vm: &mut Vm, a: u64, b: u64, at: i64) {
        if a == b {
            return;
        }
        if let Some(s) = vm.aux.socket(a) {
            s.linked = Some(b);
        }
        if let Some(s) = vm.aux.socket(b) {
            s.linked = Some(a);
        }
        let (ka, kb) = (ObjectKey::Socket { ino: a }, ObjectKey::Socket { ino: b });
        let (from, to, to_ino) = match (vm.set.contains(&ka), vm.set.contains(&kb)) {
            (true, false) => (ka, kb, b),
            (false, true) => (kb, ka, a),
            _ => return,
        };
        let edge = Edge {
            syscall: "peer".into(),
            from: Some(Source {
                vm: None,
                object: from,
                label: vm.set.label(&from),
            }),
            seq: None,
        };
        let info = socket_info(vm, to_ino, None);
        self.manage(vm, to, info, edge, at);
    }

    /// A socket fd of `tgid` showed its inode: completes a `socketpair`.
    fn learn_pair_fd(&mut self, vm: &mut Vm, tgid: u32, fd: i32, ino: u64, at: i64) {
        if vm.aux.pairs.is_empty() {
            return;
        }
        let mut done = None;
        for p in vm.aux.pairs.iter_mut().filter(|p| p.tgid == tgid) {
            for i in 0..2 {
                if p.fds[i] == fd {
                    p.inos[i] = Some(ino);
                }
            }
            if let [Some(a), Some(b)] = p.inos {
                if a != b {
                    done = Some((a, b));
                    break;
                }
            }
        }
        if let Some((a, b)) = done {
            vm.aux
                .pairs
                .retain(|p| !p.inos.contains(&Some(a)) && !p.inos.contains(&Some(b)));
            self.link(vm, a, b, at);
        }
    }

    /// Socket `ino` talks to `peer`. A peer in another watched VM may
    /// complete a cross-VM flow whose send was seen already.
    pub(crate) fn learn_peer(&mut self, vm: &mut Vm, ino: u64, peer: NetAddr, t: u64) {
        if matches!(&peer, NetAddr::Unix(p) if p.is_empty()) {
            return;
        }
        let Some(s) = vm.aux.socket(ino) else {
            return;
        };
        s.peer = Some(peer.clone());
        let state = s.clone();
        if vm.set.contains(&ObjectKey::Socket { ino }) {
            return;
        }
        let NetAddr::Inet(sa) = peer else {
            return;
        };
        if is_host_local(sa.ip()) || self.owner_other(&vm.name, sa.ip()).is_none() {
            return;
        }
        let mut best: Option<&Flow> = None;
        for (_, f) in self.flows.iter() {
            if self.flow_matches(f, &vm.name, &state, Some(t))
                && best.is_none_or(|b| f.start_ns < b.start_ns)
            {
                best = Some(f);
            }
        }
        if let Some(flow) = best.cloned() {
            let at = self.wall(t);
            self.cross_manage(vm, ino, &flow, at);
        }
    }

    /// `tgid` became managed late (its records were handled before the
    /// record that made it managed): what it wrote since `since_ns` is
    /// applied now, and if it already exited since, it leaves again.
    pub(crate) fn settle_late(&mut self, vm: &mut Vm, tgid: u32, since_ns: u64) {
        self.replay_writes(vm, tgid, since_ns);
        if let Some(exit_ns) = vm.aux.exited.get(&tgid).map(|x| x.at_ns) {
            if exit_ns >= since_ns {
                self.process_exit(vm, tgid, exit_ns, Reason::Exit);
            }
        }
    }

    fn replay_writes(&mut self, vm: &mut Vm, tgid: u32, since_ns: u64) {
        let due = |w: &RecentIo| w.tgid == tgid && w.time_ns >= since_ns;
        let writes: Vec<RecentIo> = vm
            .aux
            .recent_writes
            .iter()
            .filter(|w| due(w))
            .cloned()
            .collect();
        vm.aux.recent_writes.retain(|w| !due(w));
        for w in writes {
            let at = self.wall(w.time_ns);
            self.write_managed(
                vm,
                w.tgid,
                w.object,
                &w.file,
                w.dst,
                (w.bytes, w.calls),
                w.time_ns,
                w.seq,
                w.syscall,
                at,
            );
        }
    }

    fn remember_write(&mut self, vm: &mut Vm, io: RecentIo) {
        let (cap, ttl) = (
            self.config.limits.recent_io_per_vm,
            self.config.recent_ttl_ns,
        );
        remember(
            &mut vm.aux.recent_writes,
            io,
            cap,
            ttl,
            &mut vm.stats.recent_io_dropped,
        );
    }

    fn remember_read(&mut self, vm: &mut Vm, io: RecentIo) {
        let (cap, ttl) = (
            self.config.limits.recent_io_per_vm,
            self.config.recent_ttl_ns,
        );
        remember(
            &mut vm.aux.recent_reads,
            io,
            cap,
            ttl,
            &mut vm.stats.recent_io_dropped,
        );
    }

    /// Process `tgid` as events name it (its managed name if it has one).
    fn proc_ref(&self, vm: &Vm, tgid: u32, comm: &str) -> ProcRef {
        let comm = match vm.set.get(&ObjectKey::Process { tgid }).map(|o| &o.info) {
            Some(ObjectInfo::Process { comm, .. }) => comm.clone(),
            _ => comm.to_string(),
        };
        ProcRef { tgid, comm }
    }
}

/// Appends to `queue` a copy, owned by `child`, of every entry `parent` owns
/// (bounded like every helper queue).
fn inherit<T: Clone>(
    queue: &mut std::collections::VecDeque<T>,
    parent: u32,
    child: u32,
    cap: usize,
    dropped: &mut u64,
    owner: impl Fn(&T) -> u32,
    set_owner: impl Fn(&mut T, u32),
) {
    let copies: Vec<T> = queue
        .iter()
        .filter(|e| owner(e) == parent)
        .map(|e| {
            let mut e = e.clone();
            set_owner(&mut e, child);
            e
        })
        .collect();
    for e in copies {
        push_bounded(queue, e, cap, dropped);
    }
}

/// Whether a queued connection's client address fits the one seen on the
/// other side (unknown on either side fits; inet compares the port).
fn same_client(a: Option<&NetAddr>, b: Option<&NetAddr>) -> bool {
    match (a, b) {
        (Some(NetAddr::Inet(x)), Some(NetAddr::Inet(y))) => x.port() == 0 || x.port() == y.port(),
        _ => true,
    }
}

fn recent(
    call: &PendingCall,
    object: ObjectKey,
    f: &FileRef,
    syscall: &'static str,
    time_ns: u64,
    dst: Option<NetAddr>,
    (bytes, calls): (u64, u64),
) -> RecentIo {
    RecentIo {
        tgid: call.tgid,
        comm: call.comm.clone(),
        object,
        file: f.clone(),
        syscall,
        time_ns,
        seq: call.seq,
        dst,
        bytes,
        calls,
    }
}

/// Appends to a bounded queue, dropping (and counting) the oldest.
fn push_bounded<T>(q: &mut std::collections::VecDeque<T>, item: T, cap: usize, dropped: &mut u64) {
    while q.len() >= cap.max(1) {
        q.pop_front();
        *dropped += 1;
    }
    q.push_back(item);
}

/// Appends to a recent-I/O queue: entries older than `ttl` go first, then
/// the oldest past `cap` (counted).
fn remember(
    q: &mut std::collections::VecDeque<RecentIo>,
    io: RecentIo,
    cap: usize,
    ttl: u64,
    dropped: &mut u64,
) {
    while q
        .front()
        .is_some_and(|o| io.time_ns.saturating_sub(o.time_ns) > ttl)
    {
        q.pop_front();
    }
    push_bounded(q, io, cap, dropped);
}
