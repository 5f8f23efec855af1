//! Ctrl-C / SIGTERM / SIGHUP as a flag, so the backend detaches cleanly: a
//! monitor killed while attached would leave its breakpoints in QEMU, and
//! the guest would freeze at the next syscall until another client
//! connects and detaches (connecting and sending `?` clears them; see
//! [`crate::GdbHook::release`]).

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Relaxed);
}

/// Installs the handlers (once is enough; later calls just return the flag).
/// The flag turns true at the first SIGINT, SIGTERM or SIGHUP.
pub fn stop_flag() -> &'static AtomicBool {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction with a plain handler function and an
            // empty mask is valid; `on_signal` only does an atomic store.
            // Without SA_RESTART a blocking read returns EINTR, which the
            // client treats as "no data yet".
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
    &STOP
}
