//! Plugin arguments: `ring=PATH` (required), `vm=NAME`, `filter=SPEC`,
//! `fds=SPEC` (syscalls whose fd arguments and results are resolved to file
//! identities), `capacity=N`, and for naming the guest task of each event
//! `ram=PATH` (the guest RAM file), `ram_below_4g=BYTES` (QEMU's split below
//! the PCI hole) and `vmlinux=PATH` (symbols and BTF); for xftrace (kernel
//! call flows, `callflow.rs`) `xftrace=PATH` (its control and record file,
//! which needs the guest kernel: `ram=`/`vmlinux=`) and `xftrace_records=N`.
//! Each problem is one line; QEMU then refuses to start.

use std::path::PathBuf;

use events::Filter;

/// What QEMU passed after `file=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub ring: PathBuf,
    pub vm: String,
    pub filter: Filter,
    /// Ring capacity in records.
    pub capacity: u64,
    /// Syscalls whose fds are resolved to file identities.
    pub fds: Filter,
    /// How to read the guest kernel, when given.
    pub guest: Option<GuestConfig>,
    /// The xftrace file, when given.
    pub xftrace: Option<PathBuf>,
    /// Its capacity in records.
    pub xftrace_records: u64,
}

/// Where the guest's RAM and kernel image are (all three or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    pub ram: PathBuf,
    pub ram_below_4g: u64,
    pub vmlinux: PathBuf,
}

const USAGE: &str = "expected ring=PATH, vm=NAME, filter=all|none|NAME:NAME..., fds=SPEC, \
                     capacity=N, ram=PATH, ram_below_4g=BYTES, vmlinux=PATH, xftrace=PATH, \
                     xftrace_records=N";

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

