//! The x86-64 syscall table and the 512-bit syscall filter.

#[path = "syscalls_table.rs"]
mod table;

pub use table::NAMES;

/// Number of syscall numbers a [`Filter`] covers (x86-64 uses 0..=462 today).
pub const FILTER_BITS: usize = 512;

/// Name of syscall `nr`, if the table has one.
pub fn name(nr: u64) -> Option<&'static str> {
    NAMES
        .get(usize::try_from(nr).ok()?)
        .copied()
        .filter(|n| !n.is_empty())
}

/// Number of the syscall called `name`.
pub fn number(name: &str) -> Option<u64> {
    NAMES
        .iter()
        .position(|n| !n.is_empty() && *n == name)
        .map(|i| i as u64)
}

/// A bad filter specification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "unknown syscall `{0}` in filter (use x86-64 names such as openat, or numbers below 512)"
    )]
    Unknown(String),
    #[error("empty syscall filter (use `none` to trace nothing)")]
    Empty,
}

/// Which syscall numbers the plugin records: a 512-bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Filter {
    pub words: [u64; FILTER_BITS / 64],
}

impl Filter {
    pub const ALL: Filter = Filter {
        words: [u64::MAX; FILTER_BITS / 64],
    };
    pub const NONE: Filter = Filter {
        words: [0; FILTER_BITS / 64],
    };

    /// `all`, `none`, or a list of syscall names or numbers separated by
    /// `,` or `:` (QEMU's `-plugin` option splits on commas, so plugin
    /// arguments use `:` or a doubled `,,`).
    pub fn parse(spec: &str) -> Result<Filter, FilterError> {
        match spec.trim() {
            "all" => return Ok(Filter::ALL),
            "none" => return Ok(Filter::NONE),
            _ => {}
        }
        let mut f = Filter::NONE;
        let mut any = false;
        for item in spec.split([',', ':']).map(str::trim) {
            if item.is_empty() {
                continue;
            }
            let nr = match item.parse::<u64>() {
                Ok(n) if (n as usize) < FILTER_BITS => n,
                Ok(_) => return Err(FilterError::Unknown(item.to_string())),
                Err(_) => number(item).ok_or_else(|| FilterError::Unknown(item.to_string()))?,
            };
            f.insert(nr);
            any = true;
        }
        if !any {
            return Err(FilterError::Empty);
        }
        Ok(f)
    }

    pub fn insert(&mut self, nr: u64) {
        if (nr as usize) < FILTER_BITS {
            self.words[(nr / 64) as usize] |= 1 << (nr % 64);
        }
    }

    pub fn contains(&self, nr: u64) -> bool {
        (nr as usize) < FILTER_BITS && self.words[(nr / 64) as usize] & (1 << (nr % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_the_x86_64_abi() {
        assert_eq!(number("read"), Some(0));
        assert_eq!(number("getpid"), Some(39));
        assert_eq!(number("openat"), Some(257));
        assert_eq!(number("exit_group"), Some(231));
        assert_eq!(number("renameat2"), Some(316));
        assert_eq!(number("clone3"), Some(435));
        assert_eq!(number("mseal"), Some(462));
        assert_eq!(name(335), None);
        assert_eq!(name(10_000), None);
        assert_eq!(number(""), None);
    }

    #[test]
    fn filters_parse() {
        assert_eq!(Filter::parse("all").unwrap(), Filter::ALL);
        assert_eq!(Filter::parse("none").unwrap(), Filter::NONE);
        let f = Filter::parse("openat:read,39").unwrap();
        assert!(f.contains(257) && f.contains(0) && f.contains(39));
        assert!(!f.contains(1) && !f.contains(600));
        assert_eq!(
            Filter::parse("openat,bogus").unwrap_err().to_string(),
            "unknown syscall `bogus` in filter (use x86-64 names such as openat, or numbers below 512)"
        );
        assert_eq!(
            Filter::parse("512"),
            Err(FilterError::Unknown("512".into()))
        );
        assert_eq!(Filter::parse(" , "), Err(FilterError::Empty));
    }
}
