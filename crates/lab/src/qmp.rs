//! A small synchronous QMP client over the VM's Unix socket.
//!
//! Built on the `qapi` crate (feature `qmp`): its `Qmp` type is synchronous
//! over any `BufRead + Write`, and its command structs are generated from
//! QEMU's own schema, so argument names cannot drift. Two things are done
//! here rather than by the crate: the greeting is read by hand (the crate's
//! `handshake` panics if QEMU closes the socket first, which is exactly what
//! a dying QEMU does), and every read and write has a timeout, so a wedged
//! QEMU produces an error instead of a hang.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use qapi::qmp;

use crate::error::{LabError, Result};

type Stream = qapi::Stream<BufReader<UnixStream>, UnixStream>;

/// A negotiated QMP session (capabilities exchanged, ready for commands).
pub struct Qmp {
    name: String,
    inner: qapi::Qmp<Stream>,
    stream: UnixStream,
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and leaves capabilities
    /// negotiation mode. `name` only labels errors.
    pub fn connect(socket: &Path, name: &str, timeout: Duration) -> Result<Qmp> {
        let err = |detail: String| LabError::Qmp {
            name: name.to_string(),
            detail,
        };
        let stream = UnixStream::connect(socket)
            .map_err(|e| err(format!("cannot connect to {}: {e}", socket.display())))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| err(e.to_string()))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| err(e.to_string()))?;
        let read_half = stream.try_clone().map_err(|e| err(e.to_string()))?;
        let write_half = stream.try_clone().map_err(|e| err(e.to_string()))?;
        let mut reader = BufReader::new(read_half);
        let mut greeting = String::new();
        reader
            .read_line(&mut greeting)
            .map_err(|e| err(format!("no greeting: {e}")))?;
        let value: serde_json::Value = serde_json::from_str(&greeting)
            .map_err(|e| err(format!("bad greeting {greeting:?}: {e}")))?;
        if value.get("QMP").is_none() {
            return Err(err(format!("unexpected greeting {greeting:?}")));
        }
        let mut inner = qapi::Qmp::new(qapi::Stream::new(reader, write_half));
        inner
            .execute(&qmp::qmp_capabilities { enable: None })
            .map_err(|e| err(format!("qmp_capabilities: {e}")))?;
        Ok(Qmp {
            name: name.to_string(),
            inner,
            stream,
        })
    }

    /// Runs one command and returns its typed result.
    pub fn execute<C: qapi::Command>(&mut self, command: &C) -> Result<C::Ok> {
        self.inner.execute(command).map_err(|e| LabError::Qmp {
            name: self.name.clone(),
            detail: format!("{}: {e}", C::NAME),
        })
    }

    /// Runs a human-monitor (HMP) command and returns its text output.
    pub fn hmp(&mut self, command_line: &str) -> Result<String> {
        self.execute(&qmp::human_monitor_command {
            command_line: command_line.to_string(),
            cpu_index: None,
        })
    }

    /// Each vCPU's IDT base, from `info registers -a` (read while the guest
    /// runs: under TCG the monitor reads the CPU state without stopping it;
    /// under KVM each vCPU exits once to report its registers).
    pub fn idt_bases(&mut self) -> Result<Vec<u64>> {
        Ok(parse_idt_bases(&self.hmp("info registers -a")?))
    }

    /// `query-status`: whether the guest CPUs run (`running`) and why not.
    pub fn status(&mut self) -> Result<qmp::StatusInfo> {
        self.execute(&qmp::query_status {})
    }

    /// Asks QEMU to exit. QEMU may close the socket before or after it
    /// answers; both count as success.
    pub fn quit(mut self) -> Result<()> {
        match self.inner.execute(&qmp::quit {}) {
            Ok(_) => Ok(()),
            Err(qapi::ExecuteError::Io(_)) => Ok(()),
            Err(e) => Err(LabError::Qmp {
                name: self.name.clone(),
                detail: format!("quit: {e}"),
            }),
        }
    }

    /// Writes guest memory to an ELF core file (`dump-guest-memory`, no
    /// paging: physical memory as PT_LOAD segments). QEMU pauses the guest
    /// while it writes. `path` must be absolute: QEMU opens it itself.
    pub fn dump_guest_memory(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let _ = self.stream.set_read_timeout(Some(timeout));
        let r = self.execute(&qmp::dump_guest_memory {
            paging: false,
            protocol: format!("file:{}", path.display()),
            detach: Some(false),
            begin: None,
            length: None,
            format: None,
        });
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(10)));
        r.map(drop)
    }
}

/// The `IDT=  BASE LIMIT` fields of an `info registers` dump, in CPU order.
pub fn parse_idt_bases(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("IDT="))
        .filter_map(|rest| u64::from_str_radix(rest.split_whitespace().next()?, 16).ok())
        .collect()
}

#[cfg(test)]
mod idt_tests {
    #[test]
    fn idt_bases_come_from_every_cpu_dump() {
        let text = "CPU#0\nRAX=0\nGDT=     fffffe0000001000 0000007f\nIDT=     fffffe0000000000 00000fff\nCPU#1\nIDT=     fffffe0000000000 00000fff\n";
        assert_eq!(super::parse_idt_bases(text), vec![0xfffffe0000000000; 2]);
        assert!(super::parse_idt_bases("garbage\nIDT=zz").is_empty());
    }
}