pub fn parse(argv: &[String]) -> Result<Config, String> {
    let mut ring = None;
    let mut vm = None;
    let mut filter = None;
    let mut capacity = None;
    let mut fds = None;
    let mut ram = None;
    let mut ram_below_4g = None;
    let mut vmlinux = None;
    let mut xftrace = None;
    let mut xftrace_records = None;
    for arg in argv {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(format!("argument `{arg}` is not key=value ({USAGE})"));
        };
        let seen = match key {
            "ring" => {
                if value.is_empty() {
                    return Err("ring= needs a file path".to_string());
                }
                ring.replace(PathBuf::from(value)).is_some()
            }
            "vm" => {
                let ok = !value.is_empty()
                    && value.len() <= 63
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    return Err(format!(
                        "vm name `{value}` must be 1-63 characters of [A-Za-z0-9._-]"
                    ));
                }
                vm.replace(value.to_string()).is_some()
            }
            "filter" => filter
                .replace(Filter::parse(value).map_err(|e| e.to_string())?)
                .is_some(),
            "fds" => fds
                .replace(Filter::parse(value).map_err(|e| format!("fds=: {e}"))?)
                .is_some(),
            "ram" | "vmlinux" | "xftrace" => {
                if value.is_empty() {
                    return Err(format!("{key}= needs a file path"));
                }
                let slot = match key {
                    "ram" => &mut ram,
                    "vmlinux" => &mut vmlinux,
                    _ => &mut xftrace,
                };
                slot.replace(PathBuf::from(value)).is_some()
            }
            "xftrace_records" => {
                let n: u64 = value
                    .parse()
                    .ok()
                    .filter(|n| {
                        (xftrace::buffer::MIN_RECORDS..=xftrace::buffer::MAX_RECORDS).contains(n)
                    })
                    .ok_or_else(|| {
                        format!(
                            "xftrace_records `{value}` must be a number between {} and {}",
                            xftrace::buffer::MIN_RECORDS,
                            xftrace::buffer::MAX_RECORDS
                        )
                    })?;
                xftrace_records.replace(n).is_some()
            }
            "ram_below_4g" => {
                let n = parse_u64(value).ok_or_else(|| {
                    format!("ram_below_4g `{value}` is not a byte count (decimal or 0x hex)")
                })?;
                ram_below_4g.replace(n).is_some()
            }
            "capacity" => {
                let n: u64 = value
                    .parse()
                    .ok()
                    .filter(|n: &u64| {
                        n.is_power_of_two() && (2..=events::ring::MAX_CAPACITY).contains(n)
                    })
                    .ok_or_else(|| {
                        format!(
                            "capacity `{value}` must be a power of two between 2 and {}",
                            events::ring::MAX_CAPACITY
                        )
                    })?;
                capacity.replace(n).is_some()
            }
            _ if value == "on" => {
                return Err(format!(
                    "unknown argument `{arg}`: separate syscall names in filter= with `:` \
                     (QEMU splits -plugin options at commas)"
                ))
            }
            _ => return Err(format!("unknown argument `{arg}` ({USAGE})")),
        };
        if seen {
            return Err(format!("argument `{key}` given twice"));
        }
    }
    let guest = match (ram, ram_below_4g, vmlinux) {
        (None, None, None) => None,
        (Some(ram), Some(ram_below_4g), Some(vmlinux)) => Some(GuestConfig {
            ram,
            ram_below_4g,
            vmlinux,
        }),
        _ => {
            return Err(
                "ram=, ram_below_4g= and vmlinux= go together (all three or none)".to_string(),
            )
        }
    };
    if xftrace.is_some() && guest.is_none() {
        return Err(
            "xftrace= needs the guest kernel: give ram=, ram_below_4g= and vmlinux= too"
                .to_string(),
        );
    }
    Ok(Config {
        ring: ring.ok_or_else(|| format!("missing ring=PATH ({USAGE})"))?,
        vm: vm.unwrap_or_default(),
        filter: filter.unwrap_or(Filter::ALL),
        capacity: capacity.unwrap_or(1 << 16),
        fds: fds.unwrap_or(Filter::NONE),
        guest,
        xftrace,
        xftrace_records: xftrace_records.unwrap_or(xftrace::buffer::DEFAULT_RECORDS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Config, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn good_arguments() {
        let c = p(&[
            "ring=/dev/shm/x",
            "vm=web-1",
            "filter=openat:getpid",
            "capacity=1024",
        ])
        .unwrap();
        assert_eq!(c.ring, PathBuf::from("/dev/shm/x"));
        assert_eq!(c.vm, "web-1");
        assert!(c.filter.contains(257) && c.filter.contains(39) && !c.filter.contains(0));
        assert_eq!(c.capacity, 1024);
        let c = p(&[
            "ring=/r",
            "ram=/m",
            "ram_below_4g=0x80000000",
            "vmlinux=/k",
            "fds=read",
        ])
        .unwrap();
        let g = c.guest.unwrap();
        assert_eq!((g.ram_below_4g, g.vmlinux), (1 << 31, PathBuf::from("/k")));
        assert!(c.fds.contains(0) && !c.fds.contains(1));
        let c = p(&["ring=/r"]).unwrap();
        assert_eq!(
            (c.filter, c.capacity, c.vm.as_str()),
            (Filter::ALL, 65536, "")
        );
        assert_eq!(c.xftrace, None);
        let c = p(&[
            "ring=/r",
            "ram=/m",
            "ram_below_4g=1",
            "vmlinux=/k",
            "xftrace=/s/xftrace.buf",
            "xftrace_records=4096",
        ])
        .unwrap();
        assert_eq!(
            (c.xftrace, c.xftrace_records),
            (Some(PathBuf::from("/s/xftrace.buf")), 4096)
        );
    }

    #[test]
    fn bad_arguments_are_one_line_errors() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "missing ring=PATH"),
            (&["vm=a"], "missing ring=PATH"),
            (&["ring=/r", "filter=openat:nope"], "unknown syscall `nope`"),
            (
                &["ring=/r", "filter=openat", "read=on"],
                "separate syscall names",
            ),
            (&["ring=/r", "colour=red"], "unknown argument `colour=red`"),
            (&["ring=/r", "bare"], "not key=value"),
            (&["ring=/r", "capacity=1000"], "power of two"),
            (&["ring=/r", "vm=a b"], "vm name"),
            (&["ring=/r", "ring=/s"], "given twice"),
            (&["ring="], "needs a file path"),
            (&["ring=/r", "ram=/m"], "go together"),
            (&["ring=/r", "ram_below_4g=lots"], "not a byte count"),
            (&["ring=/r", "fds=reed"], "fds=: unknown syscall `reed`"),
            (
                &["ring=/r", "xftrace=/x"],
                "xftrace= needs the guest kernel",
            ),
            (&["ring=/r", "xftrace_records=5"], "xftrace_records `5`"),
            (&["ring=/r", "xftrace="], "needs a file path"),
        ];
        for (args, want) in cases {
            let e = p(args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
