//! Event payloads carry guest-controlled bytes (paths, argv, socket
//! addresses, file paths) and are decoded and rendered by every consumer:
//! decoding and strace-like rendering must never panic, whatever the bytes.
#![no_main]

use events::{format, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // First byte picks the syscall (so every capture shape is reached), the
    // rest is the payload, used for an entry and for its return.
    let nr = u64::from(data[0]) | (u64::from(data[1] & 1) << 8);
    let args = [u64::MAX, 0x7fff_0000, 3, 0, 0, 16];
    let mut entry = Record::entry(0, nr, args, 0, 0);
    entry.payload = data[2..].to_vec();
    let mut ret = Record::ret(0, nr, 3, 0, 0, 0);
    ret.payload = data[2..].to_vec();
    let _ = entry.items().count();
    let _ = format::call(&entry, Some(&ret));
    let _ = format::result_of(&ret);
    for item in entry.items() {
        if let events::Item::SockAddr { bytes, cut, .. } = item {
            let _ = format::sockaddr(bytes, cut);
        }
    }
});
