//! Plugin arguments: `ring=PATH` (required), `vm=NAME`, `filter=SPEC`,
//! `capacity=N`. Each problem is one line; QEMU then refuses to start.

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
}

const USAGE: &str = "expected ring=PATH, vm=NAME, filter=all|none|NAME:NAME..., capacity=N";

pub fn parse(argv: &[String]) -> Result<Config, String> {
    let mut ring = None;
    let mut vm = None;
    let mut filter = None;
    let mut capacity = None;
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
    Ok(Config {
        ring: ring.ok_or_else(|| format!("missing ring=PATH ({USAGE})"))?,
        vm: vm.unwrap_or_default(),
        filter: filter.unwrap_or(Filter::ALL),
        capacity: capacity.unwrap_or(1 << 16),
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
        let c = p(&["ring=/r"]).unwrap();
        assert_eq!(
            (c.filter, c.capacity, c.vm.as_str()),
            (Filter::ALL, 65536, "")
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
        ];
        for (args, want) in cases {
            let e = p(args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
            assert!(!e.contains('\n'));
        }
    }
}
