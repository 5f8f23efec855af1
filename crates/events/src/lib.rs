//! Syscall event records and the per-VM shared-memory ring that carries them
//! from the QEMU plugin (`hook-plugin`, one producer per vCPU thread) to one
//! consumer (`vmwatch trace`, later `vmwatchd`).
//!
//! - [`record`]: a [`Record`] (entry or return of one syscall: fixed fields
//!   and a payload of captured items, [`payload`]).
//! - [`capture`]: what producers capture for each syscall.
//! - [`ring`]: the file format and its lock-free multi-producer,
//!   single-consumer protocol; [`RingWriter`] for the plugin, [`Ring::open`]
//!   / [`RingReader`] for the consumer. A full ring never blocks the guest:
//!   the producer counts the loss and the consumer reports it.
//! - [`syscalls`]: the x86-64 syscall table, the 512-bit [`Filter`] and
//!   its parser (`all`, `none`, `openat,read,...`).
//! - [`format`]: strace-like rendering of arguments and results.

pub mod capture;
pub mod format;
pub mod msrs;
pub mod payload;
pub mod record;
pub mod ring;
pub mod syscalls;

pub use msrs::{EntryMsr, EntryMsrs, MSR_VCPU_SLOTS};
pub use payload::{FileId, FileKind, Item, PayloadBuf};
pub use record::{
    Kind, Record, FLAG_PAYLOAD_CUT, FLAG_TASK, LOG_DOORBELL, LOG_DOORBELL_LEAF, LOG_MAX, LOG_SLICE,
    NO_ENTRY,
};
pub use ring::{
    peek_entry_msrs, peek_syscall_entry, Ring, RingError, RingReader, RingWriter, FORMAT_VERSION,
    MAGIC,
};
pub use syscalls::{Filter, FilterError};

/// Host `CLOCK_MONOTONIC` in nanoseconds: the time base of every record.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}
